"""What every backend provides per model: an `Engine` that streams deltas for generation requests."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from litestar_llm.engine.types import Delta, GenerationRequest


class ModelInfo(msgspec.Struct, kw_only=True):
    """Facts about a loaded model that dialects list (`/v1/models`, `/api/tags`, `/api/show`)."""

    name: str
    backend: str
    """The backend kind: mlx, vllm, openai."""
    source: str
    context_length: int | None = None
    family: str | None = None
    parameter_count: int | None = None
    quantization: str | None = None
    size_bytes: int | None = None
    digest: str | None = None
    modified_at: float | None = None
    created: int = 0
    chat_template: str | None = None
    on_gpu: bool = False
    """Weights live in accelerator memory (Ollama's size_vram)."""
    structured_output: bool = False
    """The backend can constrain decoding to JSON or a JSON schema."""
    embeddings: bool = False
    """The backend can embed text."""


class Engine(abc.ABC):
    """One loaded model. `generate` never blocks the event loop: compute runs on the engine's own thread/process."""

    info: ModelInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; raise to stop the server's start-up with a readable reason."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Deltas for one sequence (`request.n` is handled by `generate_choices`). Closing the iterator early
        (client gone) cancels the generation and frees its slot."""

    @property
    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        """Load and batching figures for /ready and metrics."""
        return {}


async def generate_choices(engine: Engine, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
    """Fan `requests` (each with its `n`) out to independent sequences and merge their deltas as
    `(choice_index, delta)`, in arrival order. Choice i of a seeded request gets seed + i, so choices differ
    but stay reproducible."""
    sequences: list[AsyncIterator[Delta]] = []
    for request in requests:
        for i in range(request.n):
            single = request
            if request.n > 1 or i:
                sampling = request.sampling
                if sampling.seed is not None:
                    sampling = msgspec.structs.replace(sampling, seed=sampling.seed + i)
                single = msgspec.structs.replace(request, n=1, sampling=sampling)
            sequences.append(aiter(engine.generate(single)))
    if len(sequences) == 1:
        try:
            async for delta in sequences[0]:
                yield 0, delta
        finally:
            await sequences[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, sequence: AsyncIterator[Delta]) -> None:
        try:
            async for delta in sequence:
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))
        finally:
            await sequence.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(sequences)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
