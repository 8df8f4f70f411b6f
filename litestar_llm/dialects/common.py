"""What every dialect's handlers share, and nothing dialect-specific."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
from litestar import Request
from litestar.response import Stream

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client hung up before a non-streamed answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (a non-streamed generation that nobody will
    read must not keep its batch slot). The body has been read, so the next ASGI message can only be a disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    return task.result()


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def guarded_stream(
    chunks: AsyncIterator[bytes],
    deltas: AsyncIterator,
    error_chunk: Callable[[Exception], bytes],
    media_type: str,
    headers: dict[str, str] | None = None,
) -> Stream:
    """A streamed response. An error after the first byte becomes one final chunk in the dialect's own format
    (`error_chunk`); however the stream ends (done, failed, client gone), the engine's generation is closed so
    its batch slot is freed at once."""

    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:
            yield error_chunk(exc)
        finally:
            await chunks.aclose()
            await deltas.aclose()

    return Stream(guarded(), media_type=media_type, headers=headers)


def invalid_field(exc: msgspec.ValidationError) -> tuple[str | None, str, bool]:
    """msgspec's validation error as (the field's path, the message without backticks, whether the field is missing),
    for each dialect to word in its own way."""
    text, _, at = str(exc).partition(" - at `$")
    field = at.rstrip("`").lstrip(".") or None
    if m := re.match(r"Object missing required field `(.+)`", text):
        return (f"{field}.{m.group(1)}" if field else m.group(1)), "", True
    return field, text.replace("`", ""), False
