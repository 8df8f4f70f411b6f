"""The blank lines chat templates put around thinking and tool-call markers, kept out of thinking and answer.

Templates write `<think>\nthought\n</think>\n\nanswer` and a newline between calls; the parsers of mlx-lm and
vLLM keep those newlines. Every backend drops them the same way, streamed or not, so a model answers the same
text on either: whitespace that might still be followed by more text is held back, never re-ordered.
"""

from __future__ import annotations


class MarkerSpacing:
    """One sequence's held whitespace. `thought(piece)` and `answer(piece)` return what to emit now; `call()` says
    a tool call started (the blank line before it is not answer text); `thought_ended()` drops trailing newlines
    of the thinking."""

    __slots__ = ("_answer_blank", "_answering", "_thinking", "_thought_blank")

    def __init__(self) -> None:
        self._thinking = self._answering = False
        self._thought_blank = self._answer_blank = ""

    def thought(self, piece: str) -> str:
        held = self._thought_blank + piece
        if not self._thinking:
            held = held.lstrip()
            self._thinking = bool(held)
        body = held.rstrip()
        self._thought_blank = held[len(body) :]
        return body

    def thought_ended(self) -> None:
        self._thought_blank = ""

    def answer(self, piece: str) -> str:
        if self._answering:
            return piece
        held = self._answer_blank + piece
        if not held.strip():
            self._answer_blank = held
            return ""
        self._answering, self._answer_blank = True, ""
        return held.lstrip()

    def call(self) -> None:
        self._answering, self._answer_blank = False, ""
