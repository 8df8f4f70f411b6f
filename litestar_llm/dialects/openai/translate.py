"""OpenAI wire requests → the engine's GenerationRequest, and engine deltas → OpenAI response objects."""

from __future__ import annotations

import array
import base64
import json
import re
import sys
from collections.abc import Callable

from msgspec import UNSET

from litestar_llm.config import ModelConfig
from litestar_llm.dialects.common import arguments_text, strict_schema
from litestar_llm.dialects.openai import wire
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import (
    ChatMessage,
    EmbeddingRequest,
    GenerationRequest,
    NamedToolChoice,
    ReasoningOptions,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from litestar_llm.errors import InvalidRequestError
from litestar_llm.serving import sampling


def sent_sampling(body: wire.Request, *, max_tokens: object, logprobs: int | None) -> dict[str, object]:
    """The sampling values the client sent, under the engine's names (None or UNSET: not sent)."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    sent = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "seed": body.seed,
        "max_tokens": max_tokens,
        "stop": stop,
        "logprobs": logprobs,
    }
    return {k: v for k, v in sent.items() if v is not UNSET and v is not None}


def _message_text(message: wire.ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text":
            raise InvalidRequestError(
                f"content parts of type '{part.type}' are not supported by this server; send text",
                param=f"messages[{index}].content[{j}]",
            )
        texts.append(part.text or "")
    return "".join(texts)


def _message(message: wire.ChatMessage, index: int) -> ChatMessage:
    calls = [
        ToolCall(
            id=call.id,
            name=call.function.name,
            arguments=arguments_text(call.function.arguments, f"messages[{index}].tool_calls[{j}].function.arguments"),
        )
        for j, call in enumerate(message.tool_calls or ())
    ]
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequestError(
            f"messages[{index}].tool_call_id: required for a tool message", param=f"messages[{index}].tool_call_id"
        )
    return ChatMessage(
        role="system" if message.role == "developer" else message.role,
        content=_message_text(message, index),
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
        reasoning=message.reasoning or message.reasoning_content,
    )


def tools_of(specs: list[wire.ToolSpec] | None) -> list[Tool]:
    return [
        Tool(
            name=t.function.name,
            description=t.function.description,
            parameters=t.function.parameters if t.function.parameters is not None else {"type": "object"},
            strict=bool(t.function.strict),
        )
        for t in specs or ()
    ]


def tool_choice_of(choice: str | wire.NamedToolChoice | None) -> ToolChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, wire.NamedToolChoice):
        return NamedToolChoice(name=choice.function.name)
    return choice


def param_name(field: str) -> str:
    """The engine's field names as the chat completions API spells them."""
    field = _TOOLS_FIELD.sub(r"tools[\1].function.\2", field)
    return {"logprobs": "top_logprobs", "tool_name": "name", **STRUCTURED_NAMES}.get(field, field).replace(
        ".tool_name", ".name"
    )


STRUCTURED_NAMES = {f: f"structured_outputs.{f}" for f in ("regex", "choice", "grammar")}


_TOOLS_FIELD = re.compile(r"^tools\[(\d+)\]\.(name|parameters)$")


def chat_request(body: wire.ChatCompletionRequest) -> Callable[[ModelConfig, ModelInfo], GenerationRequest]:
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    tools = tools_of(body.tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not UNSET else body.max_tokens
    sent = sent_sampling(body, max_tokens=max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    sent.update(constraint(body))
    kwargs = body.chat_template_kwargs or {}
    thinking = kwargs.get("enable_thinking")

    def build(model: ModelConfig, _info: ModelInfo) -> GenerationRequest:
        return GenerationRequest(
            model=body.model,
            messages=messages,
            sampling=sampling(sent, model.defaults),
            n=body.n,
            tools=tools,
            tool_choice=tool_choice_of(body.tool_choice),
            parallel_tool_calls=body.parallel_tool_calls,
            reasoning=ReasoningOptions(
                enabled=thinking if isinstance(thinking, bool) else None, effort=body.reasoning_effort
            ),
            chat_template_kwargs=kwargs,
        )

    return build


def constraint(body: wire.Request) -> dict:
    """`response_format` (a strict schema admits no properties it does not name), or vLLM's
    `structured_outputs`: the engine's constraint fields."""
    so = body.structured_outputs
    if so is not None:
        if so.structural_tag is not None:
            raise InvalidRequestError(
                "structured_outputs.structural_tag: not supported by this server", param="structured_outputs"
            )
        given = {k: getattr(so, k) for k in ("json", "regex", "choice", "grammar", "json_object")}
        given = {k: v for k, v in given.items() if v is not None and v is not False}
        if len(given) > 1:
            raise InvalidRequestError(
                "structured_outputs: set exactly one of json, regex, choice, grammar, json_object "
                f"(got {', '.join(given)})",
                param="structured_outputs",
            )
        if body.response_format is not None and body.response_format.type != "text" and given:
            raise InvalidRequestError(
                "structured_outputs: response_format constrains the output already", param="structured_outputs"
            )
        if "json" in given:
            schema = given.pop("json")
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise InvalidRequestError(
                        f"structured_outputs.json: not JSON: {exc}", param="structured_outputs.json"
                    ) from None
            if not isinstance(schema, dict):
                raise InvalidRequestError(
                    "structured_outputs.json: a JSON schema object is required", param="structured_outputs.json"
                )
            given["json_schema"] = schema
        if given:
            return given
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"json_object": True}
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema: a JSON schema object is required",
            param="response_format.json_schema.schema",
        )
    return {"json_schema": strict_schema(schema) if spec.get("strict") is True else schema}


def completion_requests(body: wire.CompletionRequest) -> Callable[[ModelConfig, ModelInfo], list[GenerationRequest]]:
    """One generation request per prompt: choice k of prompt i has index i * n + k, as OpenAI numbers them."""
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported by this server", param="echo")
    prompts = _prompts(body.prompt)
    sent = sent_sampling(body, max_tokens=body.max_tokens, logprobs=body.logprobs) | constraint(body)

    def build(model: ModelConfig, _info: ModelInfo) -> list[GenerationRequest]:
        # OpenAI's default for /v1/completions is 16 tokens; a model default, if declared, wins over it.
        params = sampling(sent, model.defaults, {"max_tokens": 16})
        return [
            GenerationRequest(model=body.model, prompt=p, sampling=params, n=body.n, add_generation_prompt=False)
            for p in prompts
        ]

    return build


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) and p for p in prompt):
        return list(prompt)
    raise InvalidRequestError(
        "prompt must be a string, a list of token ids, or a list of either (not a mix)", param="prompt"
    )


# -- engine deltas → OpenAI objects -------------------------------------------------------------------------


def token_logprob(lp: TokenLogprob) -> wire.TokenLogprob:
    return wire.TokenLogprob(
        token=lp.token,
        logprob=lp.logprob,
        bytes=list(lp.token.encode()),
        top_logprobs=[wire.TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token.encode())) for t in lp.top],
    )


def usage(total: Usage) -> wire.Usage:
    return wire.Usage(
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        total_tokens=total.total_tokens,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=total.cached_prompt_tokens),
        completion_tokens_details=wire.CompletionTokensDetails(reasoning_tokens=total.reasoning_tokens),
    )


def tool_calls(calls: list[ToolCall]) -> list[wire.ToolCall]:
    return [wire.ToolCall(id=c.id, function=wire.FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def tool_call_fragments(fragments: list[ToolCallDelta]) -> list[wire.ToolCallFragment]:
    """OpenAI's streamed tool calls: the first fragment of a call has its id, type and name; later ones add
    argument text."""
    return [
        wire.ToolCallFragment(
            index=f.index,
            id=f.id,
            type="function" if f.id is not None else None,
            function=wire.FunctionCallFragment(name=f.name, arguments=f.arguments if f.arguments or f.name else None),
        )
        for f in fragments
    ]


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> wire.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({t.token: t.logprob for t in lp.top})
        offsets.append(offset)
        offset += len(lp.token)
    return wire.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def embedding_request(body: wire.EmbeddingRequest) -> Callable[[ModelConfig, ModelInfo], EmbeddingRequest]:
    """OpenAI's four shapes of `input` as one list of inputs; an input longer than the context is refused (unless
    vLLM's `truncate_prompt_tokens: -1` asks to cut it)."""
    inputs = _embedding_inputs(body.input)

    def build(_config: ModelConfig, _info: ModelInfo) -> EmbeddingRequest:
        truncate = body.truncate_prompt_tokens == -1
        return EmbeddingRequest(model=body.model, input=inputs, dimensions=body.dimensions, truncate=truncate)

    return build


def _embedding_inputs(value: str | list) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    kinds = {type(item) for item in value}
    if kinds <= {str} or kinds <= {list}:
        return value
    if kinds <= {int}:
        return [value]
    raise InvalidRequestError(
        "input: must be a string, a list of strings, a list of token ids, or a list of token-id lists (not a mix)",
        param="input",
    )


def encoded_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """base64: the vector's float32 values, little-endian, as the openai SDK decodes them (numpy's frombuffer)."""
    if encoding_format != "base64":
        return vector
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")
