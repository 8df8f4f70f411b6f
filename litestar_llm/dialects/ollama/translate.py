"""Ollama wire requests → the engine's GenerationRequest; engine facts → Ollama's model listings."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec

from litestar_llm.config import ModelConfig, SamplingDefaults
from litestar_llm.dialects.ollama import wire
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import human_count
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import ChatMessage, GenerationRequest, SamplingParams, TokenLogprob
from litestar_llm.errors import InvalidRequestError, ModelNotFoundError

NEVER_EXPIRES = "9999-12-31T23:59:59Z"  # declared models stay loaded for the server's lifetime


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def rfc3339(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp or time.time(), UTC).isoformat().replace("+00:00", "Z")


def tagged(name: str) -> str:
    """Ollama names carry a tag; an untagged name means `:latest`."""
    return name if ":" in name else f"{name}:latest"


def resolve(registry: EngineRegistry, name: str) -> tuple[Engine, ModelConfig]:
    """Resolve with Ollama's `name:tag` convention: `tiny` == `tiny:latest`."""
    candidates = [name, tagged(name)] + ([name.removesuffix(":latest")] if name.endswith(":latest") else [])
    for candidate in candidates:
        try:
            return registry.resolve(candidate)
        except ModelNotFoundError:
            continue
    raise ModelNotFoundError(name)


def sampling(
    options: wire.Options | None, defaults: SamplingDefaults, logprobs: bool, top: int | None
) -> SamplingParams:
    """Request options, else the model's [models.defaults], else the engine's (not Ollama's built-in defaults:
    the same request gets the same text through every dialect)."""
    o = options or wire.Options()

    def pick(sent: object, name: str, fallback: object) -> object:
        if sent is not None:
            return sent
        configured = getattr(defaults, name)
        return configured if configured is not None else fallback

    stop = [o.stop] if isinstance(o.stop, str) else list(o.stop or defaults.stop or [])
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None  # -1, -2: unbounded
    return SamplingParams(
        temperature=pick(o.temperature, "temperature", 1.0),
        top_p=pick(o.top_p, "top_p", 1.0),
        top_k=max(pick(o.top_k, "top_k", 0), 0),
        min_p=pick(o.min_p, "min_p", 0.0),
        seed=pick(o.seed, "seed", None),
        repetition_penalty=pick(o.repeat_penalty, "repetition_penalty", None),
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        max_tokens=max_tokens if max_tokens is not None else defaults.max_tokens,
        stop=stop,
        logprobs=(top or 0) if logprobs else None,
    )


def constrained(params: SamplingParams, format_: str | dict | None, info: ModelInfo) -> SamplingParams:
    """`format`: "json" or a JSON schema, honoured by constrained decoding where the backend has it."""
    if format_ in (None, ""):
        return params
    if format_ != "json" and not isinstance(format_, dict):
        raise InvalidRequestError(f'invalid format {format_!r}: use "json" or a JSON schema')
    if not info.structured_output:
        raise InvalidRequestError(
            f"format needs constrained decoding, which the {info.backend} backend serving '{info.name}' does not "
            "support; use a model on a backend that does (vllm)"
        )
    if isinstance(format_, dict):
        return msgspec.structs.replace(params, json_schema=format_)
    return msgspec.structs.replace(params, json_object=True)


def generate_request(body: wire.GenerateRequest, model: ModelConfig, info: ModelInfo) -> GenerationRequest:
    if body.template:
        raise InvalidRequestError("custom templates are not supported: the model's own chat template is used")
    if body.images:
        raise InvalidRequestError("images are not supported by this server")
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by this server")
    params = constrained(sampling(body.options, model.defaults, body.logprobs, body.top_logprobs), body.format, info)
    if body.raw:
        return GenerationRequest(model=body.model, prompt=body.prompt, sampling=params, add_generation_prompt=False)
    messages = [ChatMessage(role="system", content=body.system)] if body.system else []
    messages.append(ChatMessage(role="user", content=body.prompt))
    return GenerationRequest(model=body.model, messages=messages, sampling=params)


def chat_request(body: wire.ChatRequest, model: ModelConfig, info: ModelInfo) -> GenerationRequest:
    if body.tools:
        raise InvalidRequestError("tools are not supported by this server")
    if any(m.images for m in body.messages):
        raise InvalidRequestError("images are not supported by this server")
    params = constrained(sampling(body.options, model.defaults, body.logprobs, body.top_logprobs), body.format, info)
    return GenerationRequest(
        model=body.model, messages=[ChatMessage(role=m.role, content=m.content) for m in body.messages], sampling=params
    )


def logprobs(values: list[TokenLogprob] | None) -> list[wire.Logprob] | None:
    if not values:
        return None
    return [
        wire.Logprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=list(lp.token.encode()),
            top_logprobs=[wire.TokenLogprob(t.token, t.logprob, list(t.token.encode())) for t in lp.top] or None,
        )
        for lp in values
    ]


def details(info: ModelInfo) -> wire.ModelDetails:
    family = info.family or info.backend
    return wire.ModelDetails(
        format="gguf" if info.source.endswith(".gguf") else "safetensors",
        family=family,
        families=[family],
        parameter_size=human_count(info.parameter_count),
        quantization_level=info.quantization or "",
    )


def parameters_text(defaults: SamplingDefaults) -> str:
    """[models.defaults] in Modelfile `PARAMETER` form, under Ollama's option names."""
    names = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}
    lines = []
    for field in defaults.__struct_fields__:
        value = getattr(defaults, field)
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                lines.append(
                    f"{names.get(field, field)} {item!r}"
                    if isinstance(item, str)
                    else f"{names.get(field, field)} {item}"
                )
    return "\n".join(lines)
