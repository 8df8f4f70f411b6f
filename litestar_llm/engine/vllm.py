"""vLLM backend: vLLM's own `AsyncLLM` in this process, no HTTP hop.

`AsyncLLM` runs vLLM's scheduler and model workers in its own child processes (EngineCore, workers) and
talks to them over ZMQ; this side only tokenizes, submits and reads `RequestOutput` deltas on the event loop.
`[backends.<name>.engine_args]` goes to `AsyncEngineArgs` as it is (checked against its fields in config.py).

Tool calls and thinking are vLLM's own parsers (`[[models]] tool_parser` / `reasoning_parser`, or detected from
the chat template), driven as vLLM's chat endpoint drives them: one parser per sequence, built for a minimal
`ChatCompletionRequest`; its `adjust_request` sets the structured output that forces a call for
`tool_choice: "required"` or a named function, and `parse_delta` splits each delta into answer text, thinking
and tool-call fragments.
"""

from __future__ import annotations

import asyncio
import collections
import difflib
import json
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
from litestar_llm.engine.spacing import MarkerSpacing
from litestar_llm.engine.types import (
    ChatMessage,
    Delta,
    EmbeddingRequest,
    Embeddings,
    FinishReason,
    GenerationRequest,
    NamedToolChoice,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from litestar_llm.errors import EngineUnavailableError, InvalidRequestError, MissingDependencyError, ModelLoadError

try:
    from vllm import AsyncEngineArgs, PoolingParams
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

MAX_SEED = 2**63 - 1
"""vLLM's GPU model runner keeps seeds as int64: a larger one fails inside the engine process. Beyond 2**64 (or
below -2**63) the request fails on its way to the engine (a 500); -1 means "no seed" to vLLM."""
MAX_STOPS = 1024
"""Stop strings are matched in this process on every token: 50,000 of them slow every other stream 5x."""
MAX_STOP_CHARS = 65536


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
            name=model.name,
            backend="vllm",
            source=model.source,
            created=int(time.time()),
            structured_output=model.task != "embed",
            max_seed=MAX_SEED,
            embeddings=model.task == "embed",
        )
        self._llm: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._alive = False
        self._parsers = _Parsers()
        self._scheduler: dict[str, Any] = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        self._counters = {"requests": 0, "in_flight": 0, "prompt_tokens": 0, "generated_tokens": 0}

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        source = self.config.source
        # The parser names first: a misspelt one stops start-up at once, and the engine process must know the
        # reasoning parser (structured output, such as a forced tool call, starts after the thinking).
        self._parsers = await asyncio.to_thread(_Parsers.choose, self.config, self.backend.engine_args)
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
        self.info = msgspec.structs.replace(
            self.info,
            embedding_size=model_config.get_hidden_size() if self.config.task == "embed" else None,
            vocab_size=self._vocab_size,
            tools=self._parsers.tool is not None,
            thinking=self._parsers.reasoning is not None,
        )
        try:
            self.info = await asyncio.to_thread(_model_info, self.info, model_config, self._tokenizer, Path(source))
        except Exception as exc:
            logger.warning("cannot read the facts of %s from its files: %s", self.info.name, exc)
        if self._parsers.tool or self._parsers.reasoning:
            logger.info(
                "model %s: tool parser %s, reasoning parser %s",
                self.info.name,
                self._parsers.tool or "none",
                self._parsers.reasoning or "none",
            )
        self._alive = True

    def _construct(self) -> Any:
        engine_args = dict(self.backend.engine_args)
        if self._parsers.reasoning is not None:
            engine_args["reasoning_parser"] = self._parsers.reasoning
        elif getattr(self.config, "reasoning_parser", None) == "":
            engine_args.pop("reasoning_parser", None)
        if self.config.task == "embed":
            engine_args |= _pooling_args(self.config, engine_args)
        args = AsyncEngineArgs(model=self.config.source, **engine_args)
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
        self._check_sampling(request)
        prompt, parsing = await asyncio.to_thread(self._prepare, request)
        params = self._sampling_params(request, len(prompt), parsing)
        engine_input = await self._engine_input(prompt)
        request_id = f"{self.info.name}-{uuid.uuid4().hex}"
        sampling = request.sampling
        engine_kwargs = parsing.engine_kwargs(prompt) if parsing is not None else {}
        outputs = self._llm.generate(engine_input, params, request_id, **engine_kwargs)
        completion: list[int] = []
        self._counters["requests"] += 1
        self._counters["in_flight"] += 1
        self._counters["prompt_tokens"] += len(prompt)
        try:
            async for out in outputs:
                output = out.outputs[0]
                token_ids = list(output.token_ids)
                completion += token_ids
                self._counters["generated_tokens"] += len(token_ids)
                if out.finished and output.finish_reason == "error":
                    raise EngineUnavailableError(f"model '{self.info.name}': vLLM failed this generation")
                finish = _FINISH.get(output.finish_reason, "stop") if out.finished else None
                delta = Delta(text=output.text, token_ids=token_ids, finish_reason=finish)
                if parsing is not None:
                    parsing.split(delta, prompt, out.finished)
                if sampling.logprobs is not None and output.logprobs is not None:
                    delta.logprobs = self._logprobs(token_ids, output.logprobs, sampling.logprobs)
                if out.finished:
                    if isinstance(output.stop_reason, str):  # a stop string, not the end-of-sequence token
                        delta.stop_sequence = output.stop_reason
                    delta.usage = _usage(len(prompt), len(completion), out.metrics)
                    if parsing is not None:
                        delta.usage.reasoning_tokens = parsing.reasoning_tokens(completion)
                yield delta
                if out.finished:
                    return
            raise EngineUnavailableError(f"model '{self.info.name}': the generation ended without finishing")
        except EngineDeadError as exc:
            self._alive = False
            raise EngineUnavailableError(f"model '{self.info.name}' stopped: {_one_line(exc)}") from None
        except VLLMValidationError as exc:
            raise _invalid(exc, parsing) from None
        finally:
            self._counters["in_flight"] -= 1
            # Closing vLLM's generator early (client gone) aborts the request in the engine.
            await outputs.aclose()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Every input through `AsyncLLM.encode` at once: vLLM's scheduler batches them with other requests."""
        if not self.info.embeddings:
            return await super().embed(request)
        if not self.ready:
            raise EngineUnavailableError(f"model '{self.info.name}' is not loaded")
        inputs = await asyncio.to_thread(self._embedding_inputs, request)
        engine_inputs = [await self._engine_input(ids) for ids in inputs]
        self._counters["requests"] += 1
        self._counters["in_flight"] += 1
        self._counters["prompt_tokens"] += sum(map(len, inputs))
        try:
            vectors = await asyncio.gather(*(self._embed_one(item) for item in engine_inputs))
        except EngineDeadError as exc:
            self._alive = False
            raise EngineUnavailableError(f"model '{self.info.name}' stopped: {_one_line(exc)}") from None
        except VLLMValidationError as exc:
            raise _invalid(exc) from None
        finally:
            self._counters["in_flight"] -= 1
        return Embeddings(vectors=list(vectors), prompt_tokens=sum(map(len, inputs)))

    async def _embed_one(self, engine_input: Any) -> list[float]:
        outputs = self._llm.encode(engine_input, PoolingParams(task="embed"), f"{self.info.name}-{uuid.uuid4().hex}")
        try:
            async for out in outputs:
                if out.finished:
                    if getattr(out, "error", None) is not None:
                        raise EngineUnavailableError(f"model '{self.info.name}': vLLM failed this embedding")
                    return out.outputs.data.tolist()
            raise EngineUnavailableError(f"model '{self.info.name}': the embedding ended without a result")
        finally:
            await outputs.aclose()  # closed early (client gone, a sibling failed): aborted in the engine

    async def count_input_tokens(self, request: EmbeddingRequest) -> int | None:
        if not self.info.embeddings:
            return None
        return sum(map(len, await asyncio.to_thread(self._embedding_inputs, request)))

    def _embedding_inputs(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input as vLLM's embedding endpoint makes them; one beyond the context is cut (`truncate`)
        or refused naming its index."""
        context = self.info.context_length or 0
        inputs = []
        for i, item in enumerate(request.input):
            if isinstance(item, str):
                ids = list(self._tokenizer.encode(item, add_special_tokens=True))
            else:
                if any(not 0 <= t < self._vocab_size for t in item):
                    raise InvalidRequestError(
                        f"input[{i}]: token ids must be in [0, {self._vocab_size})", f"input[{i}]"
                    )
                ids = list(item)
            if context and len(ids) > context:
                if not request.truncate:
                    raise InvalidRequestError(
                        f"input[{i}] has {len(ids)} tokens, more than the model's maximum context length of "
                        f"{context} tokens",
                        param=f"input[{i}]",
                    )
                ids = ids[:context]
            if not ids:
                raise InvalidRequestError(f"input[{i}]: no tokens to embed", f"input[{i}]")
            inputs.append(ids)
        return inputs

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], _Parsing | None]:
        """The prompt's tokens and, for a chat request on a model with parsers, the sequence's parsing."""
        parsing = None
        if request.messages is not None:
            parsing = self._parsers.for_request(request, self._tokenizer, self._llm.model_config, self.info.name)
        return self._encode(request), parsing

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
            text = self._render(request)
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

    def _render(self, request: GenerationRequest) -> str:
        """The chat template rendered to text, as vLLM's chat endpoint does it (then tokenized as it is): the
        offered tools, the thinking switches and the client's chat_template_kwargs go to the template."""
        assert request.messages is not None
        if request.offered_tools and self._parsers.tool is None:
            raise InvalidRequestError(
                f"model '{self.info.name}' does not take tools: vLLM has no tool parser for it (set tool_parser in "
                "its [[models]] entry)",
                "tools",
            )
        kwargs = dict(request.template_kwargs())
        tools = kwargs.pop("tools", None)
        if reserved := {"chat_template", "tokenize"} & kwargs.keys():
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(sorted(reserved))}", "chat_template_kwargs"
            )
        for name in ("add_generation_prompt", "conversation", "messages"):
            kwargs.pop(name, None)
        messages = [_template_message(m) for m in request.messages]
        try:
            return self._tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=request.add_generation_prompt, tokenize=False, **kwargs
            )
        except Exception as exc:  # the template rejected the conversation (roles, order)
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", "messages") from None

    def _check_sampling(self, request: GenerationRequest) -> None:
        """What vLLM itself would let through and then fail on: a seed or top_k beyond what its engine process
        takes (a 500, or on the GPU model runner a dead engine), and stop lists so long that matching them on
        every token stalls every other stream. The rest vLLM's own SamplingParams refuse cleanly."""
        s = request.sampling
        if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be in [0, {MAX_SEED}], got {s.seed}", "seed")
        if self._vocab_size and s.top_k > self._vocab_size:
            raise InvalidRequestError(
                f"top_k must be at most the vocabulary size ({self._vocab_size}; 0 keeps every token), got {s.top_k}",
                "top_k",
            )
        if len(s.stop) > MAX_STOPS:
            raise InvalidRequestError(f"at most {MAX_STOPS} stop strings, got {len(s.stop)}", "stop")
        if sum(len(stop) for stop in s.stop) > MAX_STOP_CHARS:
            raise InvalidRequestError(f"the stop strings may have {MAX_STOP_CHARS} characters in all", "stop")

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int, parsing: _Parsing | None) -> Any:
        s = request.sampling
        context = self.info.context_length or 0
        room = context - prompt_tokens if context else None
        if s.max_tokens is not None and room is not None and s.max_tokens > room:
            raise InvalidRequestError(
                f"This model's maximum context length is {context} tokens: the prompt has {prompt_tokens} and "
                f"max_tokens asks for {s.max_tokens} more.",
                param="max_tokens",
            )
        structured = _structured_outputs(s)
        extra: dict[str, Any] = {}
        if parsing is not None:
            structured = parsing.structured_outputs
            extra["skip_special_tokens"] = parsing.skip_special_tokens
            if parsing.thinking_budget is not None:
                extra["thinking_token_budget"] = parsing.thinking_budget
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
                **extra,
            )
        except (VLLMValidationError, ValueError, TypeError, OverflowError) as exc:
            raise _invalid(exc, parsing) from None

    async def _engine_input(self, prompt: list[int]) -> Any:
        """The tokens as vLLM's renderer prepares them (the path `AsyncLLM.generate` asks callers to take)."""
        tokens = {"prompt_token_ids": prompt}
        renderer = getattr(self._llm, "renderer", None)
        if renderer is None or not hasattr(renderer, "render_cmpl_async"):  # pragma: no cover - older vLLM
            return tokens
        try:
            (engine_input,) = await renderer.render_cmpl_async([tokens])
        except (VLLMValidationError, ValueError) as exc:
            raise _invalid(exc) from None
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


# -- tools and thinking: vLLM's parsers ---------------------------------------------------------------------


def _detect_tool_parser(template: str) -> str | None:
    """A default from the chat template: `<tool_call>` JSON calls (Hermes, Qwen2.5, Qwen3) are hermes; the same
    tags around `<function=...>` XML (Qwen3-Coder) are qwen3_coder."""
    if "<tool_call>" not in template:
        return None
    return "qwen3_coder" if "<function=" in template else "hermes"


def _detect_reasoning_parser(template: str) -> str | None:
    """A default from the chat template: `<think>` with an enable_thinking switch is Qwen3's way (qwen3);
    without one, DeepSeek-R1's (deepseek_r1)."""
    if "<think>" not in template and "</think>" not in template:
        return None
    return "qwen3" if "enable_thinking" in template else "deepseek_r1"


def _registered(kind: str) -> list[str]:
    if kind == "tool_parser":
        from vllm.tool_parsers import ToolParserManager

        return ToolParserManager.list_registered()
    from vllm.reasoning import ReasoningParserManager

    return ReasoningParserManager.list_registered()


class _Parsers:
    """The parsers one model uses: their names, and vLLM's composed Parser class with and without thinking (a
    request that switches thinking off gets no reasoning parsing)."""

    def __init__(self, tool: str | None = None, reasoning: str | None = None) -> None:
        self.tool = tool
        self.reasoning = reasoning
        self.with_thinking: Any = None
        self.without_thinking: Any = None

    @classmethod
    def choose(cls, model: ModelConfig, engine_args: dict[str, Any]) -> _Parsers:
        """Explicit names (checked against vLLM's registries, with close matches), else what the chat template
        suggests; each checked against the tokenizer, as `vllm serve` does at start-up. A detected parser that
        does not fit the tokenizer is left out with a warning; an explicit one stops start-up."""
        wanted: dict[str, str | None] = {
            "tool_parser": getattr(model, "tool_parser", None),
            "reasoning_parser": getattr(model, "reasoning_parser", None),
        }
        if wanted["reasoning_parser"] is None and engine_args.get("reasoning_parser"):
            wanted["reasoning_parser"] = engine_args["reasoning_parser"]
        explicit = {kind: name is not None for kind, name in wanted.items()}
        for kind, name in wanted.items():
            if name:
                known = _registered(kind)
                if name not in known:
                    close = difflib.get_close_matches(name, known, n=3)
                    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(known)}"
                    raise ModelLoadError(model.name, model.source, f"{kind} '{name}' is not one of vLLM's; {hint}")
        if all(explicit.values()) and not any(wanted.values()):
            return cls()
        tokenizer = _probe_tokenizer(model.source, engine_args)
        if tokenizer is None and not any(wanted.values()):  # the engine's own start will say why
            return cls()
        template = str(getattr(tokenizer, "chat_template", None) or "")
        if not explicit["tool_parser"]:
            wanted["tool_parser"] = _detect_tool_parser(template)
        if not explicit["reasoning_parser"]:
            wanted["reasoning_parser"] = _detect_reasoning_parser(template)
        from vllm.parser import ParserManager

        for kind, name in wanted.items():
            if not name or tokenizer is None:
                continue
            try:
                ParserManager.get_parser(
                    tool_parser_name=name if kind == "tool_parser" else None,
                    reasoning_parser_name=name if kind == "reasoning_parser" else None,
                    enable_auto_tools=True,
                    model_name=model.source,
                    tokenizer=tokenizer,
                )
            except Exception as exc:
                if explicit[kind]:
                    raise ModelLoadError(model.name, model.source, f"{kind} '{name}': {_one_line(exc)}") from None
                logger.warning(
                    "model %s: not using the %s %s detected from its template: %s",
                    model.name,
                    kind,
                    name,
                    _one_line(exc),
                )
                wanted[kind] = None
        parsers = cls(wanted["tool_parser"] or None, wanted["reasoning_parser"] or None)
        if parsers.tool or parsers.reasoning:
            parsers.with_thinking = ParserManager.get_parser(
                tool_parser_name=parsers.tool,
                reasoning_parser_name=parsers.reasoning,
                enable_auto_tools=True,
                model_name=model.source,
            )
            parsers.without_thinking = parsers.with_thinking
            if parsers.reasoning:
                parsers.without_thinking = ParserManager.get_parser(
                    tool_parser_name=parsers.tool, enable_auto_tools=True, model_name=model.source
                )
        return parsers

    def for_request(self, request: GenerationRequest, tokenizer: Any, model_config: Any, model: str) -> _Parsing | None:
        """The sequence's parser and the minimal `ChatCompletionRequest` vLLM's parsers read (tools, tool_choice,
        parallel_tool_calls, chat_template_kwargs, structured outputs, messages), adjusted by the parser as vLLM's
        renderer adjusts it: for "required" or a named function that sets the JSON schema of the calls."""
        parser_cls = self.with_thinking if request.thinking else self.without_thinking
        if parser_cls is None:
            return None
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        tools = request.offered_tools
        choice = request.tool_choice
        if isinstance(choice, NamedToolChoice) and not tools:
            raise InvalidRequestError(
                f"tool_choice names the function '{choice.name}', which is not in tools", "tool_choice"
            )
        if choice == "required" and not tools:
            raise InvalidRequestError('tool_choice "required" needs tools', "tool_choice")
        if not tools or self.tool is None:
            tools, choice = [], "none"
        kwargs = request.template_kwargs()
        kwargs.pop("tools", None)
        data: dict[str, Any] = {
            "model": model,
            "messages": [_openai_message(m) for m in request.messages or []],
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, NamedToolChoice)
            else choice,
            "parallel_tool_calls": request.parallel_tool_calls,
            "chat_template_kwargs": kwargs,
            "include_reasoning": True,
            "stream": True,
            "structured_outputs": _structured_outputs(request.sampling),
        }
        if tools:
            data["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description or "",
                        "parameters": t.parameters,
                        **({"strict": True} if t.strict else {}),
                    },
                }
                for t in tools
            ]
        try:
            chat = ChatCompletionRequest.model_validate(data)
            parser = parser_cls(tokenizer, chat.tools, chat_template_kwargs=kwargs, model_config=model_config)
            if parser.always_adjust_request or parser.reasoning_parser is not None or chat.tool_choice != "none":
                chat = parser.adjust_request(chat)
        except VLLMValidationError as exc:
            raise _invalid(exc) from None
        except ValueError as exc:  # pydantic's ValidationError, or a tool vLLM cannot build a schema for
            raise InvalidRequestError(_one_line(exc), "tools" if tools else None) from None
        return _Parsing(parser, chat, request, reasoning_configured=self.reasoning is not None)


class _Parsing:
    """One sequence's parser at work: turns each of vLLM's deltas into answer text, thinking and tool-call
    fragments (ids and names on each call's first fragment, argument text after)."""

    def __init__(self, parser: Any, chat: Any, request: GenerationRequest, *, reasoning_configured: bool) -> None:
        self.parser = parser
        self.chat = chat
        self.structured_outputs = chat.extract_structured_outputs()
        self.forced = self.structured_outputs != _structured_outputs(request.sampling)
        """The structured output is the parser's (the calls' grammar), not the client's response format."""
        self.skip_special_tokens = chat.skip_special_tokens
        self.thinking = parser.reasoning_parser is not None
        self.thinking_budget = request.reasoning.budget_tokens if self.thinking else None
        self._reasoning_configured = reasoning_configured
        self._parallel = request.parallel_tool_calls
        self._indices: dict[int, int] = {}
        self._pending: dict[int, str] = {}
        self.called = False
        self._spacing = MarkerSpacing()

    def engine_kwargs(self, prompt: list[int]) -> dict[str, Any]:
        """`reasoning_ended` and `reasoning_parser_kwargs` for vLLM's engine, as its chat endpoint passes them: the
        engine applies structured output only after the thinking; with thinking off, from the first token."""
        if not self._reasoning_configured:
            return {}
        if not self.thinking:
            return {"reasoning_ended": True}
        return {
            "reasoning_ended": self.chat.resolve_reasoning_ended(self.parser, prompt),
            "reasoning_parser_kwargs": {"chat_template_kwargs": self.chat.chat_template_kwargs or {}},
        }

    def split(self, delta: Delta, prompt: list[int], finished: bool) -> None:
        message = self.parser.parse_delta(
            delta_text=delta.text,
            delta_token_ids=delta.token_ids,
            request=self.chat,
            prompt_token_ids=prompt,
            finished=finished,
        )
        reasoning = (message.reasoning or "") if message is not None else ""
        text = (message.content or "") if message is not None else ""
        calls = self._calls(message.tool_calls if message is not None else [])
        delta.reasoning = self._spacing.thought(reasoning) if reasoning else ""
        if text or calls:
            self._spacing.thought_ended()
        delta.text = self._spacing.answer(text) if text else ""
        if calls:
            delta.tool_calls = calls
            self.called = True
            self._spacing.call()
        if delta.finish_reason == "stop" and self.called:
            delta.finish_reason = "tool_calls"

    def _calls(self, vllm_calls: list[Any]) -> list[ToolCallDelta]:
        calls: list[ToolCallDelta] = []
        for call in vllm_calls:
            if self._parallel is False and call.index > 0:  # as vLLM does: the first call only
                continue
            name = call.function.name if call.function is not None else None
            arguments = (call.function.arguments or "") if call.function is not None else ""
            index = self._indices.get(call.index)
            if index is None:
                if not name:  # arguments before the name: held until the call can be announced
                    self._pending[call.index] = self._pending.get(call.index, "") + arguments
                    continue
                index = self._indices[call.index] = len(self._indices)
                arguments = self._pending.pop(call.index, "") + arguments
                calls.append(
                    ToolCallDelta(
                        index=index, id=call.id or f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=arguments
                    )
                )
            elif arguments:
                calls.append(ToolCallDelta(index=index, arguments=arguments))
        return calls

    def reasoning_tokens(self, token_ids: list[int]) -> int:
        if not self.thinking:
            return 0
        try:
            return int(self.parser.count_reasoning_tokens(tuple(token_ids)))
        except Exception:  # pragma: no cover - a parser that cannot tell
            return 0


def _message_text(message: ChatMessage) -> str:
    """Content parts joined as vLLM joins them for string-content templates."""
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it (vLLM's conversation format): an assistant's calls with their
    arguments as a dict (a malformed arguments text becomes {}, as vLLM does, so the conversation can go on), a
    tool result with its call id and name, an assistant's thinking as reasoning / reasoning_content."""
    result: dict[str, Any] = {"role": message.role, "content": _message_text(message)}
    if message.role == "assistant":
        if message.tool_calls:
            result["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.reasoning is not None:
            result["reasoning"] = result["reasoning_content"] = message.reasoning
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        result["name"] = message.name
    return result


def _openai_message(message: ChatMessage) -> dict[str, Any]:
    """A message in OpenAI's shape (arguments as JSON text), for the request vLLM's parsers read."""
    result: dict[str, Any] = {"role": message.role, "content": _message_text(message)}
    if message.tool_calls:
        result["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role in ("user", "system", "developer", "tool"):
        result["name"] = message.name
    return result


def _arguments(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text) if text else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _structured_outputs(s: Any) -> Any:
    if s.json_schema is not None:
        return StructuredOutputsParams(json=s.json_schema)
    if s.json_object:
        return StructuredOutputsParams(json_object=True)
    if s.regex is not None:
        return StructuredOutputsParams(regex=s.regex)
    if s.choice is not None:
        return StructuredOutputsParams(choice=s.choice)
    if s.grammar is not None:
        return StructuredOutputsParams(grammar=s.grammar)
    return None


def _probe_tokenizer(source: str, engine_args: dict[str, Any]) -> Any:
    """The model's tokenizer as vLLM loads it, before the engine starts: for its chat template and to check the
    parsers against it. None when it cannot be loaded (the engine's start then reports why)."""
    try:
        from vllm.tokenizers import get_tokenizer

        return get_tokenizer(
            engine_args.get("tokenizer") or source,
            tokenizer_mode=engine_args.get("tokenizer_mode", "auto"),
            trust_remote_code=bool(engine_args.get("trust_remote_code", False)),
            revision=engine_args.get("tokenizer_revision") or engine_args.get("revision"),
        )
    except Exception as exc:
        logger.debug("cannot load the tokenizer of %s ahead of the engine: %s", source, exc)
        return None


_PARAMS = frozenset(
    (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "max_tokens",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "thinking_token_budget",
    )
)


def _invalid(exc: BaseException, parsing: _Parsing | None = None) -> InvalidRequestError:
    """vLLM's refusal as a 400 naming the field: its own `parameter` where it says, else the field its message
    starts with (`min_p must be in [0, 1], got 1.5.`), else `tools` when the grammar that failed was the calls'."""
    param = getattr(exc, "parameter", None)
    message = str(exc.args[0]) if isinstance(exc, VLLMValidationError) and exc.args else _one_line(exc)
    message = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    if param is None:
        first = message.split(" ", 1)[0].strip("`:")
        param = first if first in _PARAMS else None
    if param is None and parsing is not None and parsing.forced and "grammar" in message.lower():
        param = "tools"
        message = f"the tools' parameter schemas cannot be enforced ({message})"
    return InvalidRequestError(message, param)


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


def _pooling_args(model: ModelConfig, engine_args: dict[str, Any]) -> dict[str, Any]:
    """A generation model's weights served as an embedding model: vLLM's pooling runner, converted for `embed`,
    with the [[models]] entry's pooling and normalize where it sets them (engine_args may set any of this too)."""
    args: dict[str, Any] = {
        "runner": engine_args.get("runner", "pooling"),
        "convert": engine_args.get("convert", "embed"),
    }
    pooler = dict(engine_args.get("pooler_config") or {})
    if model.pooling is not None:
        pooler.setdefault("pooling_type", model.pooling.upper())
    if model.normalize is not None:
        pooler.setdefault("use_activation", model.normalize)
    if pooler:
        from vllm.config import PoolerConfig

        args["pooler_config"] = PoolerConfig(**pooler)
    return args


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
