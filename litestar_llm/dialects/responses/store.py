"""Stored responses: what `GET /v1/responses/{id}` answers and what `previous_response_id` continues from.

They live in the app's `responses` store (process memory, or Redis with `[state] url`, so every worker and
instance sees them) for `[state] responses_ttl_s`. Each is visible only to the API key that created it: to any
other caller it is absent, so ids cannot be probed across keys.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from litestar import Request
from litestar.stores.base import Store

from litestar_llm.engine.types import ChatMessage, ToolCall
from litestar_llm.errors import LitestarLLMError, StateUnavailableError

STORE_NAME = "responses"


class StoredResponse(msgspec.Struct, kw_only=True):
    owner: str | None
    """The API key name that created it; None while auth is off."""
    messages: list[ChatMessage]
    """The conversation it answered, inherited turns included; `instructions` are not (they do not carry over)."""
    output_text: str
    tool_calls: list[ToolCall] = []
    """The calls the response made: a response continuing from it sends their outputs."""
    status: str
    response: msgspec.Raw
    """The response object as it was sent; GET answers it unchanged."""

    def conversation(self) -> list[ChatMessage]:
        """The messages a response continuing from this one starts with."""
        if self.status == "failed":  # nothing was answered
            return list(self.messages)
        return [*self.messages, ChatMessage(role="assistant", content=self.output_text, tool_calls=self.tool_calls)]


class ResponseNotFoundError(LitestarLLMError):
    """No stored response with this id for this caller (never stored, store=false, expired, deleted, or another
    key's): 404."""

    status_code = 404

    def __init__(self, message: str, param: str | None = None) -> None:
        self.message, self.param = message, param
        super().__init__(message)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(StoredResponse).decode


class ResponseStore:
    """One caller's view of the `responses` store."""

    def __init__(self, store: Store, owner: str | None, ttl_s: int) -> None:
        self.store, self.owner, self.ttl_s = store, owner, ttl_s

    async def put(self, response_id: str, record: StoredResponse) -> None:
        try:
            await self.store.set(response_id, _encode(record), expires_in=self.ttl_s)
        except Exception as exc:
            raise _unreachable(exc) from exc

    async def get(self, response_id: str) -> StoredResponse | None:
        try:
            data = await self.store.get(response_id)
        except Exception as exc:
            raise _unreachable(exc) from exc
        if data is None:
            return None
        record = _decode(data)
        return record if record.owner == self.owner else None

    async def delete(self, response_id: str) -> bool:
        if await self.get(response_id) is None:
            return False
        try:
            await self.store.delete(response_id)
        except Exception as exc:
            raise _unreachable(exc) from exc
        return True


def _unreachable(exc: Exception) -> StateUnavailableError:
    return StateUnavailableError(f"the response store is unreachable: {exc}")


def store_provider(ttl_s: int) -> Callable[[Request], ResponseStore]:
    """The `responses` dependency: the store seen as the calling API key, which the auth middleware put in the
    scope's state."""

    def provide(request: Request) -> ResponseStore:
        owner = request.scope.get("state", {}).get("api_key_name")
        return ResponseStore(request.app.stores.get(STORE_NAME), owner, ttl_s)

    return provide
