"""Ollama's wire format as msgspec Structs (Ollama's OpenAPI description and the `ollama` client's models).

Responses use `omit_defaults`: like Ollama, stats that are zero (and fields that are unset) are left out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct


class Options(Struct, kw_only=True):
    """Ollama's `options`. Unknown options are ignored, as Ollama ignores them."""

    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    num_ctx: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class Function(Struct, kw_only=True):
    name: str
    arguments: dict[str, Any] | str = {}
    """An object (Ollama's way); JSON text is accepted too."""


class ToolCall(Struct, kw_only=True, omit_defaults=True):
    function: Function
    id: str | None = None


class FunctionSpec(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(Struct, kw_only=True):
    function: FunctionSpec
    type: Literal["function"] = "function"


class Message(Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class GenerateRequest(Struct, kw_only=True):
    model: str
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    format: str | dict[str, Any] | None = None
    raw: bool = False
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: str | float | None = None
    options: Options | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ChatRequest(Struct, kw_only=True):
    model: str
    messages: list[Message] = []
    tools: list[ToolSpec] | None = None
    format: str | dict[str, Any] | None = None
    stream: bool = True
    think: bool | Literal["low", "medium", "high"] | None = None
    keep_alive: str | float | None = None
    options: Options | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class ModelRequest(Struct, kw_only=True):
    """/api/show, /api/delete, /api/pull, /api/push: a model name (`name` is the older spelling)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False
    stream: bool = True
    """/api/pull: progress as NDJSON lines (Ollama's default), or one object at the end."""

    @property
    def model_name(self) -> str | None:
        return self.model or self.name


class EmbedRequest(Struct, kw_only=True):
    model: str
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: str | float | None = None


class EmbeddingsRequest(Struct, kw_only=True):
    model: str
    prompt: str = ""
    options: Options | None = None
    keep_alive: str | float | None = None


# -- responses ----------------------------------------------------------------------------------------------


class TokenLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int]


class Logprob(Struct, omit_defaults=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TokenLogprob] | None = None


class Final(Struct, kw_only=True, omit_defaults=True):
    """The stats every final object carries; zero stats are omitted."""

    model: str
    created_at: str
    done: bool  # always sent, false included
    done_reason: str | None = None
    total_duration: int = 0
    load_duration: int | None = None
    """Always sent in a final object, as Ollama does (0 here: models are loaded before their requests)."""
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


class GenerateChunk(Final, kw_only=True, omit_defaults=True):
    response: str  # always sent, "" included, as Ollama does
    thinking: str | None = None
    context: list[int] | None = None
    logprobs: list[Logprob] | None = None


class Reply(Struct, kw_only=True, omit_defaults=True):
    """The assistant message in a chat answer: role and content always sent (no defaults, so never omitted)."""

    role: str
    content: str
    thinking: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChunk(Final, kw_only=True, omit_defaults=True):
    message: Reply
    logprobs: list[Logprob] | None = None


class ModelDetails(Struct, omit_defaults=True):
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str
    parent_model: str = ""


class ModelSummary(Struct, kw_only=True):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class RunningModel(Struct, kw_only=True):
    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int


class ListResponse(Struct):
    models: list[ModelSummary]


class PsResponse(Struct):
    models: list[RunningModel]


class ShowResponse(Struct, kw_only=True, omit_defaults=True):
    modified_at: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    template: str = ""
    parameters: str = ""
    license: str = ""
    modelfile: str = ""


class EmbedResponse(Struct, kw_only=True, omit_defaults=True):
    model: str
    embeddings: list[list[float]]
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class EmbeddingsResponse(Struct):
    embedding: list[float]


class Error(Struct):
    error: str


encoder = msgspec.json.Encoder()
