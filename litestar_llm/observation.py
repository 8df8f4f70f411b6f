"""The seam between generation and telemetry: `generate_choices` hands each generation's delta stream (and
`embed_inputs` each embedding call) to the request's observer, if the telemetry plugin set one. Engines and
dialects never import telemetry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from litestar_llm.engine.base import Engine
    from litestar_llm.engine.types import Delta, EmbeddingRequest, Embeddings, GenerationRequest


class GenerationObserver(Protocol):
    def observe(
        self, engine: Engine, requests: list[GenerationRequest], stream: AsyncIterator[tuple[int, Delta]]
    ) -> AsyncIterator[tuple[int, Delta]]:
        """The same stream, measured: metrics and an inference span."""
        ...

    def observe_embeddings(
        self, engine: Engine, request: EmbeddingRequest, work: Awaitable[Embeddings]
    ) -> Awaitable[Embeddings]:
        """The same embedding call, measured: operation `embeddings`, its input tokens, a span."""
        ...


current_observer: ContextVar[GenerationObserver | None] = ContextVar("litestar_llm_observer", default=None)
