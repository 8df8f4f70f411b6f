"""vLLM backend: vLLM's own `AsyncLLM` in this process, no HTTP hop.

`AsyncLLM` runs vLLM's scheduler and model workers in its own child processes (EngineCore, workers) and
talks to them over ZMQ; this side only tokenizes, submits and reads `RequestOutput` deltas on the event loop.
`[backends.<name>.engine_args]` goes to `AsyncEngineArgs` as it is (checked against its fields in config.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from litestar_llm.config import ModelConfig, VLLMBackendConfig
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.files import folder_files, parameter_count
from litestar_llm.engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob, TopLogprob, Usage
from litestar_llm.errors import EngineUnavailableError, InvalidRequestError, MissingDependencyError, ModelLoadError

try:
    from vllm import AsyncEngineArgs
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingDependencyError("vllm", "vllm") from exc

try:
    from vllm.exceptions import VLLMValidationError
except ImportError:  # pragma: no cover - older vLLM
    VLLMValidationError = ValueError  # type: ignore[misc,assignment]

logger = logging.getLogger(__name__)

_FINISH: dict[str | None, FinishReason | None] = {"stop": "stop", "length": "length", "abort": "cancelled", None: None}


class _SchedulerStats:
    """A vLLM stat logger (per-engine factory signature) that keeps the last scheduler figures for /ready."""

    def __init__(self, sink: dict[str, Any]) -> None:
        self._sink = sink

    def __call__(self, vllm_config: Any, engine_index: int = 0) -> _SchedulerStats:
        return self

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0):
        if scheduler_stats is not None:
            self._sink["running"] = scheduler_stats.num_running_reqs
            self._sink["waiting"] = scheduler_stats.num_waiting_reqs
            self._sink["kv_cache_usage"] = round(float(scheduler_stats.kv_cache_usage), 6)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMEngine(Engine):
    def __init__(self, model: ModelConfig, backend: VLLMBackendConfig, backend_name: str) -> None:
        self.config = model
        self.backend = backend
        self.backend_name = backend_name
        self.info = ModelInfo(
            name=model.name, backend="vllm", source=model.source, created=int(time.time()), structured_output=True
        )
        self._llm: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._alive = False
        self._scheduler: dict[str, Any] = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        self._counters = {"requests": 0, "in_flight": 0, "prompt_tokens": 0, "generated_tokens": 0}

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        source = self.config.source
        try:
            # Loading takes a while (child processes, weights, warm-up); keep the event loop free meanwhile.
            self._llm = await asyncio.to_thread(self._construct)
        except Exception as exc:
            reason = _one_line(exc)
            if not Path(source).exists() and "not found" not in reason.lower() and "cache" not in reason.lower():
                reason = f"not a local folder, and not loadable from the Hugging Face hub or its cache ({reason})"
            raise ModelLoadError(self.info.name, source, reason) from None
        start_output_handler = getattr(self._llm, "_run_output_handler", None)
        if start_output_handler is not None:  # see engine failures while idle, not only at the next request
            start_output_handler()
        self._tokenizer = self._llm.get_tokenizer()
        model_config = self._llm.model_config
        self._vocab_size = model_config.get_vocab_size()
        try:
            self.info = await asyncio.to_thread(_model_info, self.info, model_config, self._tokenizer, Path(source))
        except Exception as exc:
            logger.warning("cannot read the facts of %s from its files: %s", self.info.name, exc)
        self._alive = True

    def _construct(self) -> Any:
        args = AsyncEngineArgs(model=self.config.source, **self.backend.engine_args)
        stat_loggers = [_SchedulerStats(self._scheduler)]
        with _STARTING, _ChildOutput() as child_output:
            try:
                return AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
            except Exception as exc:
                # A failure inside vLLM's engine process reaches here as "see root cause above": find that cause
                # in what the child processes wrote (the copying threads may lag a moment behind).
                if "root cause" not in str(exc):
                    raise
                for _ in range(20):
                    if (cause := child_output.root_cause()) is not None:
                        raise RuntimeError(cause) from exc
                    time.sleep(0.05)
                raise

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        self._alive = False
        if llm is not None:
            # Stops vLLM's engine process and its workers; it blocks for a few seconds, so off the event loop.
            await asyncio.to_thread(llm.shutdown)

    @property
    def ready(self) -> bool:
        return self._alive and self._llm is not None and not self._llm.errored

    def stats(self) -> dict[str, Any]:
        scheduler = dict(self._scheduler)
        if not self._counters["in_flight"]:  # the last scheduler report may predate the last abort
            scheduler["running"] = scheduler["waiting"] = 0
        return {**self._counters, **scheduler}

    # -- generation ------------------------------------------------------------------------------------------

    async def count_prompt_tokens(self, request: GenerationRequest) -> int:
        return len(await asyncio.to_thread(self._encode, request))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if not self.ready:
            raise EngineUnavailableError(f"model '{self.info.name}' is not loaded")
        prompt = await asyncio.to_thread(self._encode, request)
        params = self._sampling_params(request, len(prompt))
        engine_input = await self._engine_input(prompt)
        request_id = f"{self.info.name}-{uuid.uuid4().hex}"
        sampling = request.sampling
        outputs = self._llm.generate(engine_input, params, request_id)
        completion = 0
        self._counters["requests"] += 1
        self._counters["in_flight"] += 1
        self._counters["prompt_tokens"] += len(prompt)
        try:
            async for out in outputs:
                output = out.outputs[0]
                token_ids = list(output.token_ids)
                completion += len(token_ids)
                self._counters["generated_tokens"] += len(token_ids)
                if out.finished and output.finish_reason == "error":
                    raise EngineUnavailableError(f"model '{self.info.name}': vLLM failed this generation")
                finish = _FINISH.get(output.finish_reason, "stop") if out.finished else None
                delta = Delta(text=output.text, token_ids=token_ids, finish_reason=finish)
                if sampling.logprobs is not None and output.logprobs is not None:
                    delta.logprobs = self._logprobs(token_ids, output.logprobs, sampling.logprobs)
                if out.finished:
                    delta.usage = _usage(len(prompt), completion, out.metrics)
                yield delta
                if out.finished:
                    return
            raise EngineUnavailableError(f"model '{self.info.name}': the generation ended without finishing")
        except EngineDeadError as exc:
            self._alive = False
            raise EngineUnavailableError(f"model '{self.info.name}' stopped: {_one_line(exc)}") from None
        except VLLMValidationError as exc:
            raise InvalidRequestError(_one_line(exc)) from None
        finally:
            self._counters["in_flight"] -= 1
            # Closing vLLM's generator early (client gone) aborts the request in the engine.
            await outputs.aclose()

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                # As vLLM's own chat endpoint does: render the template to text, then tokenize it as it is.
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=request.add_generation_prompt, tokenize=False
                )
            except Exception as exc:  # the template rejected the conversation (roles, order)
                raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from None
            ids = list(tokenizer.encode(text, add_special_tokens=False))
        elif isinstance(request.prompt, list):
            if any(not 0 <= t < self._vocab_size for t in request.prompt):
                raise InvalidRequestError(f"token ids must be in [0, {self._vocab_size})", "prompt")
            ids = list(request.prompt)
        else:
            text = request.prompt or ""
            bos = tokenizer.bos_token
            ids = list(tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))))
        param = "messages" if request.messages is not None else "prompt"
        if not ids:
            raise InvalidRequestError("the prompt is empty", param)
        context = self.info.context_length or 0
        if context and len(ids) >= context:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens; the prompt has {len(ids)}.", param=param
            )
        return ids

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int) -> Any:
        s = request.sampling
        context = self.info.context_length or 0
        room = context - prompt_tokens if context else None
        if s.max_tokens is not None and room is not None and s.max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens: the prompt has {prompt_tokens} and "
                f"max_tokens asks for {s.max_tokens} more.",
                param="max_tokens",
            )
        structured = None
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.json_object:
            structured = StructuredOutputsParams(json_object=True)
        try:
            return VLLMSamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                min_p=s.min_p,
                seed=s.seed,
                stop=list(s.stop) or None,
                max_tokens=s.max_tokens if s.max_tokens is not None else room,
                logprobs=s.logprobs,
                presence_penalty=s.presence_penalty or 0.0,
                frequency_penalty=s.frequency_penalty or 0.0,
                repetition_penalty=s.repetition_penalty if s.repetition_penalty is not None else 1.0,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMValidationError, ValueError) as exc:
            raise InvalidRequestError(_one_line(exc)) from None

    async def _engine_input(self, prompt: list[int]) -> Any:
        """The tokens as vLLM's renderer prepares them (the path `AsyncLLM.generate` asks callers to take)."""
        tokens = {"prompt_token_ids": prompt}
        renderer = getattr(self._llm, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):  # pragma: no cover - older vLLM
            return tokens
        try:
            (engine_input,) = await renderer.render_cmpl_async([tokens])
        except (VLLMValidationError, ValueError) as exc:
            raise InvalidRequestError(_one_line(exc)) from None
        return engine_input

    def _logprobs(self, token_ids: list[int], positions: Any, top: int) -> list[TokenLogprob]:
        """vLLM gives, per position, {token_id: Logprob(logprob, rank, decoded_token)}: the sampled token plus the
        `top` most likely ones (the sampled one appears once, with its own rank)."""
        result = []
        for token, position in zip(token_ids, positions, strict=False):
            position = position or {}
            chosen = position.get(token)
            entry = TokenLogprob(
                token=self._token_text(token, chosen),
                token_id=token,
                logprob=chosen.logprob if chosen is not None else float("-inf"),
            )
            if top:
                ranked = sorted(
                    ((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top),
                    key=lambda item: item[1].rank,
                )
                entry.top = [
                    TopLogprob(token=self._token_text(tid, lp), token_id=tid, logprob=lp.logprob)
                    for tid, lp in ranked[:top]
                ]
            result.append(entry)
        return result

    def _token_text(self, token: int, logprob: Any) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self._tokenizer.decode([token])


_STARTING = threading.Lock()
"""One vLLM start at a time in this process: each redirects the stdout and stderr its children inherit."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_VLLM_PREFIX = re.compile(r"^\([^)]*\) +[A-Z]+ +[\d-]+ +[\d:.]+ +\[[^\]]*\] ?")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Exit))(?:: (.+))?$")
_GENERIC = ("root cause", "initialization failed", "failed to start")


class _ChildOutput:
    """While vLLM starts, file descriptors 1 and 2 (which its engine and worker processes inherit; vLLM logs to
    stdout) are pipes that copy everything through to the real ones and keep the last lines, so that a child's
    failure can be reported in one line. The parent gets its own descriptors back at once; the copying threads
    end when the children exit."""

    FDS = (1, 2)

    def __init__(self) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=4000)
        self._saved: dict[int, int] = {}

    def __enter__(self) -> _ChildOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in self.FDS:
            self._saved[fd] = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pump, args=(read, self._saved[fd]), name="vllm-output", daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # each pump keeps its own copy of the real descriptor and closes it at the end

    def _pump(self, read: int, out: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                view = memoryview(chunk)
                try:
                    while view:
                        view = view[os.write(out, view) :]
                except OSError:  # the real descriptor is gone: keep draining the pipe so the children never block
                    pass
                *complete, pending = (pending + chunk).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in complete)
        os.close(out)

    def root_cause(self) -> str | None:
        """The first exception line a child wrote that is not a generic "see above" one."""
        for raw in list(self.lines):
            line = _VLLM_PREFIX.sub("", _ANSI.sub("", raw)).strip()
            match = _EXCEPTION_LINE.match(line)
            if match and not any(g in line.lower() for g in _GENERIC):
                return f"{match.group(1)}: {match.group(2)}" if match.group(2) else match.group(1)
        return None


def _usage(prompt_tokens: int, completion_tokens: int, metrics: Any) -> Usage:
    """vLLM's per-request timestamps (engine-side monotonic clock): queued, scheduled, first and last token."""
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    queued = getattr(metrics, "queued_ts", 0.0)
    scheduled = getattr(metrics, "scheduled_ts", 0.0)
    first = getattr(metrics, "first_token_ts", 0.0)
    last = getattr(metrics, "last_token_ts", 0.0)
    if queued and scheduled:
        usage.queue_s = max(scheduled - queued, 0.0)
    if scheduled and first:
        usage.prompt_s = max(first - scheduled, 0.0)
    if first and last:
        usage.decode_s = max(last - first, 0.0)
    return usage


def _one_line(exc: BaseException) -> str:
    """An exception as one readable line: pydantic's first error with its field, or the message's first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            field = ".".join(str(part) for part in first.get("loc", ())[:1])
            message = str(first.get("msg", "")).removeprefix("Value error, ")
            return f"{field}: {message}" if field else message
        except Exception:  # not pydantic's ValidationError after all
            pass
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _model_info(info: ModelInfo, model_config: Any, tokenizer: Any, folder: Path) -> ModelInfo:
    hf = getattr(model_config, "hf_config", None)
    dtype = str(getattr(model_config, "dtype", "") or "").removeprefix("torch.").upper()
    quantization = getattr(model_config, "quantization", None)
    changes: dict[str, Any] = {
        "context_length": model_config.max_model_len,
        "family": getattr(hf, "model_type", None),
        "quantization": str(quantization).upper() if quantization else (dtype.replace("FLOAT", "F") or None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "on_gpu": _on_gpu(),
    }
    if folder.is_dir():
        files = folder_files(folder)
        changes |= {
            "parameter_count": parameter_count(folder),
            "size_bytes": sum(p.stat().st_size for p in files) or None,
            "modified_at": max((p.stat().st_mtime for p in files), default=None),
        }
    return msgspec.structs.replace(info, **changes)


def _on_gpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cuda_alike() or current_platform.is_xpu())
    except Exception:  # pragma: no cover - platform probing is best effort
        return False
