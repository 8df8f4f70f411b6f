"""The Ollama route set: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed, and
clear answers for the model-store endpoints, which a server configured by server.toml does not have."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
from litestar import Request, Response, Router, delete, get, head, post
from litestar.di import NamedDependency, Provide
from litestar.response import Stream

from litestar_llm import __version__
from litestar_llm.config import ModelConfig, keep_alive_seconds
from litestar_llm.dialects.common import wire_bodies
from litestar_llm.dialects.ollama import wire
from litestar_llm.dialects.ollama.errors import decode_body, exception_handlers, ndjson_error
from litestar_llm.dialects.ollama.translate import (
    NEVER_EXPIRES,
    chat_request,
    details,
    generate_request,
    logprobs,
    now,
    param_name,
    parameters_text,
    resolve,
    rfc3339,
    tagged,
    tool_calls,
)
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import weights_digest
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Delta, EmbeddingRequest, Usage
from litestar_llm.errors import InvalidRequestError, ModelNotFoundError
from litestar_llm.pull import download_snapshot, hub_repo
from litestar_llm.serving import Choice, Generation, Serving, check_task, provide_serving

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


def _final(
    cls: type, model: str, started: float, usage: Usage | None, finish: str | None, load_s: float, **fields: object
):
    return cls(
        model=model,
        created_at=now(),
        done=True,
        done_reason="stop" if finish == "tool_calls" else finish,
        total_duration=int((time.perf_counter() - started) * NS),
        load_duration=int(load_s * NS),
        prompt_eval_count=usage.prompt_tokens if usage else 0,
        prompt_eval_duration=int(usage.prompt_s * NS) if usage else 0,
        eval_count=usage.completion_tokens if usage else 0,
        eval_duration=int(usage.decode_s * NS) if usage else 0,
        **fields,
    )


def _keep_alive(value: str | float | None) -> float | None:
    try:
        return keep_alive_seconds(value)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), "keep_alive") from None


async def _load_answer(
    serving: Serving, cls: type, model: str, keep_alive: str | float | None, **fields: object
) -> Response[bytes]:
    """An empty prompt is Ollama's load request: the model is loaded (and stays for keep_alive), or with
    keep_alive 0 unloaded. load_duration is the time this request waited for the load."""
    _, config = serving.resolve(model, resolve)
    seconds = _keep_alive(keep_alive)
    started = time.perf_counter()
    if seconds == 0:
        await serving.registry.unload(config.name)
        reason, load_s = "unload", 0.0
    else:
        hold = await serving.registry.acquire(config.name, seconds)
        hold.release()
        reason, load_s = "load", hold.load_s
    return _json(
        cls(
            model=model,
            created_at=now(),
            done=True,
            done_reason=reason,
            load_duration=int(load_s * NS),
            total_duration=int((time.perf_counter() - started) * NS),
            **fields,
        )
    )


@post(
    "/api/generate",
    status_code=200,
    opt=wire_bodies(wire.GenerateRequest, wire.GenerateChunk, wire.GenerateChunk, NDJSON),
)
async def generate(request: Request, serving: NamedDependency[Serving]) -> Response:
    started = time.perf_counter()
    body = decode_body(await request.body(), wire.GenerateRequest)
    if not body.prompt:
        return await _load_answer(serving, wire.GenerateChunk, body.model, body.keep_alive, response="")
    generation = await serving.generate(
        request,
        body.model,
        generate_request(body),
        names=param_name,
        resolver=resolve,
        keep_alive=_keep_alive(body.keep_alive),
    )
    if body.stream:

        def piece(delta: Delta) -> wire.GenerateChunk:
            return wire.GenerateChunk(
                model=body.model,
                created_at=now(),
                done=False,
                response=delta.text,
                thinking=delta.reasoning or None,
                logprobs=logprobs(delta.logprobs),
            )

        def final(delta: Delta, _calls: list) -> msgspec.Struct:
            return _final(
                wire.GenerateChunk,
                body.model,
                started,
                delta.usage,
                delta.finish_reason,
                generation.load_s,
                response="",
            )

        return generation.respond(_lines(generation, piece, final), ndjson_error, NDJSON)
    [choice] = (await generation.collect()).values()
    answer = _final(
        wire.GenerateChunk,
        body.model,
        started,
        choice.usage,
        choice.finish_reason,
        generation.load_s,
        response=choice.text,
        thinking=choice.reasoning or None,
        logprobs=logprobs(choice.logprobs),
    )
    return _json(answer)


@post("/api/chat", status_code=200, opt=wire_bodies(wire.ChatRequest, wire.ChatChunk, wire.ChatChunk, NDJSON))
async def chat(request: Request, serving: NamedDependency[Serving]) -> Response:
    started = time.perf_counter()
    body = decode_body(await request.body(), wire.ChatRequest)
    if not body.messages:
        return await _load_answer(
            serving, wire.ChatChunk, body.model, body.keep_alive, message=wire.Reply(role="assistant", content="")
        )
    generation = await serving.generate(
        request,
        body.model,
        chat_request(body),
        names=param_name,
        resolver=resolve,
        keep_alive=_keep_alive(body.keep_alive),
    )
    if body.stream:

        def piece(delta: Delta) -> wire.ChatChunk:
            message = wire.Reply(role="assistant", content=delta.text, thinking=delta.reasoning or None)
            lps = logprobs(delta.logprobs)
            return wire.ChatChunk(model=body.model, created_at=now(), done=False, message=message, logprobs=lps)

        def final(delta: Delta, calls: list) -> msgspec.Struct:
            message = wire.Reply(role="assistant", content="", tool_calls=tool_calls(calls))
            return _final(
                wire.ChatChunk,
                body.model,
                started,
                delta.usage,
                delta.finish_reason,
                generation.load_s,
                message=message,
            )

        return generation.respond(_lines(generation, piece, final), ndjson_error, NDJSON)
    [choice] = (await generation.collect()).values()
    message = wire.Reply(
        role="assistant",
        content=choice.text,
        thinking=choice.reasoning or None,
        tool_calls=tool_calls(choice.tool_calls),
    )
    return _json(
        _final(
            wire.ChatChunk,
            body.model,
            started,
            choice.usage,
            choice.finish_reason,
            generation.load_s,
            message=message,
            logprobs=logprobs(choice.logprobs),
        )
    )


async def _lines(
    generation: Generation,
    piece: Callable[[Delta], msgspec.Struct],
    final: Callable[[Delta, list], msgspec.Struct],
) -> AsyncIterator[bytes]:
    """NDJSON: one object per delta that carries text or thinking, then the final object with the stats (and the
    tool calls, whole: Ollama sends a call once its arguments are complete)."""
    calls = Choice()
    async for _, delta in generation:
        if delta.text or delta.reasoning or delta.logprobs:
            yield _line(piece(delta))
        if delta.tool_calls:
            calls.add(delta)
        if delta.finish_reason is not None:
            yield _line(final(delta, calls.tool_calls))
            return


# -- embeddings ---------------------------------------------------------------------------------------------


@post("/api/embed", status_code=200, opt=wire_bodies(wire.EmbedRequest, wire.EmbedResponse))
async def embed(request: Request, serving: NamedDependency[Serving]) -> Response:
    started = time.perf_counter()
    body = decode_body(await request.body(), wire.EmbedRequest)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not any(inputs):  # Ollama's load check
        _, config = serving.resolve(body.model, resolve)
        check_task(config, "embed")
        return _json(wire.EmbedResponse(model=body.model, embeddings=[]))
    result = await serving.embed(
        request,
        body.model,
        _embedding(body.model, inputs, body.truncate, body.dimensions),
        keep_alive=_keep_alive(body.keep_alive),
    )
    return _json(
        wire.EmbedResponse(
            model=body.model,
            embeddings=result.vectors,
            total_duration=int((time.perf_counter() - started) * NS),
            load_duration=int(result.load_s * NS),
            prompt_eval_count=result.prompt_tokens,
        )
    )


@post("/api/embeddings", status_code=200, opt=wire_bodies(wire.EmbeddingsRequest, wire.EmbeddingsResponse))
async def embeddings(request: Request, serving: NamedDependency[Serving]) -> Response:
    """The older endpoint: one `prompt`, one `embedding`."""
    body = decode_body(await request.body(), wire.EmbeddingsRequest)
    if not body.prompt:
        _, config = serving.resolve(body.model, resolve)
        check_task(config, "embed")
        return _json(wire.EmbeddingsResponse(embedding=[]))
    result = await serving.embed(
        request, body.model, _embedding(body.model, [body.prompt], True, None), keep_alive=_keep_alive(body.keep_alive)
    )
    return _json(wire.EmbeddingsResponse(embedding=result.vectors[0]))


def _embedding(model: str, inputs: list[str], truncate: bool, dimensions: int | None):
    def build(_config: ModelConfig, _info: ModelInfo) -> EmbeddingRequest:
        return EmbeddingRequest(model=model, input=list(inputs), truncate=truncate, dimensions=dimensions)

    return build


# -- the model catalogue ------------------------------------------------------------------------------------


async def _digest(engine: Engine) -> str:
    source = Path(engine.info.source)
    if not source.is_dir():
        return ""
    return await asyncio.to_thread(weights_digest, str(source), engine.info.modified_at or 0.0)


@get("/api/tags", opt=wire_bodies(response=wire.ListResponse))
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


@get("/api/ps", opt=wire_bodies(response=wire.PsResponse))
async def ps(registry: NamedDependency[EngineRegistry]) -> Response[bytes]:
    running = []
    for name, engine in registry:
        if registry.load_state(name)["state"] != "ready" or not engine.ready:
            continue
        info = engine.info
        expires = registry.expires_at(name)
        running.append(
            wire.RunningModel(
                name=tagged(name),
                model=tagged(name),
                size=info.size_bytes or 0,
                digest=await _digest(engine),
                details=details(info),
                expires_at=NEVER_EXPIRES if expires is None else rfc3339(expires),
                size_vram=(info.size_bytes or 0) if info.on_gpu else 0,
                context_length=info.context_length or 0,
            )
        )
    return _json(wire.PsResponse(models=running))


@post("/api/show", status_code=200, opt=wire_bodies(wire.ModelRequest, wire.ShowResponse))
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
    if info.embeddings:  # a model serves one task
        capabilities = ["embedding"]
    else:
        capabilities = ["completion"] + [
            name for name, able in (("tools", info.tools), ("thinking", info.thinking)) if able
        ]
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


@post("/api/pull", status_code=200, opt=wire_bodies(wire.ModelRequest))
async def pull(request: Request, registry: NamedDependency[EngineRegistry]) -> Response:
    """Pull a declared model: a Hugging Face one is downloaded into the local cache, with its progress streamed
    (files done of all); a folder or remote model is there already. Undeclared models answer 404."""
    body = decode_body(await request.body(), wire.ModelRequest)
    name = body.model_name or ""
    model = next((m for n in (name, tagged(name), name.removesuffix(":latest")) if (m := registry.declared(n))), None)
    if model is None:
        raise ModelNotFoundError(name)
    if not hub_repo(model, registry):
        return _pulled(body.stream)
    progress: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    download = asyncio.ensure_future(asyncio.to_thread(download_snapshot, model.source, progress, loop))
    if not body.stream:
        await download  # raises EngineUnavailableError (503) with the reason
        registry.forget_failure(model.name)
        return _pulled(False)

    async def lines() -> AsyncIterator[bytes]:
        try:
            while not (download.done() and progress.empty()):
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({getter, download}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    done, total = getter.result()
                    yield encode({"status": f"pulling {model.source}", "total": total, "completed": done}) + b"\n"
                else:
                    getter.cancel()
            await download
        except Exception as exc:
            yield ndjson_error(exc)
            return
        registry.forget_failure(model.name)
        yield encode({"status": "success"}) + b"\n"

    return Stream(lines(), media_type=NDJSON)


def _pulled(stream: bool) -> Response:
    if stream:
        return Response(encode({"status": "success"}) + b"\n", media_type=NDJSON)
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
        dependencies={"serving": Provide(provide_serving, use_cache=True, sync_to_thread=False)},
        exception_handlers=exception_handlers(),
        tags=["Ollama"],
    )
