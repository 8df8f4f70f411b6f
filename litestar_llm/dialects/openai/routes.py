"""The OpenAI route set: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings. HTTP only; the mapping
lives in `translate.py`, the errors in `errors.py`, and everything between decoding and encoding in the serving
layer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from msgspec import UNSET

from litestar_llm.dialects.anthropic.routes import models_answer
from litestar_llm.dialects.common import wire_bodies
from litestar_llm.dialects.openai import wire
from litestar_llm.dialects.openai.errors import decode_body, exception_handlers, sse_error
from litestar_llm.dialects.openai.translate import (
    STRUCTURED_NAMES,
    chat_request,
    completion_logprobs,
    completion_requests,
    embedding_request,
    encoded_embedding,
    param_name,
    token_logprob,
    tool_call_fragments,
    tool_calls,
    usage,
)
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Usage
from litestar_llm.serving import Choice, Generation, Serving, provide_serving, total_usage

JSON = "application/json"
SSE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"
encode = wire.encoder.encode
_COMPLETION_NAMES = {"logprobs": "logprobs", "messages": "prompt", **STRUCTURED_NAMES}


def _json(obj: msgspec.Struct, status_code: int = 200) -> Response[bytes]:
    return Response(encode(obj), media_type=JSON, status_code=status_code)


def _sse(obj: msgspec.Struct) -> bytes:
    return b"data: " + encode(obj) + b"\n\n"


@get("/v1/models", opt=wire_bodies(response=wire.ModelList))
async def list_models(request: Request, registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    if (anthropic := models_answer(request, registry)) is not None:  # a client that sent anthropic-version
        return anthropic
    data = [wire.Model(id=name, created=engine.info.created, owned_by="litestar-llm") for name, engine in registry]
    return _json(wire.ModelList(data=data))


@get("/v1/models/{model_id:path}", opt=wire_bodies(response=wire.Model))
async def get_model(
    request: Request, model_id: FromPath[str], registry: NamedDependency[EngineRegistry]
) -> Response[bytes]:
    model_id = model_id.lstrip("/")
    if (anthropic := models_answer(request, registry, model_id)) is not None:
        return anthropic
    engine, _config = registry.resolve(model_id)
    return _json(wire.Model(id=model_id, created=engine.info.created, owned_by="litestar-llm"))


def _message(choice: Choice, reasoning: bool) -> wire.AssistantMessage:
    calls = choice.tool_calls
    message = wire.AssistantMessage(content=choice.text if choice.text or not calls else None)
    if calls:
        message.tool_calls = tool_calls(calls)
    if reasoning and choice.reasoning:
        message.reasoning = message.reasoning_content = choice.reasoning
    return message


@post(
    "/v1/chat/completions",
    status_code=200,
    opt=wire_bodies(wire.ChatCompletionRequest, wire.ChatCompletion, wire.ChatCompletionChunk),
)
async def chat_completions(request: Request, serving: NamedDependency[Serving]) -> Response:
    body = decode_body(await request.body(), wire.ChatCompletionRequest)
    generation = await serving.generate(request, body.model, chat_request(body), names=param_name)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chat_chunks(generation, response_id, created, body.model, include_usage)
        return generation.respond(chunks, sse_error, SSE, SSE_HEADERS)
    choices = await generation.collect()
    return _json(
        wire.ChatCompletion(
            id=response_id,
            created=created,
            model=body.model,
            choices=[
                wire.ChatChoice(
                    index=i,
                    message=_message(c, reasoning=True),
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_sequence or UNSET,
                    logprobs=wire.ChoiceLogprobs(content=[token_logprob(lp) for lp in c.logprobs])
                    if body.logprobs
                    else None,
                )
                for i, c in choices.items()
            ],
            usage=usage(total_usage({i: c.usage for i, c in choices.items()}, body.n)),
        )
    )


async def _chat_chunks(
    generation: Generation, response_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(choices: list[wire.ChunkChoice]) -> bytes:
        return _sse(wire.ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices))

    for index in range(generation.n * len(generation.requests)):  # OpenAI opens every choice with its role
        yield chunk([wire.ChunkChoice(index=index, delta=wire.ChunkDelta(role="assistant", content=""))])
    usages: dict[int, Usage] = {}
    async for index, delta in generation:
        logprobs = None
        if delta.logprobs is not None:
            logprobs = wire.ChoiceLogprobs(content=[token_logprob(lp) for lp in delta.logprobs])
        if delta.text or delta.reasoning or delta.tool_calls or delta.finish_reason or logprobs:
            content = wire.ChunkDelta(content=delta.text or None)
            if delta.reasoning:
                content.reasoning = content.reasoning_content = delta.reasoning
            if delta.tool_calls:
                content.tool_calls = tool_call_fragments(delta.tool_calls)
            yield chunk(
                [
                    wire.ChunkChoice(
                        index=index,
                        delta=content,
                        finish_reason=delta.finish_reason,
                        logprobs=logprobs,
                        stop_reason=delta.stop_sequence or UNSET,
                    )
                ]
            )
        if delta.usage is not None:
            usages[index] = delta.usage
    if include_usage:
        used = usage(total_usage(usages, generation.n))
        yield _sse(wire.ChatCompletionChunk(id=response_id, created=created, model=model, choices=[], usage=used))
    yield DONE


@post("/v1/completions", status_code=200, opt=wire_bodies(wire.CompletionRequest, wire.Completion, wire.Completion))
async def completions(request: Request, serving: NamedDependency[Serving]) -> Response:
    body = decode_body(await request.body(), wire.CompletionRequest)
    generation = await serving.generate(request, body.model, completion_requests(body), names=_COMPLETION_NAMES)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [g.prompt if body.echo and isinstance(g.prompt, str) else "" for g in generation.requests]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _completion_chunks(generation, response_id, created, body, echoes, include_usage)
        return generation.respond(chunks, sse_error, SSE, SSE_HEADERS)
    choices = await generation.collect()
    out = []
    for i, c in choices.items():
        echo = echoes[i // body.n]
        logprobs = completion_logprobs(c.logprobs, len(echo)) if body.logprobs is not None else None
        out.append(
            wire.CompletionChoice(
                index=i,
                text=echo + c.text,
                finish_reason=c.finish_reason,
                logprobs=logprobs,
                stop_reason=c.stop_sequence or UNSET,
            )
        )
    used = usage(total_usage({i: c.usage for i, c in choices.items()}, body.n))
    return _json(wire.Completion(id=response_id, created=created, model=body.model, choices=out, usage=used))


async def _completion_chunks(
    generation: Generation,
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
    usages: dict[int, Usage] = {}
    async for index, delta in generation:
        logprobs = None
        if body.logprobs is not None and delta.logprobs:
            logprobs = completion_logprobs(delta.logprobs, offsets[index])
        offsets[index] += len(delta.text)
        if delta.text or delta.finish_reason or logprobs:
            yield chunk(
                wire.CompletionChoice(
                    index=index,
                    text=delta.text,
                    finish_reason=delta.finish_reason,
                    logprobs=logprobs,
                    stop_reason=delta.stop_sequence or UNSET,
                )
            )
        if delta.usage is not None:
            usages[index] = delta.usage
    if include_usage:
        used = usage(total_usage(usages, body.n))
        yield _sse(wire.Completion(id=response_id, created=created, model=body.model, choices=[], usage=used))
    yield DONE


@post("/v1/embeddings", status_code=200, opt=wire_bodies(wire.EmbeddingRequest, wire.EmbeddingList))
async def embeddings(request: Request, serving: NamedDependency[Serving]) -> Response:
    body = decode_body(await request.body(), wire.EmbeddingRequest)
    result = await serving.embed(request, body.model, embedding_request(body))
    data = [
        wire.Embedding(index=i, embedding=encoded_embedding(vector, body.encoding_format))
        for i, vector in enumerate(result.vectors)
    ]
    used = wire.EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return _json(wire.EmbeddingList(data=data, model=body.model, usage=used))


def openai_router() -> Router:
    return Router(
        path="/",
        route_handlers=[list_models, get_model, chat_completions, completions, embeddings],
        dependencies={"serving": Provide(provide_serving, use_cache=True, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        tags=["OpenAI"],
    )
