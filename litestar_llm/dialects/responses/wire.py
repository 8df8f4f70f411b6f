"""The Responses API's wire format as msgspec Structs (`CreateResponse`, `Response` and `ResponseStreamEvent` in
OpenAI's OpenAPI description).

Requests tolerate unknown fields, as the chat dialect's do; the few that would change what is generated and that
this server cannot honour (tools, background, conversations, prompt templates) are refused in translate.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from litestar_llm.dialects.openai.wire import MaxTokens, Probability, Temperature

Role = Literal["user", "system", "developer", "assistant"]
Status = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
# OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
Metadata = Annotated[
    dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)
]


class InputPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class InputItem(Struct, kw_only=True):
    """A message item (an easy message leaves `type` out), a `function_call` the model made, the
    `function_call_output` the client sends back, or a `reasoning` item (dropped: the template re-renders the
    conversation). Other item types are refused in translate.py."""

    type: str = "message"
    role: Role | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


class FunctionTool(Struct, kw_only=True):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Struct, kw_only=True):
    type: Literal["function"]
    name: str


class ReasoningConfig(Struct, kw_only=True):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class TextFormat(Struct, kw_only=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Struct, kw_only=True, omit_defaults=True):
    format: TextFormat = msgspec.field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = None


class CreateResponse(Struct, kw_only=True):
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    """A system message before the conversation; not carried over to responses that continue from this one."""
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: Metadata | None = None
    text: TextConfig | None = None
    parallel_tool_calls: bool = True
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    reasoning: ReasoningConfig | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


# -- responses ----------------------------------------------------------------------------------------------


class OutputText(Struct, kw_only=True):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(Struct, kw_only=True, tag="message", tag_field="type"):
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = []


class FunctionCall(Struct, kw_only=True, tag="function_call", tag_field="type"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


class ReasoningText(Struct, kw_only=True):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class Reasoning(Struct, kw_only=True, tag="reasoning", tag_field="type"):
    id: str
    summary: list[Any] = []
    content: list[ReasoningText] = []
    status: ItemStatus


OutputItem = OutputMessage | FunctionCall | Reasoning


class InputTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, kw_only=True):
    reasoning_tokens: int = 0


class Usage(Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(Struct):
    code: str
    message: str


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    text: TextConfig
    tool_choice: str | NamedFunction = "auto"
    tools: list[FunctionTool] = []
    reasoning: ReasoningConfig | None = None
    top_p: float
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: Usage | UnsetType = UNSET
    """Left out until the response is done: the spec has no null here."""
    metadata: dict[str, str] = {}


class DeletedResponse(Struct):
    id: str
    object: str = "response.deleted"
    deleted: bool = True


# -- stream events: `sequence_number` is set as each event is sent --------------------------------------------


class ResponseEvent(Struct, kw_only=True):
    """response.created / in_progress / completed / incomplete / failed."""

    type: str
    sequence_number: int = 0
    response: Response


class OutputItemEvent(Struct, kw_only=True):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int = 0
    output_index: int = 0
    item: OutputItem


class ContentPartEvent(Struct, kw_only=True):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(Struct, kw_only=True):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(Struct, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = []


class ArgumentsDeltaEvent(Struct, kw_only=True):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int = 0
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Struct, kw_only=True):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    name: str
    arguments: str


class ReasoningDeltaEvent(Struct, kw_only=True):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningDoneEvent(Struct, kw_only=True):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class ErrorEvent(Struct, kw_only=True):
    type: Literal["error"] = "error"
    sequence_number: int = 0
    code: str | None
    message: str
    param: str | None


encoder = msgspec.json.Encoder()
