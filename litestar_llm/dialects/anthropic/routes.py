"""The Anthropic route set: POST /v1/messages (streamed and not) and POST /v1/messages/count_tokens, and
Anthropic's model list for `GET /v1/models` requests that carry `anthropic-version`. HTTP only; the mapping lives
in `translate.py`, the errors in `errors.py`, and everything between decoding and encoding in the serving layer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import msgspec
from litestar import Request, Response, Router, post
from litestar.di import NamedDependency, Provide

from litestar_llm.dialects.anthropic import wire
from litestar_llm.dialects.anthropic.errors import decode_body, exception_handlers, handle, sse_error
from litestar_llm.dialects.anthropic.translate import Blocks, messages_request, sse, stop_reason
from litestar_llm.dialects.common import wire_bodies
from litestar_llm.engine.base import Engine
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Delta, GenerationRequest
from litestar_llm.errors import InvalidRequestError, LitestarLLMError
from litestar_llm.serving import Generation, Serving, check_request, provide_serving, unless_disconnected

JSON = "application/json"
SSE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
STATE_KEY = "anthropic_routes"
"""Set in the app's state when this route set is mounted: /v1/models answers Anthropic clients in their shape."""
COUNT_WAIT_S = 1.0
"""How long message_start waits, after the first token, for the prompt's token count (counted while the prompt is
prefilled); past it, message_start says 0 and message_delta carries the real figure."""
encode = wire.encoder.encode
STREAM_EVENTS = (
    wire.MessageStart,
    wire.Ping,
    wire.ContentBlockStart,
    wire.ContentBlockStop,
    wire.MessageDelta,
    wire.MessageStop,
)
"""What a streamed message's events hold (documented in /docs; content_block_delta is built in translate.sse)."""
_PING = sse(wire.Ping())
_STOP = sse(wire.MessageStop())


def _json(obj: msgspec.Struct) -> Response[bytes]:
    return Response(encode(obj), media_type=JSON)


@post("/v1/messages", status_code=200, opt=wire_bodies(wire.MessagesRequest, wire.MessageResponse, STREAM_EVENTS))
async def create_message(request: Request, serving: NamedDependency[Serving]) -> Response:
    body = decode_body(await request.body(), wire.MessagesRequest)
    build, names = messages_request(body)
    counting: asyncio.Future[int | None] | None = None
    if body.stream:  # message_start reports the prompt's tokens: count them while the prompt is prefilled
        engine, _ = serving.resolve(body.model)

        def build_and_count(model, info) -> GenerationRequest:
            nonlocal counting
            built = build(model, info)
            counting = asyncio.ensure_future(_count(engine, built))
            return built

    try:
        generation = await serving.generate(request, body.model, build_and_count if body.stream else build, names=names)
    except BaseException:
        if counting is not None:
            counting.cancel()
        raise
    message_id = f"msg_{uuid.uuid4().hex}"
    if counting is not None:
        return generation.respond(_events(generation, message_id, body.model, counting), sse_error, SSE, SSE_HEADERS)
    blocks, last = Blocks(events=False), Delta()

    async def gather() -> None:
        nonlocal last
        async for _, delta in generation:
            blocks.add(delta)
            if delta.finish_reason is not None:
                last = delta

    await unless_disconnected(request, gather())  # the generation is cancelled if the client leaves meanwhile
    blocks.finish()
    return _json(
        wire.MessageResponse(
            id=message_id,
            model=body.model,
            content=blocks.content,
            stop_reason=stop_reason(last.finish_reason, blocks.tool_use, last.stop_sequence),
            stop_sequence=last.stop_sequence,
            usage=_usage(last),
        )
    )


async def _count(engine: Engine, request: GenerationRequest) -> int | None:
    try:
        return await engine.count_prompt_tokens(request)
    except Exception:  # the generation reports the same problem, in its own way
        return None


def _usage(last: Delta) -> wire.Usage:
    used = last.usage
    return wire.Usage(
        input_tokens=used.prompt_tokens if used else 0, output_tokens=used.completion_tokens if used else 0
    )


async def _events(
    generation: Generation, message_id: str, model: str, counting: asyncio.Future[int | None]
) -> AsyncIterator[bytes]:
    """message_start, a ping, the content blocks (start, deltas, stop), message_delta, message_stop."""
    try:
        input_tokens = await asyncio.wait_for(counting, COUNT_WAIT_S) or 0
    except TimeoutError:
        input_tokens = 0
    start = wire.MessageResponse(
        id=message_id,
        model=model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=wire.Usage(input_tokens=input_tokens, output_tokens=0),
    )
    yield sse(wire.MessageStart(message=start)) + _PING
    blocks, last = Blocks(events=True), Delta()
    async for _, delta in generation:
        if delta.text or delta.reasoning or delta.tool_calls:
            yield blocks.add(delta)
        if delta.finish_reason is not None:
            last = delta
    reason = stop_reason(last.finish_reason, blocks.tool_use, last.stop_sequence)
    end = wire.MessageDelta(
        delta=wire.MessageDeltaBody(stop_reason=reason, stop_sequence=last.stop_sequence), usage=_usage(last)
    )
    yield blocks.finish() + sse(end) + _STOP


@post("/v1/messages/count_tokens", status_code=200, opt=wire_bodies(wire.PromptRequest, wire.CountTokensResponse))
async def count_tokens(request: Request, serving: NamedDependency[Serving]) -> Response:
    """The prompt's length in tokens, exactly as `POST /v1/messages` would report it in `usage.input_tokens`: the
    same request is built and checked, and the engine counts it; an engine that cannot count (a remote replica
    without /tokenize) prefills it for one token."""
    body = decode_body(await request.body(), wire.PromptRequest)
    build, names = messages_request(body)
    engine, config = serving.resolve(body.model)
    built = build(config, engine.info)
    check_request(built, engine.info, names)
    try:
        tokens = await engine.count_prompt_tokens(built)
    except InvalidRequestError as exc:
        if exc.param is not None:
            exc.param = names(exc.param)
        raise
    if tokens is None:
        one = msgspec.structs.replace(built, sampling=msgspec.structs.replace(built.sampling, max_tokens=1))
        generation = await serving.generate(request, body.model, lambda _m, _i: one, names=names)
        tokens = (await generation.collect())[0].prompt_tokens
    return _json(wire.CountTokensResponse(input_tokens=tokens))


# -- GET /v1/models for Anthropic clients -------------------------------------------------------------------


def models_answer(request: Request, registry: EngineRegistry, model_id: str | None = None) -> Response | None:
    """Anthropic's model list (or one model) for a `/v1/models` request that carries `anthropic-version`, when
    this route set is mounted; None for anyone else (the OpenAI routes answer them)."""
    if "anthropic-version" not in request.headers or not request.app.state.get(STATE_KEY):
        return None
    try:
        if model_id is not None:
            engine, _ = registry.resolve(model_id)
            return _json(_model(model_id, engine))
        return _json(_page([_model(name, engine) for name, engine in registry], request))
    except LitestarLLMError as exc:
        return handle(request, exc)


def _model(name: str, engine: Engine) -> wire.ModelInfo:
    info = engine.info
    created = datetime.fromtimestamp(info.created or info.modified_at or time.time(), UTC)
    return wire.ModelInfo(id=name, display_name=name, created_at=created.isoformat().replace("+00:00", "Z"))


def _page(models: list[wire.ModelInfo], request: Request) -> wire.ModelList:
    """Anthropic's pagination: `limit` (1 to 1000, default 20), `after_id` or `before_id`."""
    query = request.query_params
    try:
        limit = int(query.get("limit") or 20)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise InvalidRequestError("limit: must be an integer from 1 to 1000", param="limit")
    ids = [m.id for m in models]
    after, before = query.get("after_id"), query.get("before_id")
    for name, value in (("after_id", after), ("before_id", before)):
        if value is not None and value not in ids:
            raise InvalidRequestError(f"{name}: no model has the id '{value}'", param=name)
    if after is not None:
        start = ids.index(after) + 1
        page, has_more = models[start : start + limit], start + limit < len(models)
    elif before is not None:
        end = ids.index(before)
        start = max(end - limit, 0)
        page, has_more = models[start:end], start > 0
    else:
        page, has_more = models[:limit], limit < len(models)
    return wire.ModelList(
        data=page,
        has_more=has_more,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )


def anthropic_router() -> Router:
    return Router(
        path="/",
        route_handlers=[create_message, count_tokens],
        dependencies={"serving": Provide(provide_serving, use_cache=True, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        tags=["Anthropic"],
    )
