"""Anthropic's Messages API wire format as msgspec Structs (the shapes the `anthropic` SDK sends and parses).

Requests tolerate unknown fields (`cache_control` on blocks, `service_tier`, `container`, ...): clients add them
faster than servers learn them, and none of them changes what is generated here. Content blocks, tool choices and
thinking switches are tagged unions on `type`. Responses are encoded from the Structs below; the streamed
`content_block_delta` events, one per decode step, are framed by hand in `routes.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# -- request content blocks ---------------------------------------------------------------------------------


class TextBlock(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageBlock(Struct, tag="image", tag_field="type", kw_only=True):
    """Accepted by the decoder only to be refused with a clear 400: vision is not served."""

    source: dict[str, Any] | None = None


class DocumentBlock(Struct, tag="document", tag_field="type", kw_only=True):
    """Refused with a clear 400, as images are."""

    source: dict[str, Any] | None = None


class ToolUseBlock(Struct, tag="tool_use", tag_field="type", kw_only=True):
    """An assistant turn's call, sent back in the history."""

    id: str
    name: str
    input: dict[str, Any] = {}


ResultPart = TextBlock | ImageBlock | DocumentBlock


class ToolResultBlock(Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: str
    content: str | list[ResultPart] = ""
    is_error: bool = False


class ThinkingBlock(Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Struct, tag="redacted_thinking", tag_field="type", kw_only=True):
    """Encrypted thinking from Anthropic's own models: nothing a local model can read, so it is dropped."""

    data: str = ""


InputBlock = (
    TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock
)


class Message(Struct, kw_only=True):
    role: Literal["user", "assistant", "system"]
    """`system` is not Anthropic's own, but some coding agents send it inside `messages`: accepted."""
    content: str | list[InputBlock]


# -- tools, tool choice, thinking ---------------------------------------------------------------------------


class Tool(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1)]
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    """Absent or "custom" for a client tool; Anthropic's server tools (web search, code execution, ...) have
    their own types and are refused."""


class ToolChoiceAuto(Struct, tag="auto", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceAny(Struct, tag="any", tag_field="type", kw_only=True):
    disable_parallel_tool_use: bool = False


class ToolChoiceTool(Struct, tag="tool", tag_field="type", kw_only=True):
    name: str
    disable_parallel_tool_use: bool = False


class ToolChoiceNone(Struct, tag="none", tag_field="type", kw_only=True):
    pass


ToolChoice = ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone


class ThinkingEnabled(Struct, tag="enabled", tag_field="type", kw_only=True):
    budget_tokens: Annotated[int, Meta(ge=1)]


class ThinkingDisabled(Struct, tag="disabled", tag_field="type", kw_only=True):
    pass


class ThinkingAdaptive(Struct, tag="adaptive", tag_field="type", kw_only=True):
    pass


class ThinkingBetweenTools(Struct, tag="between_tools", tag_field="type", kw_only=True):
    pass


Thinking = ThinkingEnabled | ThinkingDisabled | ThinkingAdaptive | ThinkingBetweenTools


class OutputFormat(Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict[str, Any]


class OutputConfig(Struct, kw_only=True):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None
    """Structured output: honoured where the backend has constrained decoding."""


# -- requests -----------------------------------------------------------------------------------------------


class PromptRequest(Struct, kw_only=True):
    """What decides the prompt: all that `POST /v1/messages/count_tokens` takes."""

    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(PromptRequest, kw_only=True):
    max_tokens: Annotated[int, Meta(ge=1)]
    """Required, as Anthropic has it."""
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


# -- responses ----------------------------------------------------------------------------------------------


class TextContent(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ThinkingContent(Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str = ""
    """Anthropic's SDK expects the field; a local model's thinking is not signed."""


class ToolUseContent(Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = ThinkingContent | TextContent | ToolUseContent
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(Struct, kw_only=True):
    input_tokens: int
    output_tokens: int


class MessageResponse(Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


class CountTokensResponse(Struct, kw_only=True):
    input_tokens: int


# -- stream events (the content_block_delta ones are framed in routes.py) -----------------------------------


class MessageStart(Struct, tag="message_start", tag_field="type", kw_only=True):
    message: MessageResponse


class Ping(Struct, tag="ping", tag_field="type"):
    pass


class ContentBlockStart(Struct, tag="content_block_start", tag_field="type", kw_only=True):
    index: int
    content_block: ContentBlock


class ContentBlockStop(Struct, tag="content_block_stop", tag_field="type", kw_only=True):
    index: int


class MessageDeltaBody(Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class MessageDelta(Struct, tag="message_delta", tag_field="type", kw_only=True):
    delta: MessageDeltaBody
    usage: Usage
    """Cumulative, as Anthropic sends it: the SDK's accumulator takes both figures from here."""


class MessageStop(Struct, tag="message_stop", tag_field="type"):
    pass


# -- models -------------------------------------------------------------------------------------------------


class ModelInfo(Struct, kw_only=True):
    id: str
    display_name: str
    created_at: str
    """RFC 3339."""
    type: str = "model"


class ModelList(Struct, kw_only=True):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


# -- errors -------------------------------------------------------------------------------------------------


class ErrorBody(Struct, kw_only=True):
    type: str
    message: str


class ErrorResponse(Struct, tag="error", tag_field="type", kw_only=True):
    """`{"type": "error", "error": {"type", "message"}}`: the body of an error response, and the `error` stream
    event."""

    error: ErrorBody


encoder = msgspec.json.Encoder()
