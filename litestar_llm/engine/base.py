"""What every backend provides per model: an `Engine` that streams deltas for generation requests."""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec

from litestar_llm.caller import current_caller
from litestar_llm.engine.types import Delta, EmbeddingRequest, Embeddings, GenerationRequest, Usage
from litestar_llm.errors import InvalidRequestError
from litestar_llm.limits import LEASE_S, KeyLimits
from litestar_llm.observation import current_observer


class ModelInfo(msgspec.Struct, kw_only=True):
    """Facts about a loaded model that dialects list (`/v1/models`, `/api/tags`, `/api/show`)."""

    name: str
    backend: str
    """The backend kind: mlx, vllm, openai."""
    source: str
    context_length: int | None = None
    vocab_size: int | None = None
    """Token ids are in [0, vocab_size): bounds top_k and prompt token ids."""
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
    """The model embeds (task "embed"): it answers `Engine.embed`, not `generate`."""
    embedding_size: int | None = None
    """Components of an embedding vector (the model's hidden size), where known: bounds `dimensions`."""
    tools: bool = False
    """The model's template takes tools and the backend parses its calls."""
    thinking: bool = False
    """The backend separates the model's thinking from its answer."""
    max_seed: int = 2**63 - 1
    """Seeds are in [0, max_seed]."""


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

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The prompt's length in tokens, so a token budget can be reserved before generation starts; None when
        the engine cannot tell cheaply (the budget then settles on the reported usage alone)."""
        return None

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """One vector per input, in order, for a model whose `info.embeddings` is true. Cancelling the call (the
        client left) drops the inputs not yet embedded."""
        raise InvalidRequestError(f"the {self.info.backend} backend cannot embed", param="model")

    async def count_input_tokens(self, request: EmbeddingRequest) -> int | None:
        """The inputs' length in tokens (after truncation), so a token budget can be reserved before embedding;
        None when the engine cannot tell cheaply (the budget then settles on the reported count alone)."""
        return None

    @property
    def ready(self) -> bool:
        return True

    def stats(self) -> dict[str, Any]:
        """Load and batching figures for /ready and metrics."""
        return {}


def generate_choices(engine: Engine, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
    """Fan `requests` (each with its `n`) out to independent sequences and merge their deltas as
    `(choice_index, delta)`, in arrival order. Choice i of a seeded request gets seed + i, so choices differ
    but stay reproducible. A caller with rate limits has its tokens and stream slot accounted around it; with
    telemetry on, the request's observer measures it."""
    caller = current_caller.get()
    if caller is not None and caller.limits is not None:
        stream = _limited_choices(engine, requests, caller.limits)
    else:
        stream = _choices(engine, requests)
    observer = current_observer.get()
    return stream if observer is None else observer.observe(engine, requests, stream)


def embed_inputs(engine: Engine, request: EmbeddingRequest) -> Awaitable[Embeddings]:
    """`engine.embed(request)`, with the caller's rate limits (a slot of max_concurrent, the input tokens of
    tokens_per_minute) accounted around it and, with telemetry on, measured by the request's observer."""
    caller = current_caller.get()
    work = engine.embed(request) if caller is None or caller.limits is None else _limited_embed(engine, request)
    observer = current_observer.get()
    return work if observer is None else observer.observe_embeddings(engine, request, work)


async def _limited_embed(engine: Engine, request: EmbeddingRequest) -> Embeddings:
    limits = current_caller.get().limits
    stream = await limits.acquire_stream()
    ticket, used = None, 0
    try:
        if limits.token_limit is not None:
            used = await engine.count_input_tokens(request) or 0
            try:
                ticket = await limits.reserve(used)
            except InvalidRequestError:
                raise InvalidRequestError(
                    f"these inputs have {used} tokens, more than the {limits.token_limit} tokens per minute this "
                    "API key may use; send fewer or shorter inputs",
                    param="input",
                ) from None
        try:
            result = await engine.embed(request)
        except InvalidRequestError:
            used = 0  # refused before anything was embedded
            raise
        used = result.prompt_tokens
        return result
    finally:
        await limits.settle(ticket, used)
        await limits.release_stream(stream)


async def _limited_choices(
    engine: Engine, requests: list[GenerationRequest], limits: KeyLimits
) -> AsyncIterator[tuple[int, Delta]]:
    """Hold a stream slot (max_concurrent) and reserve prompt + max tokens (tokens_per_minute) before the first
    token; settle the reservation with the real count however the generation ends: the engine's reported usage
    where a choice finished with one, the tokens sent where it was cut short, and the reservation itself where a
    finished choice reported no usage (a remote replica that sends none)."""
    stream = await limits.acquire_stream()
    ticket, prompt_tokens, reserved = None, 0, 0
    counted: dict[int, int] = {}
    usages: dict[int, Usage] = {}
    ended: set[int] = set()
    n = requests[0].n if requests else 1
    try:
        if limits.token_limit is not None:
            requests, prompt_tokens, reserved = await _token_budget(engine, requests, limits.token_limit)
            ticket = await limits.reserve(reserved)
        refresh_at = time.monotonic() + LEASE_S / 3
        async for index, delta in _choices(engine, requests):
            counted[index] = counted.get(index, 0) + len(delta.token_ids)
            if delta.usage is not None:
                usages[index] = delta.usage
            if delta.finish_reason is not None:
                ended.add(index)
            yield index, delta
            if stream is not None and time.monotonic() > refresh_at:  # a long stream keeps its lease alive
                refresh_at = time.monotonic() + LEASE_S / 3
                await limits.refresh_stream(stream)
    finally:
        if ended - usages.keys():
            used = reserved
        else:
            reported = sum(u.prompt_tokens for i, u in usages.items() if i % n == 0)
            completion = sum(usages[i].completion_tokens if i in usages else c for i, c in counted.items())
            used = max(prompt_tokens, reported) + completion
        await limits.settle(ticket, used)
        await limits.release_stream(stream)


async def _token_budget(
    engine: Engine, requests: list[GenerationRequest], limit: int
) -> tuple[list[GenerationRequest], int, int]:
    """What to reserve: each prompt plus n times its max tokens. A request that sets no max tokens is bounded by
    what is left of the key's budget instead of the model's whole context."""
    context = engine.info.context_length
    bounded, prompts, total = [], 0, 0
    for request in requests:
        prompt = await engine.count_prompt_tokens(request) or 0
        max_tokens = request.sampling.max_tokens
        if max_tokens is None:
            room = max((limit - total - prompt) // request.n, 1)
            max_tokens = max(min(room, context - prompt), 1) if context else room
            request = msgspec.structs.replace(
                request, sampling=msgspec.structs.replace(request.sampling, max_tokens=max_tokens)
            )
        bounded.append(request)
        prompts += prompt
        total += prompt + request.n * max_tokens
    return bounded, prompts, total


async def _choices(engine: Engine, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, Delta]]:
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
