"""The serving layer: everything between a dialect's decoded request and its encoded answer, written once.

A dialect is a codec. It decodes its wire format into `GenerationRequest`s (with `sampling()` for the one
precedence of sampling values), hands them to `Serving.generate`, and encodes what comes back: the `Delta`s of a
`Generation` as its chunks, or `Generation.collect()`'s `Choice`s as its final body, or `classify(exc)` as its
error body. Here: the model is resolved, sampling values are checked against the model before anything is
queued, capabilities are checked, rate limits are reserved (in `generate_choices`), and the first delta is awaited
inside the disconnect watch, so a client that leaves while its request waits in the queue costs no prefill.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, TypeVar

import msgspec
from litestar import Request
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.response import Stream

from litestar_llm.config import ModelConfig, SamplingDefaults
from litestar_llm.engine.base import Engine, ModelInfo, embed_inputs, generate_choices
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import (
    Delta,
    EmbeddingRequest,
    Embeddings,
    GenerationRequest,
    NamedToolChoice,
    SamplingParams,
    TokenLogprob,
    ToolCall,
    Usage,
)
from litestar_llm.errors import InvalidRequestError, LitestarLLMError, ModelNotFoundError

T = TypeVar("T")
logger = logging.getLogger(__name__)

# Engine values where neither the request, nor [models.defaults], nor the dialect says: OpenAI's documented ones.
ENGINE_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
MAX_STOPS = 64
"""Stop strings per request, and their total length below: they are matched on every token of the sequence."""
MAX_STOP_CHARS = 8192
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128
MAX_INPUTS = 2048
"""Inputs per embedding request (OpenAI's own limit)."""


def sampling(sent: Mapping[str, Any], defaults: SamplingDefaults, fallback: Mapping[str, Any] | None = None):
    """Sampling values by one precedence for every dialect: what the client sent (None: not sent), else the
    model's [models.defaults], else the dialect's own default (`fallback`: /v1/completions' 16 tokens), else the
    engine's."""
    values: dict[str, Any] = {}
    for name in SamplingParams.__struct_fields__:
        value = sent.get(name)
        if value is None and name in SamplingDefaults.__struct_fields__:
            value = getattr(defaults, name)
        if value is None and fallback:
            value = fallback.get(name)
        if value is None:
            value = ENGINE_DEFAULTS.get(name)
        if value is not None:
            values[name] = list(value) if name == "stop" else value
    if values.get("top_k", 0) < 0:  # vLLM's -1 means "all", as 0 does here
        values["top_k"] = 0
    return SamplingParams(**values)


# -- checks before anything is queued -----------------------------------------------------------------------


FieldNames = Mapping[str, str] | Callable[[str], str]
"""How a dialect spells the engine's field names (`top_k` is Ollama's `options.top_k`)."""


def check_request(request: GenerationRequest, info: ModelInfo, names: FieldNames) -> None:
    """Every sampling value within range for this model, and every capability the request needs present; a 400
    naming the field in the dialect's own spelling."""

    def refuse(field: str, problem: str) -> InvalidRequestError:
        wire = names(field) if callable(names) else names.get(field, field)
        return InvalidRequestError(f"{wire}: {problem}", param=wire)

    s = request.sampling
    if not _finite(s.temperature) or s.temperature < 0:
        raise refuse("temperature", f"must be a number >= 0, got {s.temperature}")
    if not _finite(s.top_p) or not 0 < s.top_p <= 1:
        raise refuse("top_p", f"must be in (0, 1], got {s.top_p}")
    if not _finite(s.min_p) or not 0 <= s.min_p <= 1:
        raise refuse("min_p", f"must be in [0, 1], got {s.min_p}")
    if s.top_k < 0 or (info.vocab_size and s.top_k > info.vocab_size):
        limit = f" (the model's vocabulary has {info.vocab_size} tokens)" if info.vocab_size else ""
        raise refuse("top_k", f"must be between 0 (all tokens) and the vocabulary size{limit}, got {s.top_k}")
    if s.repetition_penalty is not None and (not _finite(s.repetition_penalty) or s.repetition_penalty <= 0):
        raise refuse("repetition_penalty", f"must be > 0, got {s.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None and (not _finite(value) or not -2 <= value <= 2):
            raise refuse(name, f"must be in [-2, 2], got {value}")
    if s.seed is not None and not 0 <= s.seed <= info.max_seed:
        raise refuse("seed", f"must be in [0, {info.max_seed}], got {s.seed}")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise refuse("max_tokens", f"must be >= 1, got {s.max_tokens}")
    if s.logprobs is not None and not 0 <= s.logprobs <= MAX_TOP_LOGPROBS:
        raise refuse("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {s.logprobs}")
    if len(s.stop) > MAX_STOPS:
        raise refuse("stop", f"at most {MAX_STOPS} stop strings, got {len(s.stop)}")
    if sum(len(stop) for stop in s.stop) > MAX_STOP_CHARS:
        raise refuse("stop", f"the stop strings may have {MAX_STOP_CHARS} characters in all")
    if not 1 <= request.n <= MAX_CHOICES:
        raise refuse("n", f"must be in [1, {MAX_CHOICES}], got {request.n}")
    if s.constrained and not info.structured_output:
        raise refuse(
            "response_format",
            f"needs constrained decoding, which the {info.backend} backend serving '{info.name}' does not support",
        )
    _check_tools(request, info, refuse)


def _check_tools(request: GenerationRequest, info: ModelInfo, refuse: Callable[[str, str], Exception]) -> None:
    names = set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise refuse(f"tools[{i}].name", "a function name is required")
        if tool.parameters.get("type", "object") != "object":
            raise refuse(f"tools[{i}].parameters", "must be a JSON schema of type object")
        names.add(tool.name)
    if isinstance(request.tool_choice, NamedToolChoice) and request.tool_choice.name not in names:
        raise refuse("tool_choice", f"names the function '{request.tool_choice.name}', which is not among tools")
    if request.tool_choice == "required" and not request.tools:
        raise refuse("tool_choice", "'required' needs tools")
    call_ids, called = set(), set()
    for i, message in enumerate(request.messages or ()):
        for j, call in enumerate(message.tool_calls):
            try:
                arguments = json.loads(call.arguments or "{}")
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise refuse(f"messages[{i}].tool_calls[{j}].arguments", "must be the JSON text of an object")
            call_ids.add(call.id)
            called.add(call.name)
        if message.role != "tool":
            continue
        if message.tool_call_id is not None and message.tool_call_id not in call_ids:
            raise refuse(f"messages[{i}].tool_call_id", f"no earlier tool call has the id '{message.tool_call_id}'")
        if message.tool_call_id is None and message.name is not None and message.name not in called:
            raise refuse(f"messages[{i}].tool_name", f"no earlier tool call is to a function '{message.name}'")
    if not request.offered_tools:
        return
    if not info.tools:
        raise refuse(
            "tools", f"model '{info.name}' cannot call tools: its chat template takes none or no tool parser fits it"
        )
    if request.tool_choice != "auto" and not info.structured_output:
        raise refuse(
            "tool_choice",
            f"forcing a call needs constrained decoding, which the {info.backend} backend serving '{info.name}' "
            "does not support; use tool_choice 'auto'",
        )


def check_task(config: ModelConfig, task: str) -> None:
    """A model serves one task: asked for the other, a 400 naming the task it serves."""
    if config.task == task:
        return
    served = "embeddings" if config.task == "embed" else "text generation"
    wanted = "embeddings" if task == "embed" else "text generation"
    raise InvalidRequestError(
        f"model '{config.name}' serves {served} (task \"{config.task}\"), not {wanted}", param="model"
    )


def check_embedding_request(request: EmbeddingRequest, info: ModelInfo) -> None:
    if not request.input:
        raise InvalidRequestError("input: give at least one text or token-id list to embed", param="input")
    if len(request.input) > MAX_INPUTS:
        raise InvalidRequestError(f"input: at most {MAX_INPUTS} inputs, got {len(request.input)}", param="input")
    for i, item in enumerate(request.input):
        if not item:
            raise InvalidRequestError(f"input[{i}]: must not be empty", param=f"input[{i}]")
    size, dimensions = info.embedding_size, request.dimensions
    if dimensions is not None and (dimensions < 1 or (size and dimensions > size)):
        limit = f"[1, {size}] (the model's embeddings have {size})" if size else ">= 1"
        raise InvalidRequestError(f"dimensions: must be in {limit}, got {dimensions}", param="dimensions")


def shortened(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """The first `dimensions` components of each vector, scaled back to unit length (Matryoshka embeddings)."""
    if dimensions is None or all(len(v) <= dimensions for v in vectors):
        return vectors
    out = []
    for vector in vectors:
        head = vector[:dimensions]
        norm = math.sqrt(math.fsum(x * x for x in head))
        out.append([x / norm for x in head] if norm > 0 else head)
    return out


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# -- one generation -----------------------------------------------------------------------------------------


class Choice:
    """One choice of a non-streamed answer, collected from its deltas."""

    __slots__ = ("_calls", "finish_reason", "logprobs", "reasoning_parts", "stop_sequence", "texts", "usage")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.reasoning_parts: list[str] = []
        self._calls: dict[int, list[str | None]] = {}
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.usage: Usage | None = None

    def add(self, delta: Delta) -> None:
        if delta.text:
            self.texts.append(delta.text)
        if delta.reasoning:
            self.reasoning_parts.append(delta.reasoning)
        for fragment in delta.tool_calls or ():
            call = self._calls.setdefault(fragment.index, [None, None, ""])
            call[0] = call[0] or fragment.id
            call[1] = call[1] or fragment.name
            call[2] += fragment.arguments
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_sequence = delta.finish_reason, delta.stop_sequence
        if delta.usage is not None:
            self.usage = delta.usage

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=call_id or "", name=name or "", arguments=arguments or "{}")
            for call_id, name, arguments in (self._calls[i] for i in sorted(self._calls))
        ]

    @property
    def prompt_tokens(self) -> int:
        return self.usage.prompt_tokens if self.usage else 0

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else 0


def total_usage(usages: Mapping[int, Usage | None], n: int) -> Usage:
    """Prompt tokens count once per prompt (choices i*n .. i*n+n-1 share one), completion tokens for every choice."""
    total = Usage(prompt_tokens=0, completion_tokens=0)
    for index, usage in usages.items():
        if usage is None:
            continue
        if index % n == 0:
            total.prompt_tokens += usage.prompt_tokens
            total.cached_prompt_tokens += usage.cached_prompt_tokens
        total.completion_tokens += usage.completion_tokens
        total.reasoning_tokens += usage.reasoning_tokens
    return total


class Generation:
    """An admitted generation whose first delta has arrived: iterate it for `(choice_index, Delta)` (the first
    one included), or `collect()` it. `requests` are the checked requests, as the engine got them."""

    load_s = 0.0
    """How long the request waited for its model to load (0: it was loaded)."""

    def __init__(
        self,
        http: Request,
        engine: Engine,
        model: ModelConfig,
        requests: list[GenerationRequest],
        stream: AsyncIterator[tuple[int, Delta]],
        first: tuple[int, Delta],
    ) -> None:
        self.http, self.engine, self.model, self.requests = http, engine, model, requests
        self._stream, self._first = stream, first

    @property
    def n(self) -> int:
        return self.requests[0].n

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        first, self._first = self._first, None
        if first is not None:
            yield first
        async for item in self._stream:
            yield item

    async def collect(self) -> dict[int, Choice]:
        """Every choice, in index order; the generation is cancelled if the client leaves meanwhile."""

        async def gather() -> dict[int, Choice]:
            choices: dict[int, Choice] = {}
            async for index, delta in self:
                choices.setdefault(index, Choice()).add(delta)
            return dict(sorted(choices.items()))

        try:
            return await unless_disconnected(self.http, gather())
        finally:
            await self._stream.aclose()

    def respond(
        self,
        chunks: AsyncIterator[bytes],
        error_chunk: Callable[[BaseException], bytes],
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> Stream:
        """A streamed response. An error after the first byte becomes one final chunk in the dialect's own format
        (`error_chunk`); however the stream ends (done, failed, client gone), the generation is closed so its batch
        slot is freed at once."""
        stream = self._stream

        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:
                yield error_chunk(exc)
            finally:
                await chunks.aclose()
                await stream.aclose()

        return Stream(guarded(), media_type=media_type, headers=headers)


Resolver = Callable[[EngineRegistry, str], tuple[Engine, ModelConfig]]


def _resolve(registry: EngineRegistry, name: str) -> tuple[Engine, ModelConfig]:
    return registry.resolve(name)


def provide_serving(registry: NamedDependency[EngineRegistry]) -> Serving:
    """The `serving` dependency of every dialect's routes (cached per app by the router's Provide)."""
    return Serving(registry)


class Serving:
    """Provided to every dialect's handlers as `serving`."""

    def __init__(self, registry: EngineRegistry) -> None:
        self.registry = registry

    def resolve(self, name: str, resolver: Resolver = _resolve) -> tuple[Engine, ModelConfig]:
        return resolver(self.registry, name)

    async def generate(
        self,
        http: Request,
        model: str,
        build: Callable[[ModelConfig, ModelInfo], GenerationRequest | list[GenerationRequest]],
        *,
        names: FieldNames | None = None,
        resolver: Resolver = _resolve,
        keep_alive: float | None = None,
    ) -> Generation:
        """Resolve `model`, load it if it is not loaded (`keep_alive`: seconds it stays loaded once idle, for
        this request's dialect to set), build its requests (`build` gets the model's config, defaults included,
        and what the engine knows of it), check them, and start generating. Returns once the first delta is
        there; raises (for the dialect's error handler) when anything fails before that."""
        names = names or {}
        engine, config = self.resolve(model, resolver)
        check_task(config, "generate")
        hold = await unless_disconnected(http, self.registry.acquire(config.name, keep_alive))
        try:
            built = build(config, engine.info)
            requests = built if isinstance(built, list) else [built]
            for request in requests:
                check_request(request, engine.info, names)
            stream = generate_choices(engine, requests)
            try:
                first = await unless_disconnected(http, anext(stream))
            except InvalidRequestError as exc:  # the engine's own checks name fields the engine's way
                await stream.aclose()
                if exc.param is not None:
                    wire = names(exc.param) if callable(names) else names.get(exc.param, exc.param)
                    if exc.message.startswith(f"{exc.param}:"):  # the message names the field too
                        exc.message = wire + exc.message[len(exc.param) :]
                    exc.param = wire
                raise
            except BaseException:
                await stream.aclose()
                raise
        finally:
            hold.release()  # the generation, once admitted, keeps the model busy on its own
        generation = Generation(http, engine, config, requests, stream, first)
        generation.load_s = hold.load_s
        return generation

    async def embed(
        self,
        http: Request,
        model: str,
        build: Callable[[ModelConfig, ModelInfo], EmbeddingRequest],
        *,
        resolver: Resolver = _resolve,
        keep_alive: float | None = None,
    ) -> Embeddings:
        """Resolve `model`, build and check its embedding request, and embed it (with the caller's limits and
        telemetry); cancelled if the client leaves. `dimensions` is applied here, the same for every backend."""
        engine, config = self.resolve(model, resolver)
        check_task(config, "embed")
        hold = await unless_disconnected(http, self.registry.acquire(config.name, keep_alive))
        try:
            request = build(config, engine.info)
            check_embedding_request(request, engine.info)
            result = await unless_disconnected(http, embed_inputs(engine, request))
        finally:
            hold.release()
        result.vectors = shortened(result.vectors, request.dimensions)
        result.load_s = hold.load_s
        return result


# -- disconnects --------------------------------------------------------------------------------------------


class ClientDisconnected(LitestarLLMError):
    """The client hung up before its answer was ready: a normal outcome, recorded as 499 ("client closed")."""

    status_code = 499

    def __init__(self) -> None:
        self.message = "the client closed the connection"
        super().__init__(self.message)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (a generation nobody will read must not keep
    its place in the queue or its batch slot). The body has been read, so the next ASGI message can only be a
    disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected
    return task.result()


async def _disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- errors, classified once --------------------------------------------------------------------------------

ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "not_found",
    "too_large",
    "rate_limit",
    "overloaded",
    "unavailable",
    "client_closed",
    "server",
]
_KINDS: dict[int, ErrorKind] = {
    400: "invalid_request",
    401: "authentication",
    403: "permission",
    404: "not_found",
    405: "invalid_request",
    408: "invalid_request",
    413: "too_large",
    422: "invalid_request",
    429: "rate_limit",
    499: "client_closed",
}


class ErrorInfo(msgspec.Struct, kw_only=True):
    """An exception as every dialect needs it: status, message, the field at fault, a kind each dialect names in
    its own words, and headers (Retry-After, WWW-Authenticate, x-ratelimit-*)."""

    status: int
    message: str
    kind: ErrorKind
    param: str | None = None
    headers: dict[str, str] = {}
    model_not_found: bool = False


def classify(exc: BaseException) -> ErrorInfo:
    headers = dict(getattr(exc, "headers", None) or {})
    if isinstance(exc, LitestarLLMError):
        status = exc.status_code
        message = getattr(exc, "message", str(exc))
        param = getattr(exc, "param", None)
        if isinstance(exc, ModelNotFoundError):
            param = "model"
        kind = _KINDS.get(status, "server" if status >= 500 else "invalid_request")
        if getattr(exc, "reason", None) == "overload":
            kind = "overloaded"
        elif status == 503:
            kind = "unavailable"
        return ErrorInfo(
            status=status,
            message=message,
            kind=kind,
            param=param,
            headers=headers,
            model_not_found=isinstance(exc, ModelNotFoundError),
        )
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
        if status == 413:
            message = "the request body is larger than this server accepts (server.max_request_bytes)"
        return ErrorInfo(status=status, message=message, kind=_KINDS.get(status, "server"), headers=headers)
    logger.error("unhandled error", exc_info=exc)
    return ErrorInfo(status=500, message="internal server error", kind="server")
