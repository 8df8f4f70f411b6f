"""Embeddings for the MLX backend: decoder embedding models (the Qwen3-Embedding kind) that mlx-lm loads, pooled
from the final hidden states of mlx-lm's own forward pass. No other library: mlx-embeddings is GPLv3.

Tokenizing and the length checks run off both the event loop and the generation thread (`prepare`); the forward
passes run on the model's generation thread, one batch per turn of its loop (where a generation model decodes one
step), each bounded by `embed_batch_tokens` padded tokens, so the work queued on the device beside another model's
decode step is bounded like a prefill chunk. Inputs of many requests share a batch. Rows are padded on the right:
attention is causal, so a real token never attends to the padding after it, and pooling reads the real positions
only. That is exact without an attention mask.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import mlx.core as mx

from litestar_llm.engine.types import EmbeddingRequest, Embeddings
from litestar_llm.errors import InvalidRequestError, ModelLoadError


class EmbedJob:
    """One request's inputs as token ids, and their vectors as they are computed. Shares the attributes the
    generation thread's failure paths use for a sequence (`queue`, `finished`, `cancelled`, `queued`)."""

    __slots__ = ("cancelled", "done", "finished", "inputs", "next", "queue", "queued", "vectors")

    def __init__(self, inputs: list[list[int]]) -> None:
        self.inputs = inputs
        self.vectors: list[list[float] | None] = [None] * len(inputs)
        self.next = 0
        """The first input not yet given to a batch."""
        self.done = 0
        self.queue: asyncio.Queue[Embeddings | BaseException] = asyncio.Queue()
        self.finished = False
        self.cancelled = False
        self.queued = False  # not counted among the requests waiting for a decode slot

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


class Embedder:
    """What an MLX engine serving `task = "embed"` adds: tokenizing inputs, and the batches on its thread."""

    def __init__(self, model: Any, tokenizer: Any, config: dict, pooling: str, normalize: bool, batch_tokens: int):
        body = getattr(model, "model", None) or getattr(getattr(model, "language_model", None), "model", None)
        if not callable(body):
            raise ValueError("mlx-lm's model has no inner transformer (`model.model`) to take hidden states from")
        self._body, self._tokenizer = body, getattr(tokenizer, "_tokenizer", tokenizer)
        self.pooling, self.normalize, self.batch_tokens = pooling, normalize, batch_tokens
        self.size = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
        self.jobs: deque[EmbedJob] = deque()

    @classmethod
    def load(
        cls, name: str, source: str, model: Any, tokenizer: Any, config: dict, settings: Any, backend: Any
    ) -> Embedder:
        """For the [[models]] entry `settings` on the [backends] entry `backend`."""
        pooling = settings.pooling or "last"
        normalize = True if settings.normalize is None else settings.normalize
        try:
            return cls(model, tokenizer, config, pooling, normalize, backend.embed_batch_tokens)
        except ValueError as exc:
            raise ModelLoadError(name, source, f"cannot embed with it: {exc}") from None

    # -- off the generation thread ---------------------------------------------------------------------------

    def prepare(self, request: EmbeddingRequest, context: int | None, vocab: int) -> EmbedJob:
        """Token ids for every input; one beyond the context is cut (`truncate`) or refused naming its index."""
        texts = [(i, item) for i, item in enumerate(request.input) if isinstance(item, str)]
        encoded = self._tokenizer([text for _, text in texts])["input_ids"] if texts else []
        inputs: list[list[int]] = list(request.input)  # type: ignore[arg-type]
        for (i, _), ids in zip(texts, encoded, strict=True):
            inputs[i] = list(ids)
        for i, ids in enumerate(inputs):
            if not isinstance(request.input[i], str) and any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"input[{i}]: token ids must be in [0, {vocab})", param=f"input[{i}]")
            if context and len(ids) > context:
                if not request.truncate:
                    raise InvalidRequestError(
                        f"input[{i}] has {len(ids)} tokens, more than the model's maximum context length of "
                        f"{context} tokens",
                        param=f"input[{i}]",
                    )
                inputs[i] = ids[:context]
            if not inputs[i]:
                raise InvalidRequestError(f"input[{i}]: no tokens to embed", param=f"input[{i}]")
        return EmbedJob(inputs)

    # -- on the generation thread ----------------------------------------------------------------------------

    def step(self) -> tuple[list[EmbedJob], list[EmbedJob], BaseException | None]:
        """One forward pass over the oldest waiting inputs, as many as `batch_tokens` padded tokens hold (an input
        longer than that goes alone). Returns the jobs now complete, and the jobs of a batch that failed with the
        exception."""
        while self.jobs and (
            self.jobs[0].finished or self.jobs[0].cancelled or self.jobs[0].next == len(self.jobs[0].inputs)
        ):
            self.jobs.popleft()
        batch: list[tuple[EmbedJob, int]] = []
        width = 0
        for job in self.jobs:
            if job.finished or job.cancelled:
                continue
            while job.next < len(job.inputs):
                wider = max(width, len(job.inputs[job.next]))
                if batch and wider * (len(batch) + 1) > self.batch_tokens:
                    break
                batch.append((job, job.next))
                job.next += 1
                width = wider
            if job.next < len(job.inputs):
                break
        if not batch:
            return [], [], None
        try:
            vectors = self.forward([job.inputs[i] for job, i in batch])
        except Exception as exc:
            return [], list(dict.fromkeys(job for job, _ in batch)), exc
        complete = []
        for (job, i), vector in zip(batch, vectors, strict=True):
            job.vectors[i] = vector
            job.done += 1
            if job.done == len(job.inputs):
                complete.append(job)
        return complete, [], None

    def forward(self, rows: list[list[int]]) -> list[list[float]]:
        """The pooled (and normalized) final hidden states of right-padded rows, in one forward pass."""
        width = max(len(row) for row in rows)
        tokens = mx.array([row + [0] * (width - len(row)) for row in rows])
        lengths = mx.array([len(row) for row in rows])
        hidden = self._body(tokens).astype(mx.float32)
        if self.pooling == "last":
            pooled = hidden[mx.arange(len(rows)), lengths - 1]
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = (mx.arange(width)[None, :] < lengths[:, None]).astype(mx.float32)
            pooled = (hidden * mask[..., None]).sum(axis=1) / lengths[:, None].astype(mx.float32)
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled.tolist()

    def take_all(self) -> list[EmbedJob]:
        jobs = list(self.jobs)
        self.jobs.clear()
        return jobs


def embeddings_of(job: EmbedJob) -> Embeddings:
    return Embeddings(vectors=job.vectors, prompt_tokens=job.prompt_tokens)  # type: ignore[arg-type]
