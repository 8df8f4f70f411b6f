"""GenAI semantic-convention metrics and inference spans, recorded around each generation.

Per token the observer does two `is None` checks and nothing else: durations, token counts and span attributes
are recorded once per request, when the first token arrives and when the generation ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from litestar_llm.caller import current_caller
from litestar_llm.errors import LitestarLLMError

if TYPE_CHECKING:
    from litestar_llm.engine.base import Engine
    from litestar_llm.engine.types import Delta, EmbeddingRequest, Embeddings, GenerationRequest

# The conventions' suggested bucket boundaries.
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]

DIALECT = "litestar_llm.dialect"
KEY_NAME = "litestar_llm.api_key.name"


class GenAIMetrics:
    """The instruments, created once per process."""

    def __init__(self, meter: Meter, tracer: Tracer | None, engines: Callable[[], Iterable[tuple[str, Engine]]]):
        self.tracer, self._engines = tracer, engines
        histogram = meter.create_histogram
        self.duration = histogram(
            "gen_ai.server.request.duration",
            unit="s",
            description="Generative AI server request duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.ttft = histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to generate the first token, from the request's arrival",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.tpot = histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS,
        )
        self.tokens = histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens per request, by gen_ai.token.type (input, output)",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.queue = histogram(
            "litestar_llm.request.queue_time",
            unit="s",
            description="Time a generation waited for a batch slot before its prefill began",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        self.rejected = meter.create_counter(
            "litestar_llm.requests.rejected",
            unit="{request}",
            description="Requests refused before generation, by reason (auth, rate_limit, overload)",
        )
        self.requests = meter.create_counter(
            "litestar_llm.requests",
            unit="{request}",
            description="API requests answered, by dialect, status code and API key name",
        )
        self.key_tokens = meter.create_counter(
            "litestar_llm.api_key.tokens", unit="{token}", description="Tokens used per API key name and token type"
        )
        for name, stat, unit, description in (
            ("litestar_llm.engine.requests.running", "running", "{request}", "Sequences being decoded"),
            ("litestar_llm.engine.requests.waiting", "waiting", "{request}", "Sequences waiting for a batch slot"),
            ("litestar_llm.engine.kv_cache.usage", "kv_cache_usage", "1", "KV cache in use (0..1), where reported"),
            ("litestar_llm.engine.prompt_cache.size", "prompt_cache_bytes", "By", "KV cache kept for prefix reuse"),
            ("litestar_llm.engine.prompt_cache.hit_rate", "prompt_cache_hit_rate", "1", "Prompts that reused a prefix"),
        ):
            meter.create_observable_gauge(name, [self._gauge(stat)], unit=unit, description=description)
        meter.create_observable_gauge(
            "litestar_llm.model.state",
            [self._states],
            unit="1",
            description="Per model, 1 for its lifecycle state now (unloaded, loading, ready, draining, failed), 0 else",
        )

    def _states(self, _options: CallbackOptions) -> Iterable[Observation]:
        from litestar_llm.engine.registry import STATES

        for name, engine in self._engines():
            now = getattr(engine, "lifecycle_state", "ready")
            for state in STATES:
                yield Observation(int(state == now), {"gen_ai.request.model": name, "litestar_llm.model.state": state})

    def _gauge(self, stat: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_options: CallbackOptions) -> Iterable[Observation]:
            for name, engine in self._engines():
                value = engine.stats().get(stat)
                if isinstance(value, int | float):
                    attributes = {"gen_ai.request.model": name, "gen_ai.provider.name": engine.info.backend}
                    yield Observation(value, attributes)

        return observe


class RequestObserver:
    """One HTTP request's observer (see `litestar_llm.observation`): knows the dialect and when the request arrived."""

    __slots__ = ("dialect", "metrics", "started")

    def __init__(self, metrics: GenAIMetrics, dialect: str, started: float) -> None:
        self.metrics, self.dialect, self.started = metrics, dialect, started

    async def observe(
        self, engine: Engine, requests: list[GenerationRequest], stream: AsyncIterator[tuple[int, Delta]]
    ) -> AsyncIterator[tuple[int, Delta]]:
        metrics, request = self.metrics, requests[0]
        operation = "chat" if request.messages is not None else "text_completion"
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": request.model,
            "gen_ai.provider.name": engine.info.backend,
            DIALECT: self.dialect,
        }
        span = None
        if metrics.tracer is not None:
            span = metrics.tracer.start_span(
                f"{operation} {request.model}",
                kind=SpanKind.INTERNAL,
                attributes={**attributes, **_request_attributes(request)},
            )
        first_at: float | None = None
        sequences = sum(r.n for r in requests)
        input_tokens = output_tokens = cached_tokens = 0
        finish_reasons: list[str] = []
        error: str | None = None
        try:
            async for index, delta in stream:
                if first_at is None:
                    first_at = time.perf_counter()
                if delta.usage is not None:  # once per sequence, at its end
                    usage = delta.usage
                    if index % request.n == 0:
                        input_tokens += usage.prompt_tokens
                        cached_tokens += usage.cached_prompt_tokens
                    output_tokens += usage.completion_tokens
                    if usage.completion_tokens > 1 and usage.decode_s > 0:
                        metrics.tpot.record(usage.decode_s / (usage.completion_tokens - 1), attributes)
                    metrics.queue.record(usage.queue_s, attributes)
                    finish_reasons.append(delta.finish_reason or "stop")
                yield index, delta
        except BaseException as exc:  # GeneratorExit or CancelledError too: the client went away
            if len(finish_reasons) < sequences:  # closed after the last sequence ended is not an error
                error = _error_type(exc)
            raise
        finally:
            ended = time.perf_counter()
            if error is not None:
                attributes["error.type"] = error
            elif first_at is not None:
                metrics.ttft.record(first_at - self.started, attributes)
            metrics.duration.record(ended - self.started, attributes)
            if input_tokens or output_tokens:
                caller = current_caller.get()
                for kind, count in (("input", input_tokens), ("output", output_tokens)):
                    metrics.tokens.record(count, {**attributes, "gen_ai.token.type": kind})
                    if caller is not None:
                        key_attributes = {
                            KEY_NAME: caller.name,
                            "gen_ai.token.type": kind,
                            "gen_ai.request.model": request.model,
                        }
                        metrics.key_tokens.add(count, key_attributes)
            if span is not None:
                span.set_attributes(
                    {
                        "gen_ai.response.model": request.model,
                        "gen_ai.response.finish_reasons": finish_reasons,
                        "gen_ai.usage.input_tokens": input_tokens,
                        "gen_ai.usage.cache_read.input_tokens": cached_tokens,
                        "gen_ai.usage.output_tokens": output_tokens,
                    }
                )
                if error is not None:
                    span.set_attribute("error.type", error)
                    span.set_status(Status(StatusCode.ERROR, error))
                span.end()

    async def observe_embeddings(
        self, engine: Engine, request: EmbeddingRequest, work: Awaitable[Embeddings]
    ) -> Embeddings:
        metrics = self.metrics
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.request.model": request.model,
            "gen_ai.provider.name": engine.info.backend,
            DIALECT: self.dialect,
        }
        span = None
        if metrics.tracer is not None:
            extra = {"gen_ai.embeddings.dimension.count": request.dimensions} if request.dimensions else {}
            span = metrics.tracer.start_span(
                f"embeddings {request.model}", kind=SpanKind.INTERNAL, attributes={**attributes, **extra}
            )
        input_tokens, error = 0, None
        try:
            result = await work
            input_tokens = result.prompt_tokens
            return result
        except BaseException as exc:
            error = _error_type(exc)
            raise
        finally:
            if error is not None:
                attributes["error.type"] = error
            metrics.duration.record(time.perf_counter() - self.started, attributes)
            if input_tokens:
                metrics.tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
                if (caller := current_caller.get()) is not None:
                    key_attributes = {KEY_NAME: caller.name, "gen_ai.token.type": "input"}
                    metrics.key_tokens.add(input_tokens, {**key_attributes, "gen_ai.request.model": request.model})
            if span is not None:
                span.set_attributes({"gen_ai.response.model": request.model, "gen_ai.usage.input_tokens": input_tokens})
                if error is not None:
                    span.set_attribute("error.type", error)
                    span.set_status(Status(StatusCode.ERROR, error))
                span.end()


def _request_attributes(request: GenerationRequest) -> dict[str, Any]:
    sampling = request.sampling
    values = {
        "gen_ai.request.max_tokens": sampling.max_tokens,
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        "gen_ai.request.top_k": sampling.top_k or None,
        "gen_ai.request.seed": sampling.seed,
        "gen_ai.request.presence_penalty": sampling.presence_penalty,
        "gen_ai.request.frequency_penalty": sampling.frequency_penalty,
        "gen_ai.request.stop_sequences": sampling.stop or None,
        "gen_ai.request.choice.count": request.n if request.n != 1 else None,
    }
    return {name: value for name, value in values.items() if value is not None}


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "cancelled"  # the client went away
    if isinstance(exc, LitestarLLMError):
        return type(exc).__name__
    return type(exc).__qualname__
