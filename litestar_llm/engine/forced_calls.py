"""Forced tool calls (`tool_choice: "required"` or a named function) by constrained decoding, as vLLM forces them.

The output is JSON that `forced_call_schema` describes, which is the schema vLLM's
`vllm.tool_parsers.utils.get_json_schema_from_tools` builds: for a named function its arguments object, for
"required" an array of `{"name": ..., "parameters": {...}}`. `ForcedCallSplitter` turns that output into calls:
a named call streams its arguments as they are decoded, the array's calls come as each element completes.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from litestar_llm.engine.types import Delta, GenerationRequest, NamedToolChoice, Tool, ToolCallDelta
from litestar_llm.errors import InvalidRequestError


def forced(request: GenerationRequest) -> bool:
    return bool(request.offered_tools) and request.tool_choice != "auto" and request.tool_choice != "none"


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.parameters if tool.parameters else {"type": "object", "properties": {}}


def forced_call_schema(request: GenerationRequest) -> dict[str, Any] | None:
    """The JSON schema of a forced call's output; None when the request forces none."""
    if not forced(request):
        return None
    tools = request.offered_tools
    if isinstance(request.tool_choice, NamedToolChoice):
        return _parameters(tools[0])
    defs: dict[str, Any] = {}
    items = []
    for tool in tools:
        parameters = dict(_parameters(tool))
        for name, schema in (parameters.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != schema:
                raise InvalidRequestError(
                    f"Tool definition '{name}' has multiple schemas, which is not supported.", "tools"
                )
            defs[name] = schema
        items.append(
            {
                "properties": {"name": {"type": "string", "enum": [tool.name]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ForcedCallSplitter:
    """One forced sequence's output as tool-call fragments (the OutputSplitter interface of the MLX engine)."""

    __slots__ = ("_array", "_decoder", "_named", "_text", "_thinking", "called")

    def __init__(self, request: GenerationRequest, thinking: Any = None) -> None:
        """`thinking`: the splitter of the model's thinking block, which comes before the call, for a model that
        thinks."""
        choice = request.tool_choice
        self._named = choice.name if isinstance(choice, NamedToolChoice) else None
        self._text = ""
        self._array = 0  # calls of the array already sent
        self._decoder = json.JSONDecoder()
        self._thinking = thinking
        self.called = False

    @property
    def reasoning_tokens(self) -> int:
        return self._thinking.reasoning_tokens if self._thinking is not None else 0

    def split(self, delta: Delta) -> Delta:
        if self._thinking is not None:
            delta = self._thinking.split(delta)
        text, delta.text = delta.text, ""
        calls: list[ToolCallDelta] = []
        if self._named is not None:
            if text and not self.called:
                calls.append(ToolCallDelta(index=0, id=_call_id(), name=self._named, arguments=text))
            elif text:
                calls.append(ToolCallDelta(index=0, arguments=text))
        else:
            self._text += text
            calls = self._complete_elements(final=delta.finish_reason is not None)
        if calls:
            delta.tool_calls = calls
            self.called = True
        if delta.usage is not None:
            delta.usage.reasoning_tokens = self.reasoning_tokens
        if delta.finish_reason == "stop" and self.called:
            delta.finish_reason = "tool_calls"
        return delta

    def _complete_elements(self, final: bool) -> list[ToolCallDelta]:
        """The array's elements decoded since the last delta (compact JSON: the grammar allows no free space)."""
        calls = []
        text = self._text
        position = text.find("[")
        if position < 0:
            return calls
        position += 1
        index = 0
        while position < len(text):
            if text[position] in ",":
                position += 1
                continue
            if text[position] == "]":
                break
            try:
                element, end = self._decoder.raw_decode(text, position)
            except ValueError:
                break  # not complete yet (or cut by max_tokens: dropped, as an unfinished call)
            if index >= self._array and isinstance(element, dict):
                arguments = element.get("parameters", {})
                calls.append(
                    ToolCallDelta(
                        index=index,
                        id=_call_id(),
                        name=str(element.get("name", "")),
                        arguments=json.dumps(arguments, ensure_ascii=False),
                    )
                )
            index += 1
            position = end
        self._array = max(self._array, index)
        return calls
