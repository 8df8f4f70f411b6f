"""The engine contract: one generation request in, one async stream of deltas out.

Dialects build a `GenerationRequest` from their wire format and encode `Delta`s back into it; backends turn a
`GenerationRequest` into `Delta`s. Neither side knows the other.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "cancelled"]


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str


class SamplingParams(msgspec.Struct, kw_only=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 keeps every token."""
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    """None: up to the model's context length."""
    stop: list[str] = []
    logprobs: int | None = None
    """None: no logprobs; 0: the sampled token's only; k: also the k most likely alternatives."""
    json_object: bool = False
    """Constrain the output to one JSON object (OpenAI `response_format: json_object`, Ollama `format: "json"`).
    Only for engines whose `ModelInfo.structured_output` is true."""
    json_schema: dict[str, Any] | None = None
    """Constrain the output to JSON that matches this JSON schema (the schema itself: OpenAI's
    `response_format.json_schema.schema`, Ollama's `format` object). Wins over `json_object`."""


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Exactly one of `messages` (chat, rendered with the model's template) or `prompt` (text or token ids)."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    n: int = 1
    """Independent choices for this request; backends without native support get n separate requests."""
    add_generation_prompt: bool = True


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    """The token's text as the tokenizer decodes it alone."""
    token_id: int
    logprob: float


class TokenLogprob(TopLogprob, kw_only=True):
    top: list[TopLogprob] = []
    """The most likely alternatives at this position, best first."""


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    queue_s: float = 0.0
    """From submission until prefill began."""
    prompt_s: float = 0.0
    """Prefill: from the start of prompt processing to the first token."""
    decode_s: float = 0.0
    """From the first token to the last."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Delta(msgspec.Struct, kw_only=True):
    """What one decode step added to one sequence. The last delta carries `finish_reason` and `usage`."""

    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
