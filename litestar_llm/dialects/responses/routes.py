"""The Responses API route set: POST /v1/responses, GET and DELETE /v1/responses/{id}. HTTP only; the mapping
lives in `translate.py`, storage in `store.py`, and errors take the OpenAI dialect's shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from litestar_llm.dialects.common import guarded_stream, unless_disconnected
from litestar_llm.dialects.openai import wire as openai_wire
from litestar_llm.dialects.openai.errors import decode_body, error_body, handle
from litestar_llm.dialects.openai.translate import accumulate
from litestar_llm.dialects.responses import wire
from litestar_llm.dialects.responses.store import ResponseNotFoundError, ResponseStore, StoredResponse, store_provider
from litestar_llm.dialects.responses.translate import (
    check_supported,
    failed,
    finished,
    generation_request,
    in_progress,
    input_messages,
    message,
    usage,
)
from litestar_llm.engine.base import generate_choices
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import ChatMessage, Delta
from litestar_llm.errors import InvalidRequestError, LitestarLLMError

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
encode = wire.encoder.encode
# The engine names the chat fields; a Responses client sent these instead.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input"}


class EventWriter:
    """Frames one stream's events as typed SSE (`event: <type>`), numbering them from 0 as OpenAI does."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, event: msgspec.Struct) -> bytes:
        event.sequence_number = self.sequence
        self.sequence += 1
        return b"event: " + event.type.encode() + b"\ndata: " + encode(event) + b"\n\n"

    def error(self, exc: Exception) -> bytes:
        """Anything that escapes the event generator itself (it turns engine errors into response.failed)."""
        error = error_body(exc)[1].error
        return self(wire.ErrorEvent(code=error.code, message=error.message, param=error.param))


@post("/v1/responses", status_code=200)
async def create_response(
    request: Request, registry: NamedDependency[EngineRegistry], responses: NamedDependency[ResponseStore]
) -> Response:
    body = decode_body(await request.body(), wire.CreateResponse)
    engine, model = registry.resolve(body.model)
    check_supported(body, engine.info)
    history: list[ChatMessage] = []
    if body.previous_response_id:
        previous = await responses.get(body.previous_response_id)
        if previous is None:
            raise ResponseNotFoundError(
                f"Previous response with id '{body.previous_response_id}' not found.", param="previous_response_id"
            )
        history = previous.conversation()
    conversation = history + input_messages(body)
    generation = generation_request(body, conversation, model.defaults)
    stream = generate_choices(engine, [generation])
    first = await anext(stream)  # errors before the first token still get a proper status code
    draft = in_progress(body, generation.sampling, f"resp_{uuid.uuid4().hex}", int(time.time()))
    item_id = f"msg_{uuid.uuid4().hex}"
    saved = ResponseSaver(responses, body.store, conversation)
    if body.stream:
        events = EventWriter()
        chunks = response_events(stream, first, events, draft, item_id, saved)
        return guarded_stream(chunks, stream, events.error, "text/event-stream", SSE_HEADERS)
    [choice] = (await unless_disconnected(request, accumulate(stream, first))).values()
    used = usage(choice.prompt_tokens, choice.completion_tokens)
    done = finished(draft, item_id, choice.text, choice.finish_reason, used, int(time.time()))
    return Response(await saved(done, choice.text), media_type=JSON)


class ResponseSaver:
    """Stores a finished response (when the request asked to) and hands back its encoding."""

    def __init__(self, responses: ResponseStore, store: bool, conversation: list[ChatMessage]) -> None:
        self.responses, self.store, self.conversation = responses, store, conversation

    async def __call__(self, response: wire.Response, text: str) -> bytes:
        encoded = encode(response)
        if self.store:
            record = StoredResponse(
                owner=self.responses.owner,
                messages=self.conversation,
                output_text=text,
                status=response.status,
                response=msgspec.Raw(encoded),
            )
            await self.responses.put(response.id, record)
        return encoded


async def response_events(
    stream: AsyncIterator[tuple[int, Delta]],
    first: tuple[int, Delta],
    events: EventWriter,
    draft: wire.Response,
    item_id: str,
    saved: ResponseSaver,
) -> AsyncIterator[bytes]:
    yield events(wire.ResponseEvent(type="response.created", response=draft))
    yield events(wire.ResponseEvent(type="response.in_progress", response=draft))
    yield events(wire.OutputItemEvent(type="response.output_item.added", item=message(item_id, "", "in_progress")))
    yield events(
        wire.ContentPartEvent(type="response.content_part.added", item_id=item_id, part=wire.OutputText(text=""))
    )
    texts: list[str] = []
    prompt_tokens = completion_tokens = 0
    finish_reason = None
    _, delta = first
    try:
        while True:
            if delta.text:
                texts.append(delta.text)
                yield events(wire.TextDeltaEvent(item_id=item_id, delta=delta.text))
            if delta.usage is not None:
                prompt_tokens, completion_tokens = delta.usage.prompt_tokens, delta.usage.completion_tokens
            finish_reason = delta.finish_reason or finish_reason
            try:
                _, delta = await anext(stream)
            except StopAsyncIteration:
                break
    except Exception as exc:  # the engine failed mid-stream: the response fails, as OpenAI reports it
        status_code, error = error_body(exc)
        response = failed(draft, status_code, error.error.message)
        await saved(response, "")
        yield events(wire.ResponseEvent(type="response.failed", response=response))
        return
    text = "".join(texts)
    used = usage(prompt_tokens, completion_tokens)
    done = finished(draft, item_id, text, finish_reason, used, int(time.time()))
    item = done.output[0]
    yield events(wire.TextDoneEvent(item_id=item_id, text=text))
    yield events(wire.ContentPartEvent(type="response.content_part.done", item_id=item_id, part=item.content[0]))
    yield events(wire.OutputItemEvent(type="response.output_item.done", item=item))
    await saved(done, text)  # stored before the client hears it is done, so an immediate GET finds it
    yield events(wire.ResponseEvent(type=f"response.{done.status}", response=done))  # completed or incomplete


@get("/v1/responses/{response_id:str}")
async def retrieve_response(response_id: FromPath[str], responses: NamedDependency[ResponseStore]) -> Response:
    record = await responses.get(response_id)
    if record is None:
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found.")
    return Response(bytes(record.response), media_type=JSON)


@delete("/v1/responses/{response_id:str}", status_code=200)
async def delete_response(response_id: FromPath[str], responses: NamedDependency[ResponseStore]) -> Response:
    if not await responses.delete(response_id):
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found.")
    return Response(encode(wire.DeletedResponse(id=response_id)), media_type=JSON)


def _handle(request: Request, exc: Exception) -> Response[bytes]:
    if isinstance(exc, ResponseNotFoundError):  # not a model: no model_not_found code
        error = openai_wire.Error(message=exc.message, type="invalid_request_error", param=exc.param)
        return Response(encode(openai_wire.ErrorResponse(error)), status_code=404, media_type=JSON)
    if isinstance(exc, InvalidRequestError) and exc.param in _PARAMS:
        exc = InvalidRequestError(exc.message, param=_PARAMS[exc.param])
    return handle(request, exc)


def responses_router(ttl_s: int) -> Router:
    return Router(
        path="/",
        route_handlers=[create_response, retrieve_response, delete_response],
        dependencies={"responses": Provide(store_provider(ttl_s), sync_to_thread=False)},
        exception_handlers={Exception: _handle, LitestarLLMError: _handle},
        tags=["OpenAI Responses"],
    )
