"""Constrained decoding on MLX with llguidance: one matcher per constrained sequence, masks for a whole step at once.

`Grammars` is one model's llguidance tokenizer and its compiled grammars, cached by constraint text; compiling
(`LLMatcher` construction, which releases the GIL) runs wherever `matcher()` is called: the engine calls it off the
event loop and off the generation thread, before the request is queued, so an invalid or unsupported grammar is a
400 (`GrammarError`, llguidance's reason) and a slow one delays only its own request.

`StepMasks` plugs matchers into mlx-lm's `BatchGenerator` through the per-sequence hooks it has. In one batched
step mlx-lm calls every row's logits processors, then every row's sampler. A constrained row's processor starts
the step's forward pass (`async_eval`), reads the token its sequence sampled last step and feeds it to the
matcher; the first constrained sampler of the step then computes the masks of all constrained rows in one
llguidance call (in parallel, off the GIL) while the forward pass runs, and each constrained sampler samples from
its row's masked log-probabilities. So the matcher sees exactly the sampled tokens, and end-of-sequence is
allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from litestar_llm.engine.types import SamplingParams
from litestar_llm.errors import InvalidRequestError

try:
    import llguidance
    import llguidance.hf
    from llguidance.numpy import fill_next_token_bitmask_par
except ImportError:  # pragma: no cover - depends on the install
    llguidance = None

JSON_OPTIONS = {"whitespace_flexible": False}
"""Compact JSON, no free whitespace: a weak model cannot wander into whitespace forever (a schema may still set
its own with `x-guidance`)."""
CACHE_SIZE = 512
"""Compiled grammars kept per model."""


class GrammarError(InvalidRequestError):
    """The constraint does not compile: llguidance's reason, naming the request field."""


def available() -> bool:
    return llguidance is not None


def constraint_of(s: SamplingParams) -> tuple[str, str, str] | None:
    """(field, kind, text) of the request's constraint: the engine field an error names, llguidance's grammar
    kind, and the text grammars are compiled and cached by. None when decoding is free."""
    if s.json_schema is not None:
        # keys in the client's order: llguidance writes properties in the order the schema lists them
        return "response_format", "json", json.dumps(s.json_schema, separators=(",", ":"))
    if s.json_object:
        return "response_format", "json", '{"type":"object"}'
    if s.regex is not None:
        return "regex", "regex", s.regex
    if s.choice is not None:
        return "choice", "choice", json.dumps(s.choice)
    if s.grammar is not None:
        return "grammar", "lark", s.grammar
    return None


class Grammars:
    """One model's llguidance tokenizer and compiled grammars (a template matcher each, copied per sequence)."""

    def __init__(self, hf_tokenizer: Any, width: int, eos_ids: list[int]) -> None:
        """`width`: the logits' width (the model's vocab_size, often padded past the tokenizer's)."""
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, max(width, len(hf_tokenizer)), eos_token=sorted(eos_ids)
        )
        self.width = width
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0
        """Grammars compiled (cache misses), for /ready and the benchmark."""

    def matcher(self, field: str, kind: str, text: str) -> Any:
        """A fresh matcher for this constraint (compiled once per text); `GrammarError` when it cannot be one."""
        key = (kind, text)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            template = self._compile(field, kind, text)
            with self._lock:
                self._compiled[key] = template
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return template.deep_copy()

    def after_thinking(
        self, kind: str, text: str, start: tuple[int, ...], end: tuple[int, ...], opened: bool
    ) -> tuple[str, str]:
        """The constraint with the model's thinking block first, free (as vLLM applies structured output after the
        thinking): a Lark grammar `think? body`, or `thought end body` where the prompt opened the block. Only for
        JSON and regex bodies and markers made of special tokens (which no text lexeme can swallow); otherwise the
        constraint as it is, from the first token."""
        special = self.tokenizer.is_special_token
        if kind not in ("json", "regex") or not start or not end or not all(special(t) for t in (*start, *end)):
            return kind, text
        if kind == "json":
            schema = json.loads(text)
            schema.setdefault("x-guidance", JSON_OPTIONS)
            body = "%json " + json.dumps(schema)
        else:
            body = "/" + text.replace("/", "\\/") + "/"
        opening, closing = ("".join(f"<[{t}]>" for t in ids) for ids in (start, end))
        lines = [f"start: THOUGHT {closing} GAP body"]
        if not opened:
            lines = ["start: think? body", f"think: {opening} THOUGHT {closing} GAP"]
        lines += ["THOUGHT: /(.|\\n)*/", "GAP: /\\n{0,2}/", f"body: {body}"]
        return "lark", "\n".join(lines)

    def _compile(self, field: str, kind: str, text: str) -> Any:
        try:
            if kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
            else:
                grammar = llguidance.grammar_from(kind, text)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"{field}: {exc}", param=field) from None
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            reason = template.get_error().strip()
            raise GrammarError(f"{field}: llguidance cannot use this {_WHAT[kind]}: {reason}", param=field)
        self.compiles += 1
        return template


_WHAT = {"json": "JSON schema", "regex": "regular expression", "choice": "choice", "lark": "Lark grammar"}


class GrammarViolation(RuntimeError):
    """A sampled token the grammar does not allow: only a broken mask can cause it; fails that sequence alone."""


class _Row:
    """One constrained sequence's matcher and the mask of its current step."""

    __slots__ = ("fed", "mask", "matcher")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.fed = False
        """The first processor call sees the prompt's last token, which the grammar must not consume."""
        self.mask: Any = None


class StepMasks:
    """The constrained rows of the running steps: their masks are computed together, once per step."""

    def __init__(self, width: int, words: int) -> None:
        self.width, self.words = width, words
        self._executor = llguidance.LLExecutor()
        self._pending: list[_Row] = []
        self._shift = mx.arange(32, dtype=mx.uint32)

    def reset(self) -> None:
        """A new generator: nothing of a failed step is pending."""
        self._pending = []

    def hooks(self, matcher: Any, sampler: Callable) -> tuple[Callable, Callable]:
        """(logits processor, sampler) for one constrained sequence; `sampler` is the sequence's own sampler,
        which the returned one calls on the masked log-probabilities."""
        row = _Row(matcher)

        def feed(tokens: mx.array, logits: mx.array) -> mx.array:
            mx.async_eval(logits)  # the forward pass runs while the token is read and the masks are computed
            if row.fed and not row.matcher.consume_token(int(tokens[-1].item())):
                raise GrammarViolation(f"the grammar refused a sampled token: {row.matcher.get_error()}")
            row.fed = True
            self._pending.append(row)
            return logits

        def sample(logprobs: mx.array) -> mx.array:
            if self._pending:
                self._fill()
            mask, row.mask = row.mask, None
            if mask is None:
                raise GrammarViolation("no mask for this step")
            masked = mx.where(mask, logprobs, -mx.inf)
            return sampler(masked - mx.logsumexp(masked, axis=-1, keepdims=True))

        return feed, sample

    def _fill(self) -> None:
        rows, self._pending = self._pending, []
        bitmask = np.empty((len(rows), self.words), dtype=np.int32)
        fill_next_token_bitmask_par(self._executor, [(r.matcher, i) for i, r in enumerate(rows)], bitmask)
        words = mx.array(bitmask.view(np.uint32))
        bits = ((words[:, :, None] >> self._shift) & 1).reshape(len(rows), -1)[:, : self.width].astype(mx.bool_)
        for i, row in enumerate(rows):
            row.mask = bits[i : i + 1]
