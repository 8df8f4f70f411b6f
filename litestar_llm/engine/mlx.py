"""MLX backend: mlx-lm's BatchGenerator on one generation thread per model, bridged to asyncio.

The shape is mlx_lm.server's (one thread, a queue in, continuous batching) with one scheduling change: the
thread admits newly arrived requests before *every* decode step instead of after a time budget of steps, so a
new request's prefill starts within one step of its arrival (TTFT) while running sequences keep decoding.
Results go back through one `call_soon_threadsafe` per step into per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import msgspec

from litestar_llm.config import MLXBackendConfig, ModelConfig
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import folder_files, parameter_count
from litestar_llm.engine.stops import StopStringMatcher
from litestar_llm.engine.types import Delta, GenerationRequest, TokenLogprob, TopLogprob, Usage
from litestar_llm.errors import EngineUnavailableError, InvalidRequestError, MissingDependencyError, ModelLoadError

try:
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingDependencyError("mlx-lm", "mlx") from exc

logger = logging.getLogger(__name__)


@lru_cache(maxsize=256)
def _shared_sampler(temperature: float, top_p: float, top_k: int, min_p: float):
    """Requests with equal unseeded parameters share one sampler object, which BatchGenerator samples in one
    batched call instead of row by row."""
    return make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0, top_k=top_k, min_p=min_p)


def _seeded_sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int):
    """A sampler with its own PRNG key: the same seed gives the same tokens whatever else shares the batch."""
    if temperature == 0:
        return _shared_sampler(0.0, 1.0, 0, 0.0)
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

    return sample


class _Sequence:
    """One request's state, shared between the event loop (queue) and the generation thread (the rest)."""

    __slots__ = (
        "completion_tokens",
        "detokenizer",
        "finished",
        "first_token",
        "max_tokens",
        "prompt",
        "prompt_started",
        "queue",
        "request",
        "stops",
        "submitted",
        "uid",
    )  # fmt: skip

    def __init__(self, request: GenerationRequest, prompt: list[int], max_tokens: int) -> None:
        self.request = request
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.uid: int | None = None
        self.detokenizer: Any = None
        self.stops = StopStringMatcher(request.sampling.stop)
        self.completion_tokens = 0
        self.submitted = time.perf_counter()
        self.prompt_started = 0.0
        self.first_token = 0.0
        self.finished = False


_SUBMIT, _CANCEL, _STOP = "submit", "cancel", "stop"


class MLXEngine(Engine):
    def __init__(self, model: ModelConfig, backend: MLXBackendConfig, backend_name: str) -> None:
        self.config = model
        self.backend = backend
        self.info = ModelInfo(name=model.name, backend="mlx", source=model.source, created=int(time.time()))
        self._inbox: queue.SimpleQueue[tuple[str, _Sequence | None]] = queue.SimpleQueue()
        # KV caches of finished sequences, reused for prompts that share a prefix (the next turn of a chat,
        # a common system prompt): mlx_lm.server's own LRU cache, touched only by the generation thread.
        self._prompt_cache = LRUPromptCache(max_size=backend.prompt_cache_size)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._alive = False
        # Counters read by /ready and the tests: they show whether concurrent requests really share steps.
        self._counters = {
            "decode_steps": 0, "generated_tokens": 0, "max_batch": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
        }  # fmt: skip
        self._running = 0
        self._waiting = 0

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
        self._inbox.put((_STOP, None))
        await asyncio.to_thread(self._thread.join, 30)
        self._thread = None

    @property
    def ready(self) -> bool:
        return self._alive

    def stats(self) -> dict[str, Any]:
        return {**self._counters, "running": self._running, "waiting": self._waiting}

    # -- the event-loop side ---------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if not self._alive:
            raise EngineUnavailableError(f"model '{self.info.name}' is not loaded")
        prompt = await asyncio.to_thread(self._encode, request)
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
        sequence = _Sequence(request, prompt, max_tokens or room)
        self._inbox.put((_SUBMIT, sequence))
        try:
            while True:
                item = await sequence.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not sequence.finished:
                self._inbox.put((_CANCEL, sequence))

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._encode, request))

    def _encode(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                ids = self._tokenizer.apply_chat_template(
                    messages, add_generation_prompt=request.add_generation_prompt, tokenize=True
                )
            except Exception as exc:  # the template rejected the conversation (roles, order)
                raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from None
            return list(ids)
        if isinstance(request.prompt, list):
            vocab = len(self._tokenizer)
            if any(not 0 <= t < vocab for t in request.prompt):
                raise InvalidRequestError(f"token ids must be in [0, {vocab})", "prompt")
            return list(request.prompt)
        text = request.prompt or ""
        bos = self._tokenizer.bos_token
        ids = self._tokenizer.encode(text, add_special_tokens=bool(bos) and not text.startswith(bos))
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return ids

    # -- the generation thread -------------------------------------------------------------------------------

    def _run(self, loaded: asyncio.Future[None]) -> None:
        try:
            self._load()
        except Exception as exc:
            self._loop.call_soon_threadsafe(_set_exception, loaded, exc)
            return
        self._alive = True
        self._loop.call_soon_threadsafe(_set_result, loaded)
        try:
            self._serve()
        except Exception as exc:  # a broken engine fails its requests and /ready, never hangs them
            logger.exception("generation thread for %s stopped", self.info.name)
            self._alive = False
            self._fail_all(EngineUnavailableError(f"model '{self.info.name}' stopped: {exc}"))

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
        try:
            self.info = _model_info(self.info, config, tokenizer, Path(source))
        except Exception as exc:
            raise ModelLoadError(self.info.name, source, f"cannot read the model's files: {exc}") from None

    def _serve(self) -> None:
        eos = [[t] for t in sorted(self._tokenizer.eos_token_ids)]
        generator = BatchGenerator(
            self._model,
            stop_tokens=eos,
            completion_batch_size=self.backend.max_batch_size,
            prefill_batch_size=self.backend.prefill_batch_size,
            prefill_step_size=self.backend.prefill_step_size,
        )
        active: dict[int, _Sequence] = {}
        try:
            while True:
                if not self._admit(generator, active, wait=not active):
                    return
                if not active:
                    continue
                step_started = time.perf_counter()
                prompt_responses, responses = generator.next()
                for response in prompt_responses:
                    sequence = active.get(response.uid)
                    if sequence is not None and not sequence.prompt_started:
                        sequence.prompt_started = step_started
                if responses:
                    self._emit(generator, active, responses)
                    self._count_load(active)
        finally:
            generator.close()
            self._fail_all(EngineUnavailableError(f"model '{self.info.name}' is shutting down"), active)

    def _admit(self, generator: BatchGenerator, active: dict[int, _Sequence], wait: bool) -> bool:
        """Take every command that arrived; block only when idle. Returns False to stop the thread."""
        while True:
            try:
                command, sequence = self._inbox.get(timeout=None) if wait else self._inbox.get_nowait()
            except queue.Empty:
                break
            wait = False
            if command == _STOP:
                return False
            if command == _SUBMIT:
                self._insert(generator, active, sequence)
            elif sequence.uid in active:  # cancelled: the client went away
                generator.remove([sequence.uid])
                del active[sequence.uid]
                sequence.finished = True
        self._count_load(active)
        return True

    def _count_load(self, active: dict[int, _Sequence]) -> None:
        self._running = min(len(active), self.backend.max_batch_size)
        self._waiting = len(active) - self._running

    def _insert(self, generator: BatchGenerator, active: dict[int, _Sequence], sequence: _Sequence) -> None:
        sampling = sequence.request.sampling
        params = (sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_p)
        sampler = _shared_sampler(*params) if sampling.seed is None else _seeded_sampler(*params, sampling.seed)
        processors = make_logits_processors(
            repetition_penalty=sampling.repetition_penalty,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
        )
        cache, rest = self._cached_prefix(sequence.prompt)
        cached = len(sequence.prompt) - len(rest)
        (uid,) = generator.insert(
            [rest],
            max_tokens=[sequence.max_tokens],
            caches=[cache],
            all_tokens=[sequence.prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
        )
        sequence.uid = uid
        sequence.detokenizer = self._tokenizer.detokenizer
        active[uid] = sequence
        self._counters["prompt_tokens"] += len(sequence.prompt)
        self._counters["cached_prompt_tokens"] += cached

    def _cached_prefix(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """The KV cache of the longest cached prefix of `prompt`, and the tokens still to prefill (never none:
        the last prompt token must go through the model to give the first logits)."""
        if not self.backend.prompt_cache_size:
            return None, prompt
        cache, rest = self._prompt_cache.fetch_nearest_cache(self.info.name, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _keep_cache(self, tokens: list[int] | None, cache: list | None) -> None:
        if self.backend.prompt_cache_size and tokens and cache:
            self._prompt_cache.insert_cache(self.info.name, list(tokens), cache)

    def _emit(self, generator: BatchGenerator, active: dict[int, _Sequence], responses: list) -> None:
        now = time.perf_counter()
        self._counters["decode_steps"] += 1
        self._counters["generated_tokens"] += len(responses)
        self._counters["max_batch"] = max(self._counters["max_batch"], len(responses))
        out: list[tuple[asyncio.Queue, Delta]] = []
        stopped: list[int] = []
        for r in responses:
            sequence = active.get(r.uid)
            if sequence is None:
                continue
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
            if sequence.stops.stopped:
                finish = "stop"
                stopped.append(r.uid)
            elif finish is not None:
                text += sequence.stops.flush()
            delta = Delta(text=text, token_ids=[r.token], finish_reason=finish)
            if sequence.request.sampling.logprobs is not None:
                delta.logprobs = [self._logprob(r.token, r.logprobs, sequence.request.sampling.logprobs)]
            if finish is not None:
                delta.usage = self._usage(sequence, now)
                sequence.finished = True
                del active[r.uid]
                self._keep_cache(r.all_tokens, r.prompt_cache)
            out.append((sequence.queue, delta))
        if stopped:
            for cache, tokens in generator.remove(stopped, return_prompt_caches=True).values():
                self._keep_cache(tokens, cache)
        if out:
            self._loop.call_soon_threadsafe(_deliver, out)

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
            queue_s=started - sequence.submitted,
            prompt_s=sequence.first_token - started,
            decode_s=now - sequence.first_token,
        )

    def _fail_all(self, error: BaseException, active: dict[int, _Sequence] | None = None) -> None:
        pending = list((active or {}).values())
        while True:
            try:
                command, sequence = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == _SUBMIT:
                pending.append(sequence)
        out = [(s.queue, error) for s in pending if not s.finished]
        if out and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, out)


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
    return msgspec.structs.replace(
        info,
        context_length=config.get("max_position_embeddings"),
        family=config.get("model_type"),
        parameter_count=parameter_count(folder),
        quantization=f"Q{quant['bits']}" if "bits" in quant else (dtype.replace("FLOAT", "F") or None),
        size_bytes=sum(p.stat().st_size for p in files) or None,
        modified_at=max((p.stat().st_mtime for p in files), default=None),
        chat_template=getattr(tokenizer, "chat_template", None),
        on_gpu=mx.default_device() == mx.gpu,
    )
