"""Anthropic wire requests → the engine's GenerationRequest, and engine deltas → Anthropic content blocks.

The conversation maps onto the contract's chat messages: `system` (a string or text blocks) and system-role
entries are system messages; an assistant turn's `thinking` blocks are its reasoning, its `tool_use` blocks its
tool calls (arguments: the JSON text of `input`); a user turn's `tool_result` blocks are `tool` messages, in
order, before the turn's own text. Several text blocks in one turn are joined with a blank line.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Literal

import msgspec

from litestar_llm.config import ModelConfig
from litestar_llm.dialects.anthropic import wire
from litestar_llm.engine.base import ModelInfo
from litestar_llm.engine.types import (
    ChatMessage,
    Delta,
    FinishReason,
    GenerationRequest,
    NamedToolChoice,
    ReasoningOptions,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from litestar_llm.errors import InvalidRequestError
from litestar_llm.serving import sampling

JOIN = "\n\n"
Builder = Callable[[ModelConfig, ModelInfo], GenerationRequest]
Names = Callable[[str], str]


def _refuse(param: str, problem: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {problem}", param=param)


def _texts(blocks: list, where: str, what: str) -> str:
    """Text blocks' text; any other block is refused, naming it."""
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, wire.TextBlock):
            raise _unsupported(block, f"{where}[{j}]", what)
        texts.append(block.text)
    return JOIN.join(texts)


def _unsupported(block: object, param: str, what: str) -> InvalidRequestError:
    kind = type(block).__struct_config__.tag  # type: ignore[attr-defined]
    if kind in ("image", "document"):
        return _refuse(param, f"{kind} content is not supported by this server (it serves text only); send text")
    return _refuse(param, f"{what} cannot hold a '{kind}' block")


class Conversation:
    """The chat messages of a request, and where each came from on the wire (for errors that name a field)."""

    def __init__(self, body: wire.PromptRequest) -> None:
        self.messages: list[ChatMessage] = []
        self.origins: list[str] = []
        self.paths: dict[str, str] = {}
        calls: dict[str, str] = {}  # tool_use id → name
        system = body.system if not isinstance(body.system, list) else _texts(body.system, "system", "system")
        if system:
            self._add(ChatMessage(role="system", content=system), "system")
        for i, message in enumerate(body.messages):
            where = f"messages[{i}]"
            if isinstance(message.content, str):
                self._add(ChatMessage(role=message.role, content=message.content), where)
            elif message.role == "assistant":
                self._assistant(message.content, where, calls)
            elif message.role == "system":
                text = _texts(message.content, f"{where}.content", "a system turn")
                self._add(ChatMessage(role="system", content=text), where)
            else:
                self._user(message.content, where, calls)
        if body.messages[-1].role == "assistant":
            raise _refuse(
                f"messages[{len(body.messages) - 1}]",
                "the last message must be a user turn: continuing a prefilled assistant turn is not supported by this "
                "server",
            )

    def _add(self, message: ChatMessage, origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def _assistant(self, blocks: list, where: str, calls: dict[str, str]) -> None:
        texts, thoughts, tool_calls = [], [], []
        index = len(self.messages)
        for j, block in enumerate(blocks):
            if isinstance(block, wire.TextBlock):
                texts.append(block.text)
            elif isinstance(block, wire.ThinkingBlock):
                thoughts.append(block.thinking)
            elif isinstance(block, wire.ToolUseBlock):
                self.paths[f"messages[{index}].tool_calls[{len(tool_calls)}].arguments"] = f"{where}.content[{j}].input"
                tool_calls.append(ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input)))
                calls[block.id] = block.name
            elif not isinstance(block, wire.RedactedThinkingBlock):
                raise _unsupported(block, f"{where}.content[{j}]", "an assistant turn")
        self._add(
            ChatMessage(
                role="assistant", content=JOIN.join(texts), tool_calls=tool_calls, reasoning=JOIN.join(thoughts) or None
            ),
            where,
        )

    def _user(self, blocks: list, where: str, calls: dict[str, str]) -> None:
        texts = []
        for j, block in enumerate(blocks):
            if isinstance(block, wire.TextBlock):
                texts.append(block.text)
            elif isinstance(block, wire.ToolResultBlock):
                path = f"{where}.content[{j}]"
                content = block.content
                if not isinstance(content, str):
                    content = _texts(content, f"{path}.content", "a tool result")
                index = len(self.messages)
                self.paths[f"messages[{index}].tool_call_id"] = f"{path}.tool_use_id"
                self.paths[f"messages[{index}].tool_name"] = f"{path}.tool_use_id"
                self._add(
                    ChatMessage(
                        role="tool", content=content, tool_call_id=block.tool_use_id, name=calls.get(block.tool_use_id)
                    ),
                    path,
                )
            else:
                raise _unsupported(block, f"{where}.content[{j}]", "a user turn")
        if texts or not any(isinstance(b, wire.ToolResultBlock) for b in blocks):
            self._add(ChatMessage(role="user", content=JOIN.join(texts)), where)

    def names(self, field: str) -> str:
        """The engine's field names as this request spells them on the wire."""
        if field in self.paths:
            return self.paths[field]
        if m := _MESSAGE_FIELD.match(field):
            index = int(m.group(1))
            return self.origins[index] if index < len(self.origins) else "messages"
        if m := _TOOLS_FIELD.match(field):
            return f"tools[{m.group(1)}]." + ("input_schema" if m.group(2) == "parameters" else "name")
        return _NAMES.get(field, field)


_MESSAGE_FIELD = re.compile(r"^messages\[(\d+)\]")
_TOOLS_FIELD = re.compile(r"^tools\[(\d+)\]\.(name|parameters)$")
_NAMES = {"stop": "stop_sequences", "reasoning": "thinking", "response_format": "output_config.format"}


def _tools(specs: list[wire.Tool] | None) -> list[Tool]:
    tools = []
    for i, spec in enumerate(specs or ()):
        if spec.type not in (None, "custom"):
            raise _refuse(
                f"tools[{i}].type",
                f"server tools ('{spec.type}') are not served by this server; send client tools with an input_schema",
            )
        schema = spec.input_schema if spec.input_schema is not None else {"type": "object", "properties": {}}
        tools.append(Tool(name=spec.name, description=spec.description, parameters=schema))
    return tools


def _tool_choice(choice: wire.ToolChoice | None) -> tuple[ToolChoice, bool]:
    """The contract's tool choice, and whether parallel calls are allowed."""
    if choice is None:
        return "auto", True
    if isinstance(choice, wire.ToolChoiceNone):
        return "none", True
    parallel = not choice.disable_parallel_tool_use
    if isinstance(choice, wire.ToolChoiceAny):
        return "required", parallel
    if isinstance(choice, wire.ToolChoiceTool):
        return NamedToolChoice(name=choice.name), parallel
    return "auto", parallel


def _reasoning(body: wire.PromptRequest, max_tokens: int | None) -> ReasoningOptions:
    """`thinking` (absent: the model's own default, as in every dialect) and `output_config.effort`."""
    thinking = body.thinking
    effort = _EFFORTS.get(body.output_config.effort) if body.output_config is not None else None  # type: ignore[arg-type]
    if thinking is None:
        return ReasoningOptions(effort=effort)
    if isinstance(thinking, wire.ThinkingDisabled):
        return ReasoningOptions(enabled=False)
    if isinstance(thinking, wire.ThinkingEnabled):
        if max_tokens is not None and thinking.budget_tokens >= max_tokens:
            raise _refuse("thinking.budget_tokens", f"must be less than max_tokens ({max_tokens})")
        return ReasoningOptions(enabled=True, budget_tokens=thinking.budget_tokens, effort=effort)
    return ReasoningOptions(enabled=True, effort=effort)


_EFFORTS: dict[str | None, Literal["low", "medium", "high"]] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}


def messages_request(body: wire.PromptRequest) -> tuple[Builder, Names]:
    """The request builder for `Serving.generate` (sampling: what the client sent, else the model's defaults), and
    the field names for its errors. A count_tokens body (`PromptRequest`) builds the same prompt."""
    conversation = Conversation(body)
    tools = _tools(body.tools)
    tool_choice, parallel = _tool_choice(body.tool_choice)
    sent: dict[str, object] = {}
    if isinstance(body, wire.MessagesRequest):
        sent = {
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "max_tokens": body.max_tokens,
            "stop": body.stop_sequences,
        }
    if body.output_config is not None and body.output_config.format is not None:
        sent["json_schema"] = body.output_config.format.schema
    reasoning = _reasoning(body, getattr(body, "max_tokens", None))

    def build(model: ModelConfig, _info: ModelInfo) -> GenerationRequest:
        return GenerationRequest(
            model=body.model,
            messages=conversation.messages,
            sampling=sampling(sent, model.defaults),
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel,
            reasoning=reasoning,
        )

    return build, conversation.names


# -- engine deltas → content blocks -------------------------------------------------------------------------


def stop_reason(finish: FinishReason | None, tool_use: bool, stop_sequence: str | None) -> wire.StopReason:
    if finish == "length":
        return "max_tokens"
    if tool_use or finish == "tool_calls":
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "end_turn"


def tool_input(arguments: str) -> dict:
    """A call's arguments as the object Anthropic's `input` is; a model that wrote broken JSON gets {}."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def tool_use_id(engine_id: str | None) -> str:
    return engine_id or f"toolu_{uuid.uuid4().hex[:24]}"


_THINKING, _TEXT = -2, -1  # block kinds; a tool_use block's kind is its call's index (>= 0)
_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_DELTA_KIND = {
    _THINKING: b',"delta":{"type":"thinking_delta","thinking":',
    _TEXT: b',"delta":{"type":"text_delta","text":',
}
_JSON_DELTA = b',"delta":{"type":"input_json_delta","partial_json":'
_DELTA_TAIL = b"}}\n\n"
_encode = wire.encoder.encode


def sse(event: msgspec.Struct) -> bytes:
    """One SSE event, named by the payload's `type` (the Struct's tag)."""
    return b"event: " + event.__struct_config__.tag.encode() + b"\ndata: " + _encode(event) + b"\n\n"


class Blocks:
    """Content blocks in the order the deltas open them: a new block whenever the kind changes (thinking, text,
    one tool call after another). With `events`, each `add` returns the SSE bytes of what it opened, added and
    closed; without, the blocks are collected for a non-streamed answer. Both follow one rule, so a stream
    accumulated by a client equals the non-streamed message."""

    __slots__ = ("_call", "_head", "_kind", "_parts", "content", "count", "events", "tool_use")

    def __init__(self, events: bool) -> None:
        self.events = events
        self.content: list[wire.ContentBlock] = []
        self.count = 0
        self.tool_use = False
        self._kind: int | None = None
        self._parts: list[str] = []
        self._call: tuple[str, str] = ("", "")
        self._head = b""

    def add(self, delta: Delta) -> bytes:
        out = b""
        if delta.reasoning:
            out = self._piece(_THINKING, delta.reasoning)
        if delta.text:
            out += self._piece(_TEXT, delta.text)
        for fragment in delta.tool_calls or ():
            out += self._fragment(fragment)
        return out

    def finish(self) -> bytes:
        """Close the open block; an answer with no content at all still gets one (empty) text block."""
        out = self._close()
        if not self.count:
            out += self._open(_TEXT, None) + self._close()
        return out

    def _piece(self, kind: int, text: str) -> bytes:
        out = b"" if self._kind == kind else self._close() + self._open(kind, None)
        if not self.events:
            self._parts.append(text)
            return out
        return b"".join((out, self._head, _DELTA_KIND[kind], _encode(text), _DELTA_TAIL))

    def _fragment(self, fragment: ToolCallDelta) -> bytes:
        out = b"" if self._kind == fragment.index else self._close() + self._open(fragment.index, fragment)
        if not fragment.arguments:
            return out
        if not self.events:
            self._parts.append(fragment.arguments)
            return out
        return b"".join((out, self._head, _JSON_DELTA, _encode(fragment.arguments), _DELTA_TAIL))

    def _open(self, kind: int, fragment: ToolCallDelta | None) -> bytes:
        index = self.count
        self.count += 1
        self._kind = kind
        if kind >= 0:
            self.tool_use = True
            self._call = (tool_use_id(fragment.id if fragment else None), (fragment.name if fragment else None) or "")
        if not self.events:
            return b""
        self._head = _DELTA_HEAD + str(index).encode()
        if kind == _THINKING:
            block: wire.ContentBlock = wire.ThinkingContent(thinking="")
        elif kind == _TEXT:
            block = wire.TextContent(text="")
        else:
            block = wire.ToolUseContent(id=self._call[0], name=self._call[1], input={})
        return sse(wire.ContentBlockStart(index=index, content_block=block))

    def _close(self) -> bytes:
        kind = self._kind
        if kind is None:
            return b""
        self._kind = None
        if self.events:
            out = b""
            if kind == _THINKING:  # Anthropic closes a thinking block with its signature
                out = self._head + b',"delta":{"type":"signature_delta","signature":""' + _DELTA_TAIL
            return out + sse(wire.ContentBlockStop(index=self.count - 1))
        text, self._parts = "".join(self._parts), []
        if kind == _THINKING:
            self.content.append(wire.ThinkingContent(thinking=text))
        elif kind == _TEXT:
            self.content.append(wire.TextContent(text=text))
        else:
            self.content.append(wire.ToolUseContent(id=self._call[0], name=self._call[1], input=tool_input(text)))
        return b""
