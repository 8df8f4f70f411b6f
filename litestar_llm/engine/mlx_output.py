"""MLX output → answer, thinking and tool calls, with mlx-lm's own pieces.

mlx-lm's tokenizer wrapper knows the model's thinking markers (`think_start` / `think_end`) and picks the tool
parser that fits its chat template (`tool_parser`, `tool_call_start` / `tool_call_end`, from
`mlx_lm.tool_parsers`); mlx-lm's `TextStateMachine` splits decoded text at those markers without leaking a
partial marker. This module only drives them per sequence and turns a finished call into a `ToolCallDelta`.
It runs on the event loop's side of the engine, so the shared generation thread does no parsing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mlx_lm.generate import TextStateMachine, make_text_state_machine

from litestar_llm.engine.spacing import MarkerSpacing
from litestar_llm.engine.types import Delta, GenerationRequest, ToolCallDelta


class OutputParsers:
    """One model's markers and parser; `splitter(request, prompt)` makes the per-sequence state."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.thinking = bool(tokenizer.has_thinking)
        self.tools = bool(tokenizer.has_tool_calling)
        self._with_tools = make_text_state_machine(tokenizer) if self.thinking or self.tools else None
        self._without_tools = None
        if self.thinking:
            start, end = tokenizer.think_start, tokenizer.think_end
            self._without_tools = TextStateMachine({"normal": [(start, "reasoning")], "reasoning": [(end, "normal")]})

    def splitter(self, request: GenerationRequest, prompt: list[int]) -> OutputSplitter | None:
        """None where there is nothing to split (a plain model, or a raw prompt)."""
        parse_tools = self.tools and bool(request.offered_tools)
        machine = self._with_tools if parse_tools else self._without_tools
        if machine is None or request.messages is None:
            return None
        initial = "normal"
        if self.thinking and self.tokenizer.rfind_think_start(prompt) > self.tokenizer.rfind_think_end(prompt):
            initial = "reasoning"  # the template opened the thinking block in the generation prompt
        tools = request.template_kwargs().get("tools") if parse_tools else None
        return OutputSplitter(machine.make_state(initial), self.tokenizer.tool_parser, tools)


class OutputSplitter:
    """One sequence's position in the state machine; `split` turns a delta's raw text into answer text, thinking
    and finished tool calls."""

    __slots__ = (
        "_calls",
        "_parser",
        "_spacing",
        "_state",
        "_tool_text",
        "_tools",
        "called",
        "reasoning_tokens",
    )

    def __init__(self, state: Any, parser: Any, tools: list[dict] | None) -> None:
        self._state, self._parser, self._tools = state, parser, tools
        self._tool_text: list[str] = []
        self._calls = 0
        self._spacing = MarkerSpacing()
        self.called = False
        self.reasoning_tokens = 0
        """Tokens spent thinking: a token is one delta on MLX, counted when it added only thinking (or a
        marker) while the sequence thinks."""

    def split(self, delta: Delta) -> Delta:
        self._state, segments = TextStateMachine.split(self._state, delta.text)
        if delta.finish_reason is not None:  # the end: a partial marker held back is output after all
            self._state, held, current = TextStateMachine.flush(self._state)
            segments.append((current, held))
        text, reasoning, calls = [], [], []
        for state, piece in segments:
            if state == "reasoning":
                reasoning.append(self._spacing.thought(piece))
            elif state == "tool":
                self._tool_text.append(piece)
                self._spacing.call()
            else:
                if self._tool_text:
                    calls.extend(self._finish_call())
                self._spacing.thought_ended()
                text.append(self._spacing.answer(piece))
        if delta.finish_reason is not None and self._tool_text:
            calls.extend(self._finish_call())  # a call cut off by max_tokens or the end of the sequence
        delta.text, delta.reasoning = "".join(text), "".join(reasoning)
        if segments[0][0] == "reasoning" and not delta.text and not calls:
            self.reasoning_tokens += len(delta.token_ids)
        if delta.usage is not None:
            delta.usage.reasoning_tokens = self.reasoning_tokens
        if calls:
            delta.tool_calls = calls
            self.called = True
        if delta.finish_reason == "stop" and self.called:
            delta.finish_reason = "tool_calls"
        return delta

    def _finish_call(self) -> list[ToolCallDelta]:
        source, self._tool_text = "".join(self._tool_text), []
        try:
            parsed = self._parser(source, self._tools)
        except (ValueError, KeyError, TypeError):
            return []  # not a call after all (cut off mid-way): mlx_lm.server drops it too
        calls = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            arguments = call.get("arguments", {})
            calls.append(
                ToolCallDelta(
                    index=self._calls,
                    id=call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    name=call.get("name", ""),
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                )
            )
            self._calls += 1
        return calls
