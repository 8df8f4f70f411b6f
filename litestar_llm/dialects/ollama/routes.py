"""The Ollama route set: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed, and
clear answers for the model-store endpoints, which a server configured by server.toml does not have."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from litestar import Request, Response, Router, delete, get, head, post
from litestar.di import NamedDependency

from litestar_llm import __version__
from litestar_llm.dialects.common import guarded_stream, unless_disconnected
from litestar_llm.dialects.ollama import wire
from litestar_llm.dialects.ollama.errors import decode_body, exception_handlers, ndjson_error
from litestar_llm.dialects.ollama.translate import (
    NEVER_EXPIRES,
    chat_request,
    details,
    generate_request,
    logprobs,
    now,
    parameters_text,
    resolve,
    rfc3339,
    tagged,
)
from litestar_llm.engine.base import Engine, generate_choices
from litestar_llm.engine.files import weights_digest
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Delta
from litestar_llm.errors import InvalidRequestError

NDJSON = "application/x-ndjson"
encode = wire.encoder.encode
NS = 1_000_000_000


def _json(obj: msgspec.Struct | dict, status_code: int = 200) -> Response[bytes]:
    return Response(encode(obj), media_type="application/json", status_code=status_code)


def _line(obj: msgspec.Struct) -> bytes:
    return encode(obj) + b"\n"


@get("/", include_in_schema=False)
async def root() -> Response[str]:
    return Response("Ollama is running", media_type="text/plain")


@head("/", include_in_schema=False)
async def root_head() -> Response[None]:
    return Response(None, media_type="text/plain")


@get("/api/version")
async def version() -> Response[bytes]:
    return _json({"version": __version__})


@head("/api/version")
async def version_head() -> Response[None]:
    return Response(None, media_type="application/json")


# -- generation ---------------------------------------------------------------------------------------------


def _final(cls: type, model: str, started: float, delta: Delta, **fields: object) -> msgspec.Struct:
    usage = delta.usage
    return cls(
        model=model,
        created_at=now(),
        done=True,
        done_reason=delta.finish_reason,
        total_duration=int((time.perf_counter() - started) * NS),
        prompt_eval_count=usage.prompt_tokens if usage else 0,
        prompt_eval_duration=int(usage.prompt_s * NS) if usage else 0,
        eval_count=usage.completion_tokens if usage else 0,
        eval_duration=int(usage.decode_s * NS) if usage else 0,
        **fields,
    )


def _load_answer(cls: type, model: str, keep_alive: object, **fields: object) -> Response[bytes]:
    """An empty prompt is Ollama's load check (keep_alive 0: unload); models here are always loaded."""
    reason = "unload" if keep_alive in (0, "0", "0s", "0m") else "load"
    return _json(cls(model=model, created_at=now(), done=True, done_reason=reason, **fields))


@post("/api/generate", status_code=200)
async def generate(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    started = time.perf_counter()
    body = decode_body(await request.body(), wire.GenerateRequest)
    engine, model = resolve(registry, body.model)
    if not body.prompt:
        return _load_answer(wire.GenerateChunk, body.model, body.keep_alive, response="")
    stream = generate_choices(engine, [generate_request(body, model, engine.info)])
    _, first = await anext(stream)
    if body.stream:

        def piece(delta: Delta) -> wire.GenerateChunk:
            lps = logprobs(delta.logprobs)
            return wire.GenerateChunk(model=body.model, created_at=now(), done=False, response=delta.text, logprobs=lps)

        def final(delta: Delta) -> msgspec.Struct:
            return _final(wire.GenerateChunk, body.model, started, delta, response="")

        return guarded_stream(_lines(stream, first, piece, final), stream, ndjson_error, NDJSON)
    texts, values, last = await unless_disconnected(request, _collect(stream, first))
    answer = _final(wire.GenerateChunk, body.model, started, last, response="".join(texts), logprobs=logprobs(values))
    return _json(answer)


@post("/api/chat", status_code=200)
async def chat(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    started = time.perf_counter()
    body = decode_body(await request.body(), wire.ChatRequest)
    engine, model = resolve(registry, body.model)
    if not body.messages:
        return _load_answer(wire.ChatChunk, body.model, body.keep_alive, message=wire.Reply(content=""))
    stream = generate_choices(engine, [chat_request(body, model, engine.info)])
    _, first = await anext(stream)
    if body.stream:

        def piece(delta: Delta) -> wire.ChatChunk:
            message, lps = wire.Reply(content=delta.text), logprobs(delta.logprobs)
            return wire.ChatChunk(model=body.model, created_at=now(), done=False, message=message, logprobs=lps)

        def final(delta: Delta) -> msgspec.Struct:
            return _final(wire.ChatChunk, body.model, started, delta, message=wire.Reply(content=""))

        return guarded_stream(_lines(stream, first, piece, final), stream, ndjson_error, NDJSON)
    texts, values, last = await unless_disconnected(request, _collect(stream, first))
    message = wire.Reply(content="".join(texts))
    return _json(_final(wire.ChatChunk, body.model, started, last, message=message, logprobs=logprobs(values)))


async def _lines(
    stream: AsyncIterator[tuple[int, Delta]],
    first: Delta,
    piece: Callable[[Delta], msgspec.Struct],
    final: Callable[[Delta], msgspec.Struct],
) -> AsyncIterator[bytes]:
    """NDJSON: one object per delta that carries text, then the final object with the stats."""
    delta = first
    while True:
        if delta.text or delta.logprobs:
            yield _line(piece(delta))
        if delta.finish_reason is not None:
            yield _line(final(delta))
            return
        _, delta = await anext(stream)


async def _collect(stream: AsyncIterator[tuple[int, Delta]], first: Delta) -> tuple[list[str], list, Delta]:
    texts, values, delta = [first.text], list(first.logprobs or []), first
    async for _, delta in stream:
        texts.append(delta.text)
        values.extend(delta.logprobs or [])
    return texts, values, delta


# -- embeddings ---------------------------------------------------------------------------------------------


@post("/api/embed", status_code=200)
async def embed(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    body = decode_body(await request.body(), wire.EmbedRequest)
    engine, _ = resolve(registry, body.model)
    raise _cannot_embed(engine)


@post("/api/embeddings", status_code=200)
async def embeddings(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    body = decode_body(await request.body(), wire.EmbeddingsRequest)
    engine, _ = resolve(registry, body.model)
    raise _cannot_embed(engine)


def _cannot_embed(engine: Engine) -> InvalidRequestError:
    return InvalidRequestError(
        f"model '{engine.info.name}' cannot embed: its {engine.info.backend} backend serves text generation only"
    )


# -- the model catalogue ------------------------------------------------------------------------------------


async def _digest(engine: Engine) -> str:
    source = Path(engine.info.source)
    if not source.is_dir():
        return ""
    return await asyncio.to_thread(weights_digest, str(source), engine.info.modified_at or 0.0)


@get("/api/tags")
async def tags(registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    models = []
    for name, engine in registry:
        info = engine.info
        models.append(
            wire.ModelSummary(
                name=tagged(name),
                model=tagged(name),
                modified_at=rfc3339(info.modified_at),
                size=info.size_bytes or 0,
                digest=await _digest(engine),
                details=details(info),
            )
        )
    return _json(wire.ListResponse(models=models))


@head("/api/tags")
async def tags_head() -> Response[None]:
    return Response(None, media_type="application/json")


@get("/api/ps")
async def ps(registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    running = []
    for name, engine in registry:
        if not engine.ready:
            continue
        info = engine.info
        running.append(
            wire.RunningModel(
                name=tagged(name),
                model=tagged(name),
                size=info.size_bytes or 0,
                digest=await _digest(engine),
                details=details(info),
                expires_at=NEVER_EXPIRES,
                size_vram=(info.size_bytes or 0) if info.on_gpu else 0,
                context_length=info.context_length or 0,
            )
        )
    return _json(wire.PsResponse(models=running))


@post("/api/show", status_code=200)
async def show(request: Request, registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    body = decode_body(await request.body(), wire.ModelRequest)
    if not body.model_name:
        raise InvalidRequestError("model is required")
    engine, model = resolve(registry, body.model_name)
    info = engine.info
    family = info.family or info.backend
    model_info = {"general.architecture": family, "general.parameter_count": info.parameter_count or 0}
    if info.context_length:
        model_info[f"{family}.context_length"] = info.context_length
    capabilities = ["completion"] + (["embedding"] if info.embeddings else [])
    return _json(
        wire.ShowResponse(
            modified_at=rfc3339(info.modified_at),
            details=details(info),
            model_info=model_info,
            capabilities=capabilities,
            template=info.chat_template or "",
            parameters=parameters_text(model.defaults),
        )
    )


# -- a server.toml deployment has no model store ------------------------------------------------------------

STORE_MESSAGE = "models are declared in server.toml ([[models]]), not managed through the API"


@post("/api/pull", status_code=200)
async def pull(request: Request, registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    """Pulling a model that is already declared succeeds (clients pull before use); anything else says why not."""
    body = decode_body(await request.body(), wire.ModelRequest)
    resolve(registry, body.model_name or "")
    return _json({"status": "success"})


@post(["/api/create", "/api/copy", "/api/push"], status_code=200)
async def model_store(request: Request) -> Response[bytes]:
    raise InvalidRequestError(f"{request.url.path} is not available: {STORE_MESSAGE}")


@delete("/api/delete", status_code=200)
async def delete_model(request: Request) -> Response[bytes]:
    raise InvalidRequestError(f"/api/delete is not available: {STORE_MESSAGE}")


@post(["/api/blobs/{digest:str}"], status_code=200)
async def blobs(request: Request) -> Response[bytes]:
    raise InvalidRequestError(f"/api/blobs is not available: {STORE_MESSAGE}")


def ollama_router() -> Router:
    return Router(
        path="/",
        route_handlers=[
            root,
            root_head,
            version,
            version_head,
            generate,
            chat,
            embed,
            embeddings,
            tags,
            tags_head,
            ps,
            show,
            pull,
            model_store,
            delete_model,
            blobs,
        ],
        exception_handlers=exception_handlers(),
        tags=["Ollama"],
    )
