"""The OpenAI route set: /v1/models, /v1/chat/completions, /v1/completions. HTTP only; the mapping lives in
`translate.py`, the errors in `errors.py`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from litestar_llm.dialects.common import guarded_stream, unless_disconnected
from litestar_llm.dialects.openai import wire
from litestar_llm.dialects.openai.errors import decode_body, exception_handlers, sse_error
from litestar_llm.dialects.openai.translate import (
    accumulate,
    chat_request,
    completion_logprobs,
    completion_requests,
    token_logprob,
    usage_of,
)
from litestar_llm.engine.base import generate_choices
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Delta

JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
encode = wire.encoder.encode


def _json(obj: msgspec.Struct, status_code: int = 200) -> Response[bytes]:
    return Response(encode(obj), media_type=JSON, status_code=status_code)


def _sse(obj: msgspec.Struct) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


def _event_stream(chunks: AsyncIterator[bytes], deltas: AsyncIterator) -> Stream:
    return guarded_stream(chunks, deltas, sse_error, "text/event-stream", SSE_HEADERS)


@get("/v1/models")
async def list_models(registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    data = [wire.Model(id=name, created=engine.info.created, owned_by="litestar-llm") for name, engine in registry]
    return _json(wire.ModelList(data=data))


@get("/v1/models/{model_id:path}")
async def get_model(model_id: FromPath[str], registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    model_id = model_id.lstrip("/")
    engine, _config = registry.resolve(model_id)
    return _json(wire.Model(id=model_id, created=engine.info.created, owned_by="litestar-llm"))


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    body = decode_body(await request.body(), wire.ChatCompletionRequest)
    engine, model = registry.resolve(body.model)
    generation = chat_request(body, model.defaults, engine.info)
    stream = generate_choices(engine, [generation])
    first = await anext(stream)  # errors before the first token still get a proper status code
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(stream, first, response_id, created, body.model, body.n, include_usage)
        return _event_stream(chunks, stream)
    choices = await unless_disconnected(request, accumulate(stream, first))
    return _json(
        wire.ChatCompletion(
            id=response_id,
            created=created,
            model=body.model,
            choices=[
                wire.ChatChoice(
                    index=i,
                    message=wire.AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=wire.ChoiceLogprobs(content=[token_logprob(lp) for lp in c.logprobs])
                    if body.logprobs
                    else None,
                )
                for i, c in choices.items()
            ],
            usage=usage_of(choices, body.n),
        )
    )


async def _chat_chunks(
    stream: AsyncIterator[tuple[int, Delta]],
    first: tuple[int, Delta],
    response_id: str,
    created: int,
    model: str,
    n: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[wire.ChunkChoice]) -> bytes:
        return _sse(wire.ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices))

    for index in range(n):  # OpenAI opens every choice with its role
        yield chunk([wire.ChunkChoice(index=index, delta=wire.ChunkDelta(role="assistant", content=""))])
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    index, delta = first
    while True:
        logprobs = None
        if delta.logprobs is not None:
            logprobs = wire.ChoiceLogprobs(content=[token_logprob(lp) for lp in delta.logprobs])
        if delta.text or delta.finish_reason or logprobs:
            content = wire.ChunkDelta(content=delta.text) if delta.text else wire.ChunkDelta()
            yield chunk(
                [wire.ChunkChoice(index=index, delta=content, finish_reason=delta.finish_reason, logprobs=logprobs)]
            )
        if delta.usage is not None:
            prompt_tokens[index // n] = delta.usage.prompt_tokens
            completion_tokens += delta.usage.completion_tokens
        try:
            index, delta = await anext(stream)
        except StopAsyncIteration:
            break
    if include_usage:
        prompt = sum(prompt_tokens.values())
        usage = wire.Usage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
        )
        yield _sse(wire.ChatCompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage))
    yield DONE


@post("/v1/completions", status_code=200)
async def completions(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    body = decode_body(await request.body(), wire.CompletionRequest)
    engine, model = registry.resolve(body.model)
    generations = completion_requests(body, model.defaults)
    stream = generate_choices(engine, generations)
    first = await anext(stream)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [g.prompt if body.echo and isinstance(g.prompt, str) else "" for g in generations]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _completion_chunks(stream, first, response_id, created, body, echoes, include_usage)
        return _event_stream(chunks, stream)
    choices = await unless_disconnected(request, accumulate(stream, first))
    out = []
    for i, c in choices.items():
        echo = echoes[i // body.n]
        logprobs = completion_logprobs(c.logprobs, len(echo)) if body.logprobs is not None else None
        out.append(wire.CompletionChoice(index=i, text=echo + c.text, finish_reason=c.finish_reason, logprobs=logprobs))
    return _json(
        wire.Completion(id=response_id, created=created, model=body.model, choices=out, usage=usage_of(choices, body.n))
    )


async def _completion_chunks(
    stream: AsyncIterator[tuple[int, Delta]],
    first: tuple[int, Delta],
    response_id: str,
    created: int,
    body: wire.CompletionRequest,
    echoes: list[str],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(choice: wire.CompletionChoice) -> bytes:
        return _sse(wire.Completion(id=response_id, created=created, model=body.model, choices=[choice]))

    offsets = {i: len(echoes[i // body.n]) for i in range(len(echoes) * body.n)}
    for i, echo in offsets.items():
        if echo:
            yield chunk(wire.CompletionChoice(index=i, text=echoes[i // body.n], finish_reason=None))
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    index, delta = first
    while True:
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = completion_logprobs(delta.logprobs, offsets[index])
        offsets[index] += len(delta.text)
        if delta.text or delta.finish_reason or logprobs:
            yield chunk(
                wire.CompletionChoice(
                    index=index, text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
                )
            )
        if delta.usage is not None:
            prompt_tokens[index // body.n] = delta.usage.prompt_tokens
            completion_tokens += delta.usage.completion_tokens
        try:
            index, delta = await anext(stream)
        except StopAsyncIteration:
            break
    if include_usage:
        prompt = sum(prompt_tokens.values())
        usage = wire.Usage(
            prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens
        )
        yield _sse(wire.Completion(id=response_id, created=created, model=body.model, choices=[], usage=usage))
    yield DONE


def openai_router() -> Router:
    return Router(
        path="/",
        route_handlers=[list_models, get_model, chat_completions, completions],
        exception_handlers=exception_handlers(),
        tags=["OpenAI"],
    )
