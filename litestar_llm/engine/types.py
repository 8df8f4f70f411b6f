"""The engine contract: one generation request in, one async stream of deltas out.

Dialects build a `GenerationRequest` from their wire format and encode `Delta`s back into it; backends turn a
`GenerationRequest` into `Delta`s. Neither side knows the other.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]


class TextPart(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


ContentPart = TextPart
"""A part of a message's content; images join this union when vision is served."""


class ToolCall(msgspec.Struct, kw_only=True):
    """A function call the assistant made: `arguments` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    """system, user, assistant or tool."""
    content: str | list[ContentPart] = ""
    tool_calls: list[ToolCall] = []
    """An assistant turn's calls."""
    tool_call_id: str | None = None
    """A tool result: the call it answers."""
    name: str | None = None
    """A tool result: the function's name."""
    reasoning: str | None = None
    """An assistant turn's thinking, sent back by clients that keep it."""

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class Tool(msgspec.Struct, kw_only=True):
    """A function the model may call."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "object", "properties": {}})
    """A JSON schema of type object."""
    strict: bool = False


class NamedToolChoice(msgspec.Struct, kw_only=True):
    name: str


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


class ReasoningOptions(msgspec.Struct, kw_only=True):
    enabled: bool | None = None
    """None: the model's own default (its template decides)."""
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    budget_tokens: int | None = None


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
    regex: str | None = None
    """Constrain the output to this regular expression (vLLM's `structured_outputs.regex`)."""
    choice: list[str] | None = None
    """Constrain the output to exactly one of these strings (vLLM's `structured_outputs.choice`)."""
    grammar: str | None = None
    """Constrain the output to this grammar in Lark syntax (vLLM's `structured_outputs.grammar`)."""

    @property
    def constrained(self) -> bool:
        """Decoding must follow a grammar: JSON, a schema, a regex, a choice or a Lark grammar."""
        return (
            self.json_object
            or self.json_schema is not None
            or self.regex is not None
            or self.choice is not None
            or self.grammar is not None
        )


class GenerationRequest(msgspec.Struct, kw_only=True):
    """Exactly one of `messages` (chat, rendered with the model's template) or `prompt` (text or token ids)."""

    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | list[int] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    n: int = 1
    """Independent choices for this request; backends without native support get n separate requests."""
    add_generation_prompt: bool = True
    tools: list[Tool] = []
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    reasoning: ReasoningOptions = msgspec.field(default_factory=ReasoningOptions)
    chat_template_kwargs: dict[str, Any] = {}
    """Passed to the chat template as they are (`enable_thinking`, ...)."""

    @property
    def offered_tools(self) -> list[Tool]:
        """The tools the template shows the model: none for `tool_choice: "none"`, only the named one when named."""
        if self.tool_choice == "none":
            return []
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.name == self.tool_choice.name]
        return self.tools

    def template_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the chat template: tools, thinking switches, and the client's own."""
        kwargs: dict[str, Any] = {}
        if tools := self.offered_tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description or "", "parameters": t.parameters},
                }
                for t in tools
            ]
        if self.reasoning.enabled is not None:
            kwargs["enable_thinking"] = self.reasoning.enabled
        if self.reasoning.effort is not None:
            kwargs["reasoning_effort"] = self.reasoning.effort
        kwargs.update(self.chat_template_kwargs)
        return kwargs

    @property
    def thinking(self) -> bool:
        """False when the client switched thinking off (then nothing is parsed as reasoning)."""
        return self.reasoning.enabled is not False and self.chat_template_kwargs.get("enable_thinking") is not False


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
    reasoning_tokens: int = 0
    """Of the completion tokens, those spent thinking."""
    cached_prompt_tokens: int = 0
    """Of the prompt tokens, those served from a prefix cache."""
    queue_s: float = 0.0
    """From submission until prefill began."""
    prompt_s: float = 0.0
    """Prefill: from the start of prompt processing to the first token."""
    decode_s: float = 0.0
    """From the first token to the last."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ToolCallDelta(msgspec.Struct, kw_only=True):
    """A fragment of a tool call: the first fragment of call `index` has its id and name, later ones add
    argument text. Joined, the argument fragments are the call's JSON arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(msgspec.Struct, kw_only=True):
    """What one decode step added to one sequence. The last delta carries `finish_reason` and `usage`."""

    text: str = ""
    """Answer text (never thinking, never tool-call markup)."""
    reasoning: str = ""
    """Thinking text."""
    tool_calls: list[ToolCallDelta] | None = None
    stop_sequence: str | None = None
    """On the last delta of a sequence a stop string ended: which one (Anthropic's `stop_sequence`)."""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """Texts or token-id lists to embed, one vector each, in order."""

    model: str
    input: list[str | list[int]]
    truncate: bool = False
    """An input longer than the model's context is cut to fit (Ollama's default) instead of refused (OpenAI's)."""
    dimensions: int | None = None
    """Keep the first `dimensions` components and renormalize (Matryoshka); None: the model's full size."""


class Embeddings(msgspec.Struct, kw_only=True):
    """An engine's answer to an `EmbeddingRequest`: one vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int
    """Input tokens embedded (after truncation), for usage and token budgets."""
    load_s: float = 0.0
    """Seconds this request waited for the model to load (Ollama's load_duration); set by the serving layer."""
