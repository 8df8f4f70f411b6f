"""The Responses API route set: POST /v1/responses, GET and DELETE /v1/responses/{id}. HTTP only; the mapping
lives in `translate.py`, storage in `store.py`, and errors take the OpenAI dialect's shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator

import msgspec
from litestar import Request, Response, Router, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from litestar_llm.dialects.common import wire_bodies
from litestar_llm.dialects.openai import wire as openai_wire
from litestar_llm.dialects.openai.errors import decode_body, error_body, handle
from litestar_llm.dialects.responses import wire
from litestar_llm.dialects.responses.store import ResponseNotFoundError, ResponseStore, StoredResponse, store_provider
from litestar_llm.dialects.responses.translate import (
    check_supported,
    failed,
    finished,
    function_call,
    generation_request,
    in_progress,
    input_messages,
    message,
    param_name,
    reasoning_item,
    status_of,
    usage,
)
from litestar_llm.engine.types import ChatMessage, ToolCall, ToolCallDelta, Usage
from litestar_llm.errors import LitestarLLMError
from litestar_llm.serving import Generation, Serving, provide_serving, total_usage

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
encode = wire.encoder.encode
STREAM_EVENTS = (
    wire.ResponseEvent,
    wire.OutputItemEvent,
    wire.ContentPartEvent,
    wire.TextDeltaEvent,
    wire.TextDoneEvent,
    wire.ArgumentsDeltaEvent,
    wire.ArgumentsDoneEvent,
    wire.ReasoningDeltaEvent,
    wire.ReasoningDoneEvent,
    wire.ErrorEvent,
)
"""What a streamed response's events hold (documented in /docs)."""


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


@post("/v1/responses", status_code=200, opt=wire_bodies(wire.CreateResponse, wire.Response, STREAM_EVENTS))
async def create_response(
    request: Request, serving: NamedDependency[Serving], responses: NamedDependency[ResponseStore]
) -> Response:
    body = decode_body(await request.body(), wire.CreateResponse)
    check_supported(body)
    history: list[ChatMessage] = []
    if body.previous_response_id:
        previous = await responses.get(body.previous_response_id)
        if previous is None:
            raise ResponseNotFoundError(
                f"Previous response with id '{body.previous_response_id}' not found.", param="previous_response_id"
            )
        history = previous.conversation()
    conversation = history + input_messages(body)
    generation = await serving.generate(request, body.model, generation_request(body, conversation), names=param_name)
    draft = in_progress(body, generation.requests[0].sampling, f"resp_{uuid.uuid4().hex}", int(time.time()))
    saved = ResponseSaver(responses, body.store, conversation)
    if body.stream:
        events = EventWriter()
        chunks = response_events(generation, events, draft, saved)
        return generation.respond(chunks, events.error, "text/event-stream", SSE_HEADERS)
    [choice] = (await generation.collect()).values()
    output: list[wire.OutputItem] = []
    status: wire.ItemStatus = "incomplete" if status_of(choice.finish_reason) == "incomplete" else "completed"
    if choice.reasoning:
        output.append(reasoning_item(f"rs_{uuid.uuid4().hex}", choice.reasoning, status))
    calls = choice.tool_calls
    if choice.text or not calls:
        output.append(message(f"msg_{uuid.uuid4().hex}", choice.text, status))
    output.extend(function_call(f"fc_{uuid.uuid4().hex}", call, status) for call in calls)
    used = usage(total_usage({0: choice.usage}, 1))
    done = finished(draft, output, choice.finish_reason, used, int(time.time()))
    return Response(await saved(done, choice.text, calls), media_type=JSON)


class ResponseSaver:
    """Stores a finished response (when the request asked to) and hands back its encoding."""

    def __init__(self, responses: ResponseStore, store: bool, conversation: list[ChatMessage]) -> None:
        self.responses, self.store, self.conversation = responses, store, conversation

    async def __call__(self, response: wire.Response, text: str, calls: list[ToolCall] | None = None) -> bytes:
        encoded = encode(response)
        if self.store:
            record = StoredResponse(
                owner=self.responses.owner,
                messages=self.conversation,
                output_text=text,
                tool_calls=calls or [],
                status=response.status,
                response=msgspec.Raw(encoded),
            )
            await self.responses.put(response.id, record)
        return encoded


class OutputItems:
    """The output items of a streamed response, opened and closed as the kind of delta changes (thinking, text,
    one function call after another), with the events OpenAI sends for each: an item is added empty, its text
    arrives in deltas, and it is done with its full content."""

    def __init__(self, events: EventWriter) -> None:
        self.events = events
        self.items: list[wire.OutputItem] = []
        self.texts: list[str] = []
        self.calls: list[ToolCall] = []
        self._open: tuple[str, str, int | None] | None = None  # kind, item id, tool-call index
        self._parts: list[str] = []

    def reasoning(self, text: str) -> Iterator[bytes]:
        yield from self._switch("reasoning", None)
        self._parts.append(text)
        yield self.events(wire.ReasoningDeltaEvent(item_id=self._id, output_index=self._index, delta=text))

    def text(self, text: str) -> Iterator[bytes]:
        yield from self._switch("message", None)
        self._parts.append(text)
        self.texts.append(text)
        yield self.events(wire.TextDeltaEvent(item_id=self._id, output_index=self._index, delta=text))

    def call(self, fragment: ToolCallDelta) -> Iterator[bytes]:
        if self._open is None or self._open[0] != "function_call" or self._open[2] != fragment.index:
            yield from self.close()
            self.calls.append(
                ToolCall(id=fragment.id or f"call_{uuid.uuid4().hex}", name=fragment.name or "", arguments="")
            )
            self._open = ("function_call", f"fc_{uuid.uuid4().hex}", fragment.index)
            yield self._added(function_call(self._id, self.calls[-1], "in_progress"))
        if fragment.arguments:
            self._parts.append(fragment.arguments)
            yield self.events(
                wire.ArgumentsDeltaEvent(item_id=self._id, output_index=self._index, delta=fragment.arguments)
            )

    def close(self, status: wire.ItemStatus = "completed") -> Iterator[bytes]:
        if self._open is None:
            return
        kind, item_id, _ = self._open
        text, index = "".join(self._parts), self._index
        if kind == "reasoning":
            item = reasoning_item(item_id, text, status)
            yield self.events(wire.ReasoningDoneEvent(item_id=item_id, output_index=index, text=text))
        elif kind == "message":
            item = message(item_id, text, status)
            yield self.events(wire.TextDoneEvent(item_id=item_id, output_index=index, text=text))
            yield self.events(
                wire.ContentPartEvent(
                    type="response.content_part.done", item_id=item_id, output_index=index, part=item.content[0]
                )
            )
        else:
            call = self.calls[-1] = msgspec.structs.replace(self.calls[-1], arguments=text or "{}")
            item = function_call(item_id, call, status)
            yield self.events(
                wire.ArgumentsDoneEvent(item_id=item_id, output_index=index, name=call.name, arguments=call.arguments)
            )
        self.items.append(item)
        self._open, self._parts = None, []
        yield self.events(wire.OutputItemEvent(type="response.output_item.done", output_index=index, item=item))

    @property
    def _id(self) -> str:
        return self._open[1]

    @property
    def _index(self) -> int:
        return len(self.items)

    def _switch(self, kind: str, call: int | None) -> Iterator[bytes]:
        if self._open is not None and self._open[0] == kind:
            return
        yield from self.close()
        prefix = {"reasoning": "rs", "message": "msg"}[kind]
        self._open = (kind, f"{prefix}_{uuid.uuid4().hex}", call)
        if kind == "reasoning":
            yield self._added(wire.Reasoning(id=self._id, status="in_progress"))
        else:
            yield self._added(wire.OutputMessage(id=self._id, status="in_progress", content=[]))
            yield self.events(
                wire.ContentPartEvent(
                    type="response.content_part.added",
                    item_id=self._id,
                    output_index=self._index,
                    part=wire.OutputText(text=""),
                )
            )

    def _added(self, item: wire.OutputItem) -> bytes:
        return self.events(wire.OutputItemEvent(type="response.output_item.added", output_index=self._index, item=item))


async def response_events(
    generation: Generation, events: EventWriter, draft: wire.Response, saved: ResponseSaver
) -> AsyncIterator[bytes]:
    yield events(wire.ResponseEvent(type="response.created", response=draft))
    yield events(wire.ResponseEvent(type="response.in_progress", response=draft))
    items = OutputItems(events)
    last = Usage(prompt_tokens=0, completion_tokens=0)
    finish_reason = None
    try:
        async for _, delta in generation:
            if delta.reasoning:
                for event in items.reasoning(delta.reasoning):
                    yield event
            if delta.text:
                for event in items.text(delta.text):
                    yield event
            for fragment in delta.tool_calls or ():
                for event in items.call(fragment):
                    yield event
            if delta.usage is not None:
                last = delta.usage
            finish_reason = delta.finish_reason or finish_reason
    except Exception as exc:  # the engine failed mid-stream: the response fails, as OpenAI reports it
        status_code, error = error_body(exc)
        response = failed(draft, status_code, error.error.message)
        await saved(response, "")
        yield events(wire.ResponseEvent(type="response.failed", response=response))
        return
    if not items.items and items._open is None:  # nothing at all was generated: still one (empty) message
        for event in items.text(""):
            yield event
    status = status_of(finish_reason)
    for event in items.close("incomplete" if status == "incomplete" else "completed"):
        yield event
    done = finished(draft, items.items, finish_reason, usage(last), int(time.time()))
    await saved(done, "".join(items.texts), items.calls)  # stored before the client hears it is done
    yield events(wire.ResponseEvent(type=f"response.{done.status}", response=done))  # completed or incomplete


@get("/v1/responses/{response_id:str}", opt=wire_bodies(response=wire.Response))
async def retrieve_response(response_id: FromPath[str], responses: NamedDependency[ResponseStore]) -> Response:
    record = await responses.get(response_id)
    if record is None:
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found.")
    return Response(bytes(record.response), media_type=JSON)


@delete("/v1/responses/{response_id:str}", status_code=200, opt=wire_bodies(response=wire.DeletedResponse))
async def delete_response(response_id: FromPath[str], responses: NamedDependency[ResponseStore]) -> Response:
    if not await responses.delete(response_id):
        raise ResponseNotFoundError(f"Response with id '{response_id}' not found.")
    return Response(encode(wire.DeletedResponse(id=response_id)), media_type=JSON)


def _handle(request: Request, exc: Exception) -> Response[bytes]:
    if isinstance(exc, ResponseNotFoundError):  # not a model: no model_not_found code
        error = openai_wire.Error(message=exc.message, type="invalid_request_error", param=exc.param)
        return Response(encode(openai_wire.ErrorResponse(error)), status_code=404, media_type=JSON)
    return handle(request, exc)


def responses_router(ttl_s: int) -> Router:
    return Router(
        path="/",
        route_handlers=[create_response, retrieve_response, delete_response],
        dependencies={
            "responses": Provide(store_provider(ttl_s), sync_to_thread=False),
            "serving": Provide(provide_serving, use_cache=True, sync_to_thread=False),
        },
        exception_handlers={Exception: _handle, LitestarLLMError: _handle},
        tags=["OpenAI Responses"],
    )
