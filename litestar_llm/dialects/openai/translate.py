"""OpenAI wire requests → the engine's GenerationRequest, and engine deltas → OpenAI response objects."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from msgspec import UNSET

from litestar_llm.config import SamplingDefaults
from litestar_llm.dialects.openai import wire
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import ChatMessage, Delta, GenerationRequest, SamplingParams, TokenLogprob
from litestar_llm.errors import InvalidRequestError

# Engine defaults when neither the request nor [models.defaults] says: OpenAI's documented defaults.
_DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def sampling_params(
    body: wire.Request, defaults: SamplingDefaults, *, max_tokens: int | object | None, logprobs: int | None
) -> SamplingParams:
    """The request's values, else the model's defaults, else OpenAI's."""

    def pick(name: str, sent: object) -> object:
        if sent is not UNSET and sent is not None:
            return sent
        configured = getattr(defaults, name)
        return configured if configured is not None else _DEFAULT_SAMPLING.get(name)

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or defaults.stop or [])
    top_k = pick("top_k", body.top_k)
    return SamplingParams(
        temperature=pick("temperature", body.temperature),
        top_p=pick("top_p", body.top_p),
        top_k=max(top_k, 0),  # vLLM's -1 means "all", as 0 does here
        min_p=pick("min_p", body.min_p),
        repetition_penalty=pick("repetition_penalty", body.repetition_penalty),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=pick("seed", body.seed),
        max_tokens=pick("max_tokens", max_tokens),
        stop=stop,
        logprobs=logprobs,
    )


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


def chat_request(body: wire.ChatCompletionRequest, defaults: SamplingDefaults, info: ModelInfo) -> GenerationRequest:
    if body.response_format is not None and body.response_format.type != "text" and not info.structured_output:
        raise InvalidRequestError(
            f"response_format '{body.response_format.type}' needs constrained decoding, which the {info.backend} "
            f"backend serving '{info.name}' does not support",
            param="response_format",
        )
    if body.tools:
        raise InvalidRequestError("tools are not supported by this server", param="tools")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    messages = [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=_message_text(m, i))
        for i, m in enumerate(body.messages)
    ]
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not UNSET else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_params(body, defaults, max_tokens=max_tokens, logprobs=logprobs)
    if body.response_format is not None and body.response_format.type != "text":
        sampling = msgspec.structs.replace(sampling, **_constraint(body.response_format))
    return GenerationRequest(model=body.model, messages=messages, sampling=sampling, n=body.n)


def _constraint(response_format: wire.ResponseFormat) -> dict:
    if response_format.type == "json_object":
        return {"json_object": True}
    schema = (response_format.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema: a JSON schema object is required",
            param="response_format.json_schema.schema",
        )
    return {"json_schema": schema}


def completion_requests(body: wire.CompletionRequest, defaults: SamplingDefaults) -> list[GenerationRequest]:
    """One generation request per prompt: choice k of prompt i has index i * n + k, as OpenAI numbers them."""
    if body.suffix:
        raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported by this server", param="echo")
    prompts = _prompts(body.prompt)
    # OpenAI's default for /v1/completions is 16 tokens; a model default, if declared, wins over it.
    max_tokens = body.max_tokens if body.max_tokens is not UNSET else (defaults.max_tokens or 16)
    sampling = sampling_params(body, defaults, max_tokens=max_tokens, logprobs=body.logprobs)
    return [
        GenerationRequest(model=body.model, prompt=p, sampling=sampling, n=body.n, add_generation_prompt=False)
        for p in prompts
    ]


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


class ChoiceAccumulator:
    """Collects a choice's deltas for a non-streamed answer."""

    __slots__ = ("completion_tokens", "finish_reason", "logprobs", "prompt_tokens", "texts")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.completion_tokens = 0
        self.prompt_tokens = 0

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.usage is not None:
            self.completion_tokens = delta.usage.completion_tokens
            self.prompt_tokens = delta.usage.prompt_tokens

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def accumulate(
    stream: AsyncIterator[tuple[int, Delta]], first: tuple[int, Delta]
) -> dict[int, ChoiceAccumulator]:
    choices: dict[int, ChoiceAccumulator] = {}
    index, delta = first
    choices.setdefault(index, ChoiceAccumulator()).add(delta)
    async for index, delta in stream:
        choices.setdefault(index, ChoiceAccumulator()).add(delta)
    return dict(sorted(choices.items()))


def usage_of(choices: dict[int, ChoiceAccumulator], n: int) -> wire.Usage:
    """Prompt tokens count once per prompt (every n-th choice shares one), completion tokens for every choice."""
    prompt = sum(c.prompt_tokens for i, c in choices.items() if i % n == 0)
    completion = sum(c.completion_tokens for c in choices.values())
    return wire.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> wire.CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for lp in logprobs:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({t.token: t.logprob for t in lp.top})
        offsets.append(offset)
        offset += len(lp.token)
    return wire.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
