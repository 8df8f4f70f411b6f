"""Ollama wire requests → the engine's GenerationRequest; engine facts → Ollama's model listings."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from litestar_llm.config import ModelConfig, SamplingDefaults
from litestar_llm.dialects.common import arguments_text
from litestar_llm.dialects.ollama import wire
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import human_count
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import (
    ChatMessage,
    GenerationRequest,
    ReasoningOptions,
    SamplingParams,
    TokenLogprob,
    Tool,
    ToolCall,
)
from litestar_llm.errors import InvalidRequestError, ModelNotFoundError
from litestar_llm.serving import sampling

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


def _sent(options: wire.Options | None, logprobs: bool, top: int | None) -> dict[str, object]:
    """The options the client sent, under the engine's names. Unsent ones come from the model's [models.defaults],
    else the engine's (not Ollama's built-in defaults: the same request gets the same text through every
    dialect)."""
    o = options or wire.Options()
    stop = [o.stop] if isinstance(o.stop, str) else o.stop
    max_tokens = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None  # -1, -2: unbounded
    return {
        "temperature": o.temperature,
        "top_p": o.top_p,
        "top_k": o.top_k,
        "min_p": o.min_p,
        "seed": o.seed,
        "repetition_penalty": o.repeat_penalty,
        "presence_penalty": o.presence_penalty,
        "frequency_penalty": o.frequency_penalty,
        "max_tokens": max_tokens,
        "stop": stop,
        "logprobs": (top or 0) if logprobs else None,
    }


_OPTION_NAMES = {"max_tokens": "num_predict", "repetition_penalty": "repeat_penalty"}


def param_name(field: str) -> str:
    """The engine's field names as Ollama spells them."""
    if field in SamplingParams.__struct_fields__ and field not in ("logprobs", "json_object", "json_schema"):
        return "options." + _OPTION_NAMES.get(field, field)
    field = re.sub(r"^tools\[(\d+)\]\.(name|parameters)$", r"tools[\1].function.\2", field)
    return {"logprobs": "top_logprobs", "response_format": "format"}.get(field, field)


def _format(format_: str | dict | None) -> dict[str, object]:
    """`format`: "json" or a JSON schema, honoured by constrained decoding where the backend has it."""
    if format_ in (None, ""):
        return {}
    if format_ == "json":
        return {"json_object": True}
    if isinstance(format_, dict):
        return {"json_schema": format_}
    raise InvalidRequestError(f'invalid format {format_!r}: use "json" or a JSON schema', param="format")


def _reasoning(think: bool | str | None) -> ReasoningOptions:
    if isinstance(think, str):
        return ReasoningOptions(enabled=True, effort=think)
    return ReasoningOptions(enabled=think)


Builder = Callable[[ModelConfig, ModelInfo], GenerationRequest]


def generate_request(body: wire.GenerateRequest) -> Builder:
    if body.template:
        raise InvalidRequestError("custom templates are not supported: the model's own chat template is used")
    if body.images:
        raise InvalidRequestError("images are not supported by this server")
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by this server")
    sent = _sent(body.options, body.logprobs, body.top_logprobs) | _format(body.format)

    def build(model: ModelConfig, _info: ModelInfo) -> GenerationRequest:
        params = sampling(sent, model.defaults)
        if body.raw:
            return GenerationRequest(model=body.model, prompt=body.prompt, sampling=params, add_generation_prompt=False)
        messages = [ChatMessage(role="system", content=body.system)] if body.system else []
        messages.append(ChatMessage(role="user", content=body.prompt))
        return GenerationRequest(model=body.model, messages=messages, sampling=params, reasoning=_reasoning(body.think))

    return build


def _message(message: wire.Message, index: int, turn: int) -> ChatMessage:
    calls = [
        ToolCall(
            id=call.id or f"call_{turn}_{j}",
            name=call.function.name,
            arguments=arguments_text(call.function.arguments, f"messages[{index}].tool_calls[{j}].function.arguments"),
        )
        for j, call in enumerate(message.tool_calls or ())
    ]
    return ChatMessage(
        role=message.role,
        content=message.content,
        tool_calls=calls,
        name=message.tool_name,
        reasoning=message.thinking,
    )


def _link_results(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Ollama's tool results name their function, not a call: each gets the id of the earliest call to that function
    (or, unnamed, the earliest call) of the assistant turn before it not yet answered. OpenAI-style upstreams and
    chat templates pair results with calls by these ids."""
    pending: list[ToolCall] = []
    for message in messages:
        if message.role == "assistant" and message.tool_calls:
            pending = list(message.tool_calls)
        elif message.role == "tool" and message.tool_call_id is None:
            call = next((c for c in pending if message.name in (None, c.name)), None)
            if call is not None:
                pending.remove(call)
                message.tool_call_id = call.id
    return messages


def chat_request(body: wire.ChatRequest) -> Builder:
    if any(m.images for m in body.messages):
        raise InvalidRequestError("images are not supported by this server")
    sent = _sent(body.options, body.logprobs, body.top_logprobs) | _format(body.format)
    messages = _link_results([_message(m, i, i) for i, m in enumerate(body.messages)])
    tools = [
        Tool(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters if t.function.parameters is not None else {"type": "object"},
        )
        for t in body.tools or ()
    ]

    def build(model: ModelConfig, _info: ModelInfo) -> GenerationRequest:
        return GenerationRequest(
            model=body.model,
            messages=messages,
            sampling=sampling(sent, model.defaults),
            tools=tools,
            reasoning=_reasoning(body.think),
        )

    return build


def tool_calls(calls: list[ToolCall]) -> list[wire.ToolCall] | None:
    """Ollama's calls carry their arguments as an object."""
    if not calls:
        return None
    return [
        wire.ToolCall(function=wire.Function(name=c.name, arguments=_arguments(c.arguments)), id=c.id) for c in calls
    ]


def _arguments(text: str) -> dict | str:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return text  # a model that wrote broken JSON: its text, rather than nothing
    return value if isinstance(value, dict) else text


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
