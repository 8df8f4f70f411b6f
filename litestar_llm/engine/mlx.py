"""MLX backend: mlx-lm's BatchGenerator on one generation thread per model, bridged to asyncio.

The shape is mlx_lm.server's (one thread, a queue in, continuous batching) with one scheduling change: the
thread admits newly arrived requests before *every* decode step instead of after a time budget of steps, so a
new request's prefill starts within one step of its arrival (TTFT) while running sequences keep decoding.
Results go back through one `call_soon_threadsafe` per step into per-request asyncio queues.

Admission: requests wait on our side (a FIFO the thread owns) and go into BatchGenerator only when one of
`max_batch_size` slots is free, so the wait is bounded exactly: `max_queue` waiting requests at most (one more is
refused at once with `OverloadedError`), `max_queue_wait_s` at most (then dropped, with the same error), and a
client that leaves while waiting is dropped before any prefill.

Isolation: what one sequence raises fails that sequence alone. Samplers and logits processors are wrapped
(`_Guarded`) so an exception inside BatchGenerator's batched step is recorded and a harmless stand-in lets the
step finish for the others; after the step the engine removes the sequences whose sampler or processor failed.
Insertion and each row's delta (detokenizer, stop strings, logprobs) are guarded per sequence too. An exception
nobody can be blamed for (in the model's forward pass, say) stops the generator: every running and waiting
request fails at once, `/ready` shows the model `failed` with the reason, and the thread builds a new generator
after a back-off (1, 2, 4 s), giving up after 3 failures in a row without a successful step in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import logging
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec

from litestar_llm.config import MLXBackendConfig, ModelConfig
from litestar_llm.engine import mlx_grammar
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import folder_files, parameter_count
from litestar_llm.engine.forced_calls import ForcedCallSplitter, forced, forced_call_schema
from litestar_llm.engine.mlx_embed import Embedder, EmbedJob, embeddings_of
from litestar_llm.engine.mlx_output import OutputParsers, OutputSplitter
from litestar_llm.engine.mlx_prefix import PrefixCache, default_max_bytes
from litestar_llm.engine.stops import StopStringMatcher
from litestar_llm.engine.template import template_messages
from litestar_llm.engine.types import (
    Delta,
    EmbeddingRequest,
    Embeddings,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from litestar_llm.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    LitestarLLMError,
    MissingDependencyError,
    ModelLoadError,
    OverloadedError,
)

try:
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingDependencyError("mlx-lm", "mlx") from exc

logger = logging.getLogger(__name__)

MAX_SEED = 2**64 - 1
"""`mx.random.key` takes seeds in [0, 2**64 - 1]."""
RESTARTS = 3
"""Generator failures in a row (no successful step in between) after which the model stays down."""
BACKOFF_S = 1.0
"""The first restart waits this long, each further one in a row twice as long."""

TEST_FAULTS_ENV = "LITESTAR_LLM_TEST_FAULTS"
"""Test fault injection, only when this is "1": a prompt (or last message) `litestar-llm-test-fault:KIND` makes
the engine fail on purpose. KIND: `thread` (the generator dies in a step; its restart waits for a `release`
request), `release`, `sampler` (this row's sampler raises mlx's own error), `emit` (building this row's delta
raises)."""
_FAULT_PREFIX = "litestar-llm-test-fault:"
_LLGUIDANCE = "pip install 'litestar-llm[mlx]'"

_step = threading.local()
"""`faults`: {guard: exception} of the generator step running on this thread, None outside a step."""


class _Guarded:
    """A sampler or logits processor that never raises into BatchGenerator's batched step. An exception is recorded
    for the engine, which fails every sequence using this object after the step; meanwhile a harmless stand-in
    (token 0 for a sampler, the logits unchanged for a processor) lets the step complete for the other rows."""

    __slots__ = ("fn", "sampler")

    def __init__(self, fn: Callable, sampler: bool) -> None:
        self.fn, self.sampler = fn, sampler

    def __call__(self, *args: Any) -> Any:
        key = mx.random.state[0]
        try:
            return self.fn(*args)
        except Exception as exc:
            faults = getattr(_step, "faults", None)
            if faults is None:
                raise
            faults.setdefault(self, exc)
            _restore_random_state(key)
            return mx.zeros(args[0].shape[:-1], dtype=mx.uint32) if self.sampler else args[1]


def _restore_random_state(key: Any) -> None:
    """mlx-lm's samplers are `mx.compile`d with the global random state as input and output: one that raises while
    tracing leaves a placeholder array in `mx.random.state`, and every later random draw (anyone's) fails to
    evaluate. Put the key back (`mx.random.seed(s)` makes the key [s >> 32, s & 0xffffffff])."""
    try:
        high, low = key.tolist()
        mx.random.seed((high << 32) | low)
    except Exception:
        mx.random.seed(int.from_bytes(os.urandom(8), "little"))


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, top_k: int, min_p: float) -> _Guarded:
    """Requests with equal unseeded parameters share one sampler object, which BatchGenerator samples in one
    batched call instead of row by row."""
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=top_k, min_p=min_p)
    return _Guarded(sampler, sampler=True)


def _seeded_sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int) -> _Guarded:
    """A sampler with its own PRNG key: the same seed gives the same tokens whatever else shares the batch."""
    if temperature == 0:
        return _shared_sampler(0.0, 1.0, 0, 0.0)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED}]", param="seed")
    key = mx.random.key(seed)

    def sample(logprobs):
        nonlocal key
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key, subkey = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=subkey)

    return _Guarded(sample, sampler=True)


def _faulty_sampler(logprobs):
    """The `sampler` test fault: mlx-lm's own top_k check raises, as it does for a top_k beyond the vocabulary."""
    return apply_top_k(logprobs, 10**9)


class _Sequence:
    """One request's state, shared between the event loop (queue, cancelled) and the generation thread (the rest)."""

    __slots__ = (
        "cached",
        "cancelled",
        "completion_tokens",
        "detokenizer",
        "fault",
        "finished",
        "first_token",
        "guards",
        "matcher",
        "max_tokens",
        "prompt",
        "prompt_started",
        "queue",
        "queued",
        "request",
        "stops",
        "submitted",
        "uid",
    )  # fmt: skip

    def __init__(self, request: GenerationRequest, prompt: list[int], max_tokens: int, fault: str | None) -> None:
        self.request = request
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.fault = fault
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.uid: int | None = None
        self.detokenizer: Any = None
        self.guards: tuple[_Guarded, ...] = ()
        """The sampler and logits processors BatchGenerator calls for this row: a fault in one fails the row."""
        self.stops = StopStringMatcher(request.sampling.stop)
        self.matcher: Any = None
        """The llguidance matcher of a constrained sequence (its own: n > 1 gives each choice one)."""
        self.completion_tokens = 0
        self.cached = 0
        self.submitted = 0.0
        self.prompt_started = 0.0
        self.first_token = 0.0
        self.finished = False
        """Answered (done, failed or dropped): nothing more goes to its queue. Written by the thread only."""
        self.cancelled = False
        """The client left (written by the event loop): never insert it."""
        self.queued = True
        """Counted as waiting for a batch slot until the thread takes it out of the queue."""


_SUBMIT, _CANCEL, _STOP, _EMBED = "submit", "cancel", "stop", "embed"


class MLXEngine(Engine):
    def __init__(self, model: ModelConfig, backend: MLXBackendConfig, backend_name: str) -> None:
        self.config = model
        self.backend = backend
        self.info = ModelInfo(
            name=model.name,
            backend="mlx",
            source=model.source,
            created=int(time.time()),
            max_seed=MAX_SEED,
            embeddings=model.task == "embed",
        )
        self._embedder: Embedder | None = None
        """task "embed": its inputs are batched on the generation thread (mlx_embed.py)."""
        self.max_queue = backend.max_queue or 4 * backend.max_batch_size
        self._inbox: queue.SimpleQueue[tuple[str, _Sequence | None]] = queue.SimpleQueue()
        # KV caches of shared prefixes and finished sequences, reused for prompts that share a prefix (a common
        # system prompt, the next turn of a chat): mlx_lm.server's own LRU cache, touched only by the thread.
        max_bytes = default_max_bytes() if backend.prompt_cache_bytes is None else backend.prompt_cache_bytes
        self._prefixes = PrefixCache(model.name, max_bytes, backend.prompt_cache_size)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._parsers: OutputParsers | None = None
        self._grammars: mlx_grammar.Grammars | None = None
        self._masks: mlx_grammar.StepMasks | None = None
        self._state = "loading"
        """loading, ready, failed (down: restarting after a back-off, or given up), stopped."""
        self._error: str | None = None
        self._restarts = 0
        self._restart_at = 0.0  # while failed and restarting: when (monotonic) the restart is due
        self._closing = False
        self._wake = threading.Event()  # ends a restart's back-off early: close(), or the test `release` fault
        self._test_faults = os.environ.get(TEST_FAULTS_ENV) == "1"
        self._inject: str | None = None  # a test fault the thread raises in its next step
        # Waiting requests, counted without a lock: each counter has one writer. Admitted (event loop), given
        # back before reaching the thread (event loop), and out of the queue: in a slot, dropped or failed (thread).
        self._admitted = 0
        self._given_back = 0
        self._dequeued = 0
        # The generation thread's own: sequences in BatchGenerator (at most max_batch_size) and those waiting.
        self._active: dict[int, _Sequence] = {}
        self._pending: deque[_Sequence] = deque()
        self._stepped = False
        # Counters read by /ready and the tests: they show whether concurrent requests really share steps.
        self._counters = {
            "decode_steps": 0, "generated_tokens": 0, "max_batch": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
            "prefilled_tokens": 0,
            "refused": 0, "expired": 0, "cancelled_waiting": 0, "failed": 0,
        }  # fmt: skip

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loaded,), name=f"mlx-{self.info.name}", daemon=True)
        self._thread.start()
        await loaded

    async def close(self) -> None:
        if self._thread is None:
            return
        self._closing = True
        self._inbox.put((_STOP, None))
        self._wake.set()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, 30)
        if not thread.is_alive():  # a thread still in a step keeps its arrays: leave them
            self._release_memory()

    def _release_memory(self) -> None:
        """Let go of the weights, caches and tokenizer, and hand MLX's freed buffers back to the system, so that
        an unloaded model's memory really goes (RSS drops)."""
        self._model = self._tokenizer = self._parsers = None
        self._grammars = self._masks = None
        self._prefixes.clear()
        gc.collect()
        self.release_freed_memory()

    @staticmethod
    def release_freed_memory() -> None:
        """MLX keeps freed buffers for reuse: hand them back (also after the engine itself is collected)."""
        mx.clear_cache()

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def waiting(self) -> int:
        """Requests admitted that have no batch slot yet."""
        return self._admitted - self._given_back - self._dequeued

    def stats(self) -> dict[str, Any]:
        return {
            **self._counters,
            **self._prefixes.stats(),
            "running": len(self._active),
            "waiting": self.waiting,
            "max_queue": self.max_queue,
            "state": self._state,
            "error": self._error,
            "restarts": self._restarts,
            "grammars_compiled": self._grammars.compiles if self._grammars is not None else 0,
        }

    # -- the event-loop side ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        fault = self._test_fault(request)
        if fault == "release":
            self._wake.set()
            yield Delta(finish_reason="stop", usage=Usage(prompt_tokens=0, completion_tokens=0))
            return
        if self._state != "ready":
            raise self._unavailable()
        if self.waiting >= self.max_queue:
            self._counters["refused"] += 1
            raise OverloadedError(
                f"model '{self.info.name}' is overloaded: {self.max_queue} requests are already waiting for a slot"
            )
        self._admitted += 1
        try:
            sequence, splitter, answer_stops = await asyncio.to_thread(self._prepare_split, request, fault)
            sequence.submitted = time.perf_counter()
            self._inbox.put((_SUBMIT, sequence))
        except BaseException:
            self._given_back += 1
            raise
        try:
            while True:
                item = await sequence.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if splitter is not None:
                    item = splitter.split(item)
                    if answer_stops is not None and self._stop_answer(item, answer_stops, sequence, splitter):
                        yield item
                        return  # the thread still runs it: `finally` cancels it
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not sequence.finished:
                sequence.cancelled = True
                self._inbox.put((_CANCEL, sequence))

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        if self._embedder is None:
            return await super().embed(request)
        if self._state != "ready":
            raise self._unavailable()
        if len(self._embedder.jobs) >= self.max_queue:
            self._counters["refused"] += 1
            raise OverloadedError(f"model '{self.info.name}' is overloaded: {self.max_queue} requests are waiting")
        job = await asyncio.to_thread(self._embed_job, request)
        self._inbox.put((_EMBED, job))
        try:
            item = await job.queue.get()
        finally:
            job.cancelled = not job.finished  # the client left: its inputs not yet in a batch are skipped
        if isinstance(item, BaseException):
            raise item
        return item

    async def count_input_tokens(self, request: EmbeddingRequest) -> int | None:
        if self._embedder is None:
            return None
        return (await asyncio.to_thread(self._embed_job, request)).prompt_tokens

    def _embed_job(self, request: EmbeddingRequest) -> EmbedJob:
        return self._embedder.prepare(request, self.info.context_length, self.info.vocab_size or len(self._tokenizer))

    def _prepare_split(
        self, request: GenerationRequest, fault: str | None
    ) -> tuple[_Sequence, OutputSplitter | None, StopStringMatcher | None]:
        """The sequence, and for a model that thinks or calls tools the splitter of its output. Stop strings then
        apply to the answer alone, after splitting, so the thread's own matcher gets none."""
        sequence = self._prepare(request, fault)
        if sequence.matcher is not None and forced(request):
            thinking = self._parsers.splitter(msgspec.structs.replace(request, tools=[]), sequence.prompt)
            splitter = ForcedCallSplitter(request, thinking)
        else:
            splitter = self._parsers.splitter(request, sequence.prompt) if self._parsers is not None else None
        if splitter is None or not request.sampling.stop:
            return sequence, splitter, None
        answer_stops, sequence.stops = sequence.stops, StopStringMatcher([])
        return sequence, splitter, answer_stops

    def _stop_answer(
        self, delta: Delta, stops: StopStringMatcher, sequence: _Sequence, splitter: OutputSplitter
    ) -> bool:
        """Stop strings on the answer text; True when one ended it here (the delta then ends the sequence)."""
        text = stops.feed(delta.text)
        if not stops.stopped:
            delta.text = text + (stops.flush() if delta.finish_reason is not None else "")
            return False
        delta.text, delta.tool_calls = text, None
        delta.finish_reason, delta.stop_sequence = "stop", stops.matched
        delta.usage = self._usage(sequence, time.perf_counter())
        delta.usage.reasoning_tokens = splitter.reasoning_tokens
        return True

    def _unavailable(self) -> EngineUnavailableError:
        name = self.info.name
        if self._state == "loading":
            return EngineUnavailableError(f"model '{name}' is not loaded")
        if self._state == "stopped" or self._closing:
            return EngineUnavailableError(f"model '{name}' is shutting down")
        error = EngineUnavailableError(f"model '{name}' failed: {self._error}")
        if self._restart_at:  # restarting: retry once it is back
            error.headers = {"Retry-After": str(max(1, math.ceil(self._restart_at - time.monotonic())))}
        return error

    def _test_fault(self, request: GenerationRequest) -> str | None:
        if not self._test_faults:
            return None
        if isinstance(request.prompt, str):
            text = request.prompt
        else:
            text = request.messages[-1].text if request.messages else ""
        return text[len(_FAULT_PREFIX) :].strip() if text.startswith(_FAULT_PREFIX) else None

    def _prepare(self, request: GenerationRequest, fault: str | None) -> _Sequence:
        """Tokenize and check the prompt, build the stop matcher: off the event loop and off the generation thread."""
        prompt = self._encode(request)
        context = self.info.context_length or 0
        if context and len(prompt) >= context:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens; the prompt has {len(prompt)}.",
                param="messages" if request.messages is not None else "prompt",
            )
        room = context - len(prompt) if context else 1 << 30
        max_tokens = request.sampling.max_tokens
        if max_tokens is not None and max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens: the prompt has {len(prompt)} and "
                f"max_tokens asks for {max_tokens} more.",
                param="max_tokens",
            )
        sequence = _Sequence(request, prompt, max_tokens or room, fault)
        sequence.matcher = self._matcher(request, prompt)
        return sequence

    def _matcher(self, request: GenerationRequest, prompt: list[int]) -> Any:
        """The sequence's grammar matcher (compiled here, off the event loop and the generation thread, cached by
        its text), or None for free decoding. A forced tool call is decoded with vLLM's schema for it; a model
        that thinks thinks first, freely."""
        constraint = mlx_grammar.constraint_of(request.sampling)
        schema = forced_call_schema(request) if request.messages is not None else None
        if schema is not None:
            constraint = ("tools", "json", msgspec.json.encode(schema).decode())
        if constraint is None:
            return None
        if self._grammars is None:
            raise InvalidRequestError(
                f"constrained decoding needs llguidance, which is not installed: {_LLGUIDANCE}", constraint[0]
            )
        matcher = self._grammars.matcher(*constraint)  # the constraint alone: its errors name what the client sent
        tokenizer = self._tokenizer
        if request.messages is not None and self.info.thinking and request.thinking:
            opened = tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt)
            start, end = tokenizer.think_start_tokens or (), tokenizer.think_end_tokens or ()
            kind, text = self._grammars.after_thinking(*constraint[1:], start, end, opened)
            if kind != constraint[1]:
                matcher = self._grammars.matcher(constraint[0], kind, text)
        return matcher

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._encode, request))

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            try:
                ids = self._tokenizer.apply_chat_template(
                    template_messages(request.messages),
                    add_generation_prompt=request.add_generation_prompt,
                    tokenize=True,
                    **request.template_kwargs(),
                )
            except Exception as exc:  # the template rejected the conversation (roles, order)
                raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from None
            return list(ids)
        if isinstance(request.prompt, list):
            vocab = self.info.vocab_size or len(self._tokenizer)
            if any(not 0 <= t < vocab for t in request.prompt):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})", "prompt")
            return list(request.prompt)
        text = request.prompt or ""
        bos = self._tokenizer.bos_token
        ids = self._tokenizer.encode(text, add_special_tokens=bool(bos) and not text.startswith(bos))
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    # -- the generation thread: lifecycle --------------------------------------------------------------------

    def _run(self, loaded: asyncio.Future[None]) -> None:
        try:
            self._load()
        except Exception as exc:
            self._state, self._error = "failed", str(exc)
            self._loop.call_soon_threadsafe(_set_exception, loaded, exc)
            return
        self._state = "ready"
        self._loop.call_soon_threadsafe(_set_result, loaded)
        failures = 0
        while True:
            try:
                self._serve()
            except Exception as exc:  # a broken generator fails its requests and /ready, never hangs them
                logger.exception("generation for model %s failed", self.info.name)
                reason = f"{type(exc).__name__}: {exc}"
                self._state, self._error = "failed", reason
                failures = 1 if self._stepped else failures + 1
                gave_up = failures > RESTARTS
                then = "it stays down" if gave_up else "it restarts"
                self._fail_all(EngineUnavailableError(f"model '{self.info.name}' failed ({reason}); {then}"))
                if self._closing:
                    break
                if gave_up:
                    logger.error("model %s failed %d times in a row; it stays down", self.info.name, failures)
                    self._refuse_until_stopped()
                    break
                delay = 300 if isinstance(exc, _InjectedFault) else BACKOFF_S * 2 ** (failures - 1)
                self._restart_at = time.monotonic() + delay
                self._wake.wait(delay)
                self._wake.clear()
                self._restart_at = 0.0
                if self._closing:
                    break
                self._prefixes.clear()
                self._restarts += 1
                self._state, self._error = "ready", None
                logger.warning("model %s restarted (%d in a row)", self.info.name, failures)
            else:
                break
        self._state = "stopped"
        self._fail_all(EngineUnavailableError(f"model '{self.info.name}' is shutting down"))

    def _load(self) -> None:
        source = self.config.source
        try:
            model, tokenizer, config = mlx_load(source, return_config=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not Path(source).exists():
                reason = f"not a local folder, and not loadable from the Hugging Face hub or its cache ({reason})"
            raise ModelLoadError(self.info.name, source, reason) from None
        self._model, self._tokenizer = model, tokenizer
        self._parsers = OutputParsers(tokenizer)
        if self.config.task == "embed":
            self._embedder = Embedder.load(self.info.name, source, model, tokenizer, config, self.config, self.backend)
        try:
            self.info = _model_info(self.info, config, tokenizer, Path(source))
            self.info.tools, self.info.thinking = self._parsers.tools, self._parsers.thinking
            self.info.embedding_size = self._embedder.size if self._embedder is not None else None
        except Exception as exc:
            raise ModelLoadError(self.info.name, source, f"cannot read the model's files: {exc}") from None
        self._load_grammars(config, tokenizer)

    def _load_grammars(self, config: dict, tokenizer: Any) -> None:
        """llguidance's view of the tokenizer, where llguidance is installed and the tokenizer is a fast one."""
        if not mlx_grammar.available():
            return
        width = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or len(tokenizer)
        try:
            self._grammars = mlx_grammar.Grammars(tokenizer._tokenizer, width, list(tokenizer.eos_token_ids))
        except Exception as exc:  # a slow tokenizer, say: the model serves, unconstrained
            logger.warning("model %s: no constrained decoding (llguidance: %s)", self.info.name, exc)
            return
        self._masks = mlx_grammar.StepMasks(width, (self._grammars.tokenizer.vocab_size + 31) // 32)
        self.info.structured_output = True

    def _refuse_until_stopped(self) -> None:
        """Given up: answer whatever still reaches the inbox (sent just before the state changed) until close()."""
        while True:
            command, sequence = self._inbox.get()
            if command == _STOP:
                return
            if command in (_SUBMIT, _EMBED):
                self._fail(sequence, self._unavailable())

    def _fail_all(self, error: BaseException) -> None:
        """Every request the thread holds or will find in its inbox fails with `error`, at once."""
        sequences = [*self._active.values(), *self._pending, *(self._embedder.take_all() if self._embedder else ())]
        self._active.clear()
        self._pending.clear()
        while True:
            try:
                command, sequence = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == _STOP:
                self._closing = True
            elif sequence is not None:
                sequences.append(sequence)
        out = []
        for sequence in sequences:
            self._dequeue(sequence)
            if not sequence.finished:
                sequence.finished = True
                out.append((sequence.queue, copy.copy(error)))  # one each: raising it sets its traceback
        self._send(out)

    # -- the generation thread: scheduling -------------------------------------------------------------------

    def _serve(self) -> None:
        """Run one BatchGenerator until close() (returns) or a failure nobody can be blamed for (raises)."""
        self._stepped = False
        if self._masks is not None:
            self._masks.reset()
        eos = [[t] for t in sorted(self._tokenizer.eos_token_ids)]
        generator = BatchGenerator(
            self._model,
            stop_tokens=eos,
            completion_batch_size=self.backend.max_batch_size,
            prefill_batch_size=self.backend.prefill_batch_size,
            prefill_step_size=self.backend.prefill_step_size,
        )
        try:
            while True:
                embedding = self._embedder is not None and self._embedder.jobs
                if not self._admit(generator, wait=not self._active and not self._pending and not embedding):
                    return
                self._fill_slots(generator)
                if self._active:
                    self._decode(generator)
                if self._embedder is not None and self._embedder.jobs:
                    self._embed_batch()  # one batch between two decode steps
        finally:
            with contextlib.suppress(Exception):
                generator.close()

    def _admit(self, generator: BatchGenerator, wait: bool) -> bool:
        """Take every command that arrived; block only when idle. Returns False to stop the thread."""
        while True:
            try:
                command, sequence = self._inbox.get() if wait else self._inbox.get_nowait()
            except queue.Empty:
                return True
            wait = False
            if command == _STOP:
                return False
            if command == _EMBED:
                self._embedder.jobs.append(sequence)
            elif command == _SUBMIT:
                self._pending.append(sequence)
                if sequence.fault == "thread":
                    self._inject = "thread"
            elif not sequence.finished:  # cancelled: the client went away
                if sequence.uid in self._active:
                    generator.remove([sequence.uid])
                    del self._active[sequence.uid]
                elif sequence.uid is None:
                    self._counters["cancelled_waiting"] += 1  # dropped before any prefill
                sequence.finished = True
                self._dequeue(sequence)

    def _fill_slots(self, generator: BatchGenerator) -> None:
        """Drop what waited too long or was cancelled, then give free slots to the oldest waiting requests."""
        pending, limit = self._pending, self.backend.max_batch_size
        deadline = time.perf_counter() - self.backend.max_queue_wait_s
        expired = []
        while pending and (pending[0].finished or pending[0].cancelled or pending[0].submitted < deadline):
            sequence = pending.popleft()
            if not sequence.finished and not sequence.cancelled:
                expired.append(sequence)
            elif not sequence.finished:
                self._counters["cancelled_waiting"] += 1
                sequence.finished = True
            self._dequeue(sequence)
        for sequence in expired:
            self._counters["expired"] += 1
            wait = self.backend.max_queue_wait_s
            self._fail(sequence, OverloadedError(f"model '{self.info.name}' is overloaded: no slot within {wait:g} s"))
        later = []  # waiting for a shared prefix another request is prefilling
        while pending and len(self._active) < limit:
            sequence = pending.popleft()
            if not (sequence.finished or sequence.cancelled) and self._prefixes.waits_for_prefix(
                sequence.prompt, self._active
            ):
                later.append(sequence)
                continue
            self._dequeue(sequence)
            if sequence.finished or sequence.cancelled:
                if not sequence.finished:
                    self._counters["cancelled_waiting"] += 1
                    sequence.finished = True
                continue
            try:
                self._insert(generator, sequence)
            except Exception as exc:
                self._fail(sequence, self._row_error(exc, "could not start this request"))
        pending.extendleft(reversed(later))

    def _embed_batch(self) -> None:
        complete, failed, exc = self._embedder.step()
        for job in complete:
            job.finished = True
        self._send([(job.queue, embeddings_of(job)) for job in complete])
        for job in failed:
            self._fail(job, self._row_error(exc, "could not embed this request"))
        self._stepped = self._stepped or bool(complete)

    def _dequeue(self, sequence: _Sequence) -> None:
        if sequence.queued:
            sequence.queued = False
            self._dequeued += 1

    def _insert(self, generator: BatchGenerator, sequence: _Sequence) -> None:
        sampling = sequence.request.sampling
        # mlx-lm takes top_k in (0, vocabulary) only; keeping the whole vocabulary is what top_k 0 means.
        top_k = 0 if self.info.vocab_size and sampling.top_k >= self.info.vocab_size else sampling.top_k
        params = (sampling.temperature, sampling.top_p, top_k, sampling.min_p)
        sampler = _shared_sampler(*params) if sampling.seed is None else _seeded_sampler(*params, sampling.seed)
        if sequence.fault == "sampler":
            sampler = _Guarded(_faulty_sampler, sampler=True)
        processors = [
            _Guarded(p, sampler=False)
            for p in make_logits_processors(
                repetition_penalty=sampling.repetition_penalty,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
            )
        ]
        if sequence.matcher is not None:  # the grammar's hooks: first processor, and the sampler around the row's
            feed, sample = self._masks.hooks(sequence.matcher, sampler.fn)
            sampler = _Guarded(sample, sampler=True)
            processors.insert(0, _Guarded(feed, sampler=False))
        detokenizer = self._tokenizer.detokenizer
        cache, rest = self._prefixes.fetch(sequence.prompt)
        cached = len(sequence.prompt) - len(rest)
        segments = self._prefixes.segments(sequence.prompt, cached, self._pending)
        (uid,) = generator.insert_segments(
            [segments],
            max_tokens=[sequence.max_tokens],
            caches=[cache],
            all_tokens=[sequence.prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        sequence.uid, sequence.detokenizer, sequence.guards = uid, detokenizer, (sampler, *processors)
        self._active[uid] = sequence
        self._prefixes.filling(uid, sequence.prompt, cached, segments)
        sequence.cached = cached
        self._counters["prompt_tokens"] += len(sequence.prompt)
        self._counters["cached_prompt_tokens"] += cached
        self._counters["prefilled_tokens"] += len(rest)

    def _keep_cache(self, generator: BatchGenerator, tokens: list[int] | None, cache: list | None) -> None:
        """A finished sequence's cache (prompt and answer): the next turn of its chat starts from it."""
        self._prefixes.keep(tokens, cache, "assistant", lambda: generator.prompt_cache_nbytes)

    # -- the generation thread: one step ---------------------------------------------------------------------

    def _decode(self, generator: BatchGenerator) -> None:
        """One BatchGenerator step (a decode step for the running rows, a prefill chunk for new ones). A sampler or
        processor that raised fails its rows after the step; any other exception is the generator's own."""
        faults: dict[_Guarded, BaseException] = {}
        _step.faults = faults
        try:
            if self._inject is not None:
                self._inject = None
                raise _InjectedFault("test fault injection: the generation step raised")
            step_started = time.perf_counter()
            prompt_responses, responses = generator.next()
        finally:
            _step.faults = None
        self._stepped = True
        for response in prompt_responses:
            sequence = self._active.get(response.uid)
            if sequence is not None and not sequence.prompt_started:
                sequence.prompt_started = step_started
        if prompt_responses:
            self._prefixes.prefilled(generator, prompt_responses, lambda: generator.prompt_cache_nbytes)
        if faults:
            self._fail_faulted(generator, faults)
        if responses:
            self._emit(generator, responses)

    def _fail_faulted(self, generator: BatchGenerator, faults: dict[_Guarded, BaseException]) -> None:
        failed = [
            (uid, sequence, faults[guard])
            for uid, sequence in self._active.items()
            for guard in sequence.guards
            if guard in faults
        ]
        if not failed:
            return
        uids = list(dict.fromkeys(uid for uid, _, _ in failed))
        generator.remove(uids)
        for uid, sequence, exc in failed:
            if self._active.pop(uid, None) is not None:
                self._fail(sequence, self._row_error(exc, "sampling failed for this request"))

    def _emit(self, generator: BatchGenerator, responses: list) -> None:
        now = time.perf_counter()
        active = self._active
        self._counters["decode_steps"] += 1
        self._counters["generated_tokens"] += len(responses)
        self._counters["max_batch"] = max(self._counters["max_batch"], len(responses))
        out: list[tuple[asyncio.Queue, Delta]] = []
        stopped: list[int] = []
        failed: list[tuple[int, _Sequence, Exception]] = []
        for r in responses:
            sequence = active.get(r.uid)
            if sequence is None:
                continue
            try:
                delta = self._delta(sequence, r, now)
            except Exception as exc:  # this row's detokenizer, stop strings or logprobs: this row alone fails
                failed.append((r.uid, sequence, exc))
                continue
            if delta.finish_reason is not None:
                sequence.finished = True
                del active[r.uid]
                if r.finish_reason is None:  # a stop string: BatchGenerator still holds the row
                    stopped.append(r.uid)
                else:
                    self._keep_cache(generator, r.all_tokens, r.prompt_cache)
            out.append((sequence.queue, delta))
        if stopped:
            for cache, tokens in generator.remove(stopped, return_prompt_caches=True).values():
                self._keep_cache(generator, tokens, cache)
        if failed:
            generator.remove([uid for uid, _, _ in failed])
            for uid, sequence, exc in failed:
                del active[uid]
                self._fail(sequence, self._row_error(exc, "could not produce this request's text"))
        self._send(out)

    def _delta(self, sequence: _Sequence, r: Any, now: float) -> Delta:
        if sequence.fault == "emit":
            raise RuntimeError("test fault injection: building this row's delta raised")
        if not sequence.first_token:
            sequence.first_token = now
        sequence.completion_tokens += 1
        finish = r.finish_reason
        detokenizer = sequence.detokenizer
        if finish != "stop":  # an end-of-sequence token ends the text without adding to it
            detokenizer.add_token(r.token)
        if finish is not None:
            detokenizer.finalize()
        text = sequence.stops.feed(detokenizer.last_segment)
        stop_sequence = None
        if sequence.stops.stopped:
            finish, stop_sequence = "stop", sequence.stops.matched
        elif finish is not None:
            text += sequence.stops.flush()
        delta = Delta(text=text, token_ids=[r.token], finish_reason=finish, stop_sequence=stop_sequence)
        if sequence.request.sampling.logprobs is not None:
            delta.logprobs = [self._logprob(r.token, r.logprobs, sequence.request.sampling.logprobs)]
        if finish is not None:
            delta.usage = self._usage(sequence, now)
        return delta

    def _logprob(self, token: int, logprobs: Any, top: int) -> TokenLogprob:
        decode = self._tokenizer.decode
        chosen = TokenLogprob(token=decode([token]), token_id=token, logprob=logprobs[token].item())
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids].tolist()
            pairs = sorted(zip(ids.tolist(), values, strict=True), key=lambda p: -p[1])
            chosen.top = [TopLogprob(token=decode([i]), token_id=i, logprob=v) for i, v in pairs]
        return chosen

    @staticmethod
    def _usage(sequence: _Sequence, now: float) -> Usage:
        started = sequence.prompt_started or sequence.submitted
        return Usage(
            prompt_tokens=len(sequence.prompt),
            completion_tokens=sequence.completion_tokens,
            cached_prompt_tokens=sequence.cached,
            queue_s=started - sequence.submitted,
            prompt_s=sequence.first_token - started,
            decode_s=now - sequence.first_token,
        )

    # -- the generation thread: failing requests -------------------------------------------------------------

    def _row_error(self, exc: BaseException, what: str) -> LitestarLLMError:
        """What one sequence's own failure tells its client: mlx-lm's argument checks (ValueError, TypeError,
        OverflowError) are the request's fault (400); anything else is the engine's (503)."""
        if isinstance(exc, LitestarLLMError):
            return exc
        if isinstance(exc, (ValueError, TypeError, OverflowError)):
            logger.info("model %s: %s: %s", self.info.name, what, exc)
            return InvalidRequestError(f"{what}: {exc}")
        logger.error("model %s: %s", self.info.name, what, exc_info=exc)
        return EngineUnavailableError(f"model '{self.info.name}' {what}: {type(exc).__name__}: {exc}")

    def _fail(self, sequence: _Sequence, error: BaseException) -> None:
        self._dequeue(sequence)
        if not sequence.finished:
            sequence.finished = True
            self._counters["failed"] += 1
            self._send([(sequence.queue, error)])

    def _send(self, items: list[tuple[asyncio.Queue, Any]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                self._loop.call_soon_threadsafe(_deliver, items)


class _InjectedFault(RuntimeError):
    """The `thread` test fault."""


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _set_result(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _model_info(info: ModelInfo, config: dict, tokenizer: Any, folder: Path) -> ModelInfo:
    files = folder_files(folder)
    quant = config.get("quantization") or {}
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").upper()
    # Sampling draws from the logits' width (config vocab_size, often padded past the tokenizer); only ids the
    # tokenizer knows can be decoded. The smaller bounds both top_k / logprobs and prompt token ids.
    widths = [config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size"), len(tokenizer)]
    vocab = min((w for w in widths if isinstance(w, int) and w > 0), default=None)
    return msgspec.structs.replace(
        info,
        context_length=config.get("max_position_embeddings"),
        vocab_size=vocab,
        max_seed=MAX_SEED,
        family=config.get("model_type"),
        parameter_count=parameter_count(folder),
        quantization=f"Q{quant['bits']}" if "bits" in quant else (dtype.replace("FLOAT", "F") or None),
        size_bytes=sum(p.stat().st_size for p in files) or None,
        modified_at=max((p.stat().st_mtime for p in files), default=None),
        chat_template=getattr(tokenizer, "chat_template", None),
        on_gpu=mx.default_device() == mx.gpu,
    )
