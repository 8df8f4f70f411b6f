"""Remote backend (`kind = "openai"`): OpenAI-compatible replicas of one deployment behind this server.

Every generation is one upstream streaming request (`/chat/completions` for messages, `/completions` for a prompt,
always with `stream_options.include_usage`) to the replica with the fewest requests in flight; its SSE events become
Deltas: text, reasoning (`delta.reasoning` / `delta.reasoning_content`) and tool-call fragments (`delta.tool_calls`)
pass through, and the finishing delta carries the upstream's own usage (prompt, completion, reasoning and cached
prompt tokens).

Failures are told apart by what they say about the replica and what they say about the request:

- An upstream 4xx (or an error event with a 4xx code) is the request's own fault: it reaches the client with the
  upstream's status and message, is never retried elsewhere, and counts nothing against the replica. A poison
  request never spreads.
- A refused or timed-out TCP connect means the request never reached the replica: the replica is taken out at
  once and the request tried on another, as many times as there are replicas.
- A 5xx, a timeout waiting for the upstream, a dropped connection or an unreadable stream, before anything has
  reached the client, may be the request's fault as much as the replica's: the request is retried on another
  replica at most once, and the replica's `/ready` is checked at once; it is taken out when that check fails or
  after `max_failures` such failures in a row.

Health comes from the upstream's `GET /ready` (beside the API root: `http://host:8000/v1` → `http://host:8000/ready`;
this server's own names each model's readiness), or `GET {url}/models` where `/ready` answers 404 (vLLM, OpenAI,
mlx_lm.server): checked every `health_interval_s` while a replica is in, every `cooldown_s` while it is out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from litestar_llm.config import ModelConfig, OpenAIBackendConfig
from litestar_llm.engine.base import Engine, ModelInfo
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
from litestar_llm.errors import EngineUnavailableError, MissingDependencyError, UpstreamError

try:
    # aiohttp rather than httpx: its C HTTP parser makes a streamed hop cost about a third of the CPU (measured in
    # the gateway: httpx/httpcore/h11 were two thirds of its per-request time).
    import aiohttp
    from yarl import URL
except ImportError as exc:  # pragma: no cover - depends on the install
    raise MissingDependencyError("aiohttp", "remote") from exc

logger = logging.getLogger(__name__)

UNKNOWN_TOKEN_ID = -1
"""Upstreams send token texts, not ids. Logprobs carry this id; each delta's `token_ids` holds one per upstream
token it carries (exact with logprobs, one per chunk otherwise, as vLLM and this server stream), so what a stream
the client left had already sent can be counted."""

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "abort": "cancelled",
    "cancelled": "cancelled",
}
_PASSED_HEADERS = ("retry-after",)
"""Upstream response headers a refused request passes on to the client."""
_NO_READY = (401, 403, 404, 405)
"""What `/ready` answers on servers that have none (or keep it private): health falls back to `/models`."""
_NO_TOKENIZE = (404, 405, 501)


# -- what upstreams send: only the fields used here; unknown fields are ignored ---------------------------


class _Top(msgspec.Struct):
    token: str
    logprob: float


class _Token(msgspec.Struct):
    token: str
    logprob: float
    top_logprobs: list[_Top] = []


class _Logprobs(msgspec.Struct):
    """Chat's `content` list, or the completions API's parallel lists."""

    content: list[_Token] | None = None
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallFragment(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    reasoning: str | None = None
    """vLLM's name since 0.10."""
    reasoning_content: str | None = None
    """DeepSeek's, SGLang's and older vLLM's."""
    tool_calls: list[_ToolCallFragment] | None = None


class _Choice(msgspec.Struct):
    delta: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None
    stop_reason: str | int | None = None
    """vLLM's (and this server's): the stop string that ended the choice, or the stop token's id."""


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Error(msgspec.Struct):
    message: str = ""
    code: int | str | None = None
    param: str | None = None


class _Event(msgspec.Struct):
    """One SSE `data:` event of a streamed chat or text completion; an `error` instead when the upstream failed
    after its stream began."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | str | None = None


class _ErrorBody(msgspec.Struct):
    """A refusal's body: OpenAI's `{"error": {"message"}}`, or `{"error": "..."}` (mlx_lm, Ollama), or vLLM's
    older `{"message"}`, or FastAPI's `{"detail"}`."""

    error: _Error | str | None = None
    message: str | None = None
    detail: Any = None


class _Model(msgspec.Struct):
    id: str
    created: int = 0
    max_model_len: int | None = None
    """vLLM's context length; other servers do not say."""


class _ModelList(msgspec.Struct):
    data: list[_Model] = []


class _ModelReadiness(msgspec.Struct):
    ready: bool = True


class _Readiness(msgspec.Struct):
    """This server's `/ready`: each model's own readiness beside the overall status."""

    models: dict[str, _ModelReadiness] | None = None


class _TokenCount(msgspec.Struct):
    count: int


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_decode_readiness = msgspec.json.Decoder(_Readiness).decode
_decode_count = msgspec.json.Decoder(_TokenCount).decode


class _EmbeddingData(msgspec.Struct):
    index: int
    embedding: list[float]


class _EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int = 0


class _EmbeddingList(msgspec.Struct):
    data: list[_EmbeddingData]
    usage: _EmbeddingUsage | None = None


_decode_embeddings = msgspec.json.Decoder(_EmbeddingList).decode
_encode = msgspec.json.Encoder().encode


class _ReplicaFailed(Exception):
    """The replica may be at fault (a 5xx, a broken stream): retried elsewhere once while nothing has streamed."""


_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
"""No connection, a dropped connection, a truncated body, no byte within timeout_s."""
_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
"""The TCP connection was never made: the request cannot be at fault, only the replica."""


def _public(url: str) -> str:
    """A replica's URL for logs and /ready, without a password."""
    return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1****@", url)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _server_root(url: str) -> str:
    """Where a server's own routes (`/ready`, `/tokenize`) live: the API root without its `/v1`."""
    return url[: -len("/v1")] if url.endswith("/v1") else url


class _Replica:
    """One upstream base URL, its own connection pool, its health, and the figures /ready shows."""

    __slots__ = (
        "consecutive",
        "failures",
        "health",
        "in_flight",
        "name",
        "served",
        "session",
        "up",
        "urls",
        "wake",
        "watcher",
    )

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.name = _public(url)
        self.session = session
        root = _server_root(url)
        self.urls = {kind: URL(f"{url}/{kind}") for kind in ("chat/completions", "completions", "models", "embeddings")}
        self.urls["ready"] = URL(f"{root}/ready")
        self.urls["tokenize"] = URL(f"{root}/tokenize")
        self.in_flight = 0
        self.served = 0
        self.failures = 0
        """Failures of every kind since start-up."""
        self.consecutive = 0
        """Failures since the last request it served."""
        self.up = True
        self.health: str | None = None
        """How its health is read: "ready" (`GET /ready`) or "models" (`GET /models`); None until first checked."""
        self.wake = asyncio.Event()
        self.watcher: asyncio.Task | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.name,
            "up": self.up,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "health": self.health,
        }


class RemoteEngine(Engine):
    def __init__(self, model: ModelConfig, backend: OpenAIBackendConfig, backend_name: str) -> None:
        self.config = model
        self.backend = backend
        self.backend_name = backend_name
        # Constrained decoding, tool-call parsing and reasoning parsing are the upstream's business: the fields are
        # passed on, and refused there if the upstream cannot honour them.
        self.info = ModelInfo(
            name=model.name,
            backend="openai",
            source=model.source,
            created=int(time.time()),
            structured_output=True,
            tools=True,
            thinking=True,
            embeddings=model.task == "embed",
        )
        self._replicas: list[_Replica] = []
        self._turn = 0
        self._tokenize: bool | None = None if backend.tokenize else False
        """Whether the upstream has vLLM's `POST /tokenize`: None until asked."""

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        backend = self.backend
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if backend.api_key:
            headers["authorization"] = f"Bearer {backend.api_key}"
        # `connect` bounds the wait for a free pooled connection plus the TCP connect; `sock_connect` the TCP connect
        # alone, so a replica that does not answer is found out quickly even when the pool is busy.
        timeout = aiohttp.ClientTimeout(
            total=None, connect=backend.timeout_s, sock_connect=backend.connect_timeout_s, sock_read=backend.timeout_s
        )
        self._replicas = [
            _Replica(
                url,
                aiohttp.ClientSession(
                    headers=headers,
                    timeout=timeout,
                    # One pool per replica, so a slow replica never holds connections another one needs.
                    connector=aiohttp.TCPConnector(limit=backend.max_connections, limit_per_host=0),
                    auto_decompress=False,
                    raise_for_status=False,
                ),
            )
            for url in backend.urls
        ]
        reasons = await asyncio.gather(*(self._check(replica) for replica in self._replicas))
        for replica, reason in zip(self._replicas, reasons, strict=True):
            if reason is not None:
                replica.up = False
                logger.warning(
                    "model '%s': replica %s of backend '%s' is out at start-up (%s); checking it every %ss",
                    self.info.name, replica.name, self.backend_name, reason, backend.cooldown_s,
                )  # fmt: skip
        listings = await asyncio.gather(*(self._models(r) for r in self._replicas if r.up))
        self._describe([m for listing in listings if listing for m in listing])
        for replica in self._replicas:
            replica.watcher = asyncio.create_task(self._watch(replica), name=f"health {replica.name}")

    def _describe(self, models: list[_Model]) -> None:
        """Take what the upstream's `/models` tells about this model (vLLM's `max_model_len`) into ModelInfo."""
        if not models:
            return
        known = next((m for m in models if m.id == self.config.source), None)
        if known is None:
            logger.warning(
                "model '%s': the replicas do not list '%s' in /models (they list: %s)",
                self.info.name, self.config.source, ", ".join(sorted({m.id for m in models})),
            )  # fmt: skip
            return
        self.info = msgspec.structs.replace(
            self.info, context_length=known.max_model_len, created=known.created or self.info.created
        )

    async def close(self) -> None:
        watchers = [replica.watcher for replica in self._replicas if replica.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(replica.session.close() for replica in self._replicas), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return any(replica.up for replica in self._replicas)

    def stats(self) -> dict[str, Any]:
        return {
            "running": sum(replica.in_flight for replica in self._replicas),
            "replicas": [replica.stats() for replica in self._replicas],
        }

    # -- health ----------------------------------------------------------------------------------------------

    async def _watch(self, replica: _Replica) -> None:
        """The replica's health, for the engine's lifetime: checked every health_interval_s while in (and at once
        when a request failed there), every cooldown_s while out, until it is healthy again."""
        backend = self.backend
        while True:
            if replica.up:
                try:  # not wait_for: on 3.11 it swallows a cancel that arrives as the event is set
                    async with asyncio.timeout(backend.health_interval_s):
                        await replica.wake.wait()
                except TimeoutError:
                    pass
                replica.wake.clear()
                if not replica.up:  # taken out meanwhile
                    continue
                reason = await self._check(replica)
                if reason is not None:
                    self._take_out(replica, reason)
            else:
                await asyncio.sleep(backend.cooldown_s)
                if await self._check(replica) is None:
                    if self.info.context_length is None:
                        self._describe(await self._models(replica) or [])
                    replica.up, replica.consecutive = True, 0
                    logger.info("model '%s': replica %s is back", self.info.name, replica.name)

    async def _check(self, replica: _Replica) -> str | None:
        """Why the replica cannot take requests now, or None when it can: its `/ready` (for this server's, the
        model's own entry), else its `/models`."""
        timeout = aiohttp.ClientTimeout(total=min(self.backend.timeout_s, 10.0))
        if replica.health != "models":
            try:
                async with replica.session.get(replica.urls["ready"], timeout=timeout) as response:
                    if response.status not in _NO_READY:
                        replica.health = "ready"
                        return _readiness(await response.read(), response.status, self.config.source)
            except _TRANSPORT_ERRORS as exc:
                return _reason(exc)
            replica.health = "models"  # no /ready there: vLLM, OpenAI, mlx_lm.server
            logger.info("model '%s': replica %s has no /ready; its health is its /models", self.info.name, replica.name)
        try:
            async with replica.session.get(replica.urls["models"], timeout=timeout) as response:
                if response.status != 200:
                    return f"/models answered {response.status}"
        except _TRANSPORT_ERRORS as exc:
            return _reason(exc)
        return None

    async def _models(self, replica: _Replica) -> list[_Model] | None:
        """The replica's model list, or None when it does not answer 200."""
        timeout = aiohttp.ClientTimeout(total=min(self.backend.timeout_s, 10.0))
        try:
            async with replica.session.get(replica.urls["models"], timeout=timeout) as response:
                if response.status != 200:
                    return None
                body = await response.read()
        except _TRANSPORT_ERRORS:
            return None
        try:
            return _decode_models(body).data
        except msgspec.MsgspecError:
            return []

    def _take_out(self, replica: _Replica, reason: str) -> None:
        if not replica.up:
            return
        replica.up = False
        replica.wake.set()  # its watcher moves on to checking it every cooldown_s
        logger.warning(
            "model '%s': replica %s is out (%s); checking it every %ss",
            self.info.name, replica.name, reason, self.backend.cooldown_s,
        )  # fmt: skip

    def _failed(self, replica: _Replica, exc: BaseException, sent: bool) -> None:
        """Count a failure. One that may be the request's own (`sent`) takes the replica out only after
        max_failures in a row or when its health check fails now; a refused connection at once."""
        replica.failures += 1
        replica.consecutive += 1
        if not sent or replica.consecutive >= self.backend.max_failures:
            self._take_out(replica, f"{_reason(exc)}; {replica.consecutive} failure(s) in a row")
        else:
            replica.wake.set()  # check its health now

    # -- balancing -------------------------------------------------------------------------------------------

    def _pick(self, tried: list[_Replica]) -> _Replica | None:
        """The replica with the fewest requests in flight; ties go round-robin, so equal replicas share evenly
        even when requests come one at a time."""
        replicas = self._replicas
        count = len(replicas)
        if not count:  # not started
            return None
        self._turn = (self._turn + 1) % count
        best = None
        for k in range(count):
            replica = replicas[(self._turn + k) % count]
            if replica.up and replica not in tried and (best is None or replica.in_flight < best.in_flight):
                best = replica
        return best

    # -- generation ------------------------------------------------------------------------------------------

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """A token-id prompt's length; otherwise the upstream's `POST /tokenize` (vLLM's: the chat template and
        tools applied as for generation), asked of the least busy replica. None where the upstream has none (this
        server, OpenAI): the finishing delta's usage still settles the count exactly."""
        if isinstance(request.prompt, list):
            return len(request.prompt)
        if self._tokenize is False:
            return None
        up = [replica for replica in self._replicas if replica.up]
        if not up:
            return None
        replica = min(up, key=lambda r: r.in_flight)
        body: dict[str, Any] = {"model": self.config.source}
        if request.messages is not None:
            body["messages"] = [_message(m) for m in request.messages]
            body["add_generation_prompt"] = request.add_generation_prompt
            if tools := _tools(request):
                body["tools"] = tools
            if kwargs := _template_kwargs(request):
                body["chat_template_kwargs"] = kwargs
        else:
            body["prompt"] = request.prompt
        timeout = aiohttp.ClientTimeout(total=min(self.backend.timeout_s, 10.0))
        try:
            async with replica.session.post(replica.urls["tokenize"], data=_encode(body), timeout=timeout) as response:
                if response.status in _NO_TOKENIZE:
                    if self._tokenize is None:
                        logger.info(
                            "model '%s': the upstream has no /tokenize; token budgets reserve max tokens only and "
                            "settle on the reported usage", self.info.name,
                        )  # fmt: skip
                    self._tokenize = False
                    return None
                if response.status != 200:
                    return None
                count = _decode_count(await response.read()).count
        except (*_TRANSPORT_ERRORS, msgspec.MsgspecError):
            return None
        self._tokenize = True
        return count

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        kind, body = self._upstream_body(request)
        want_logprobs = request.sampling.logprobs is not None
        tried: list[_Replica] = []
        failures: list[str] = []
        retried = False  # a request that may itself be the cause of a failure is retried once only
        while True:
            replica = self._pick(tried)
            if replica is None:
                failures.append(f"no replica of backend '{self.backend_name}' is up")
                raise EngineUnavailableError(f"model '{self.info.name}': {'; '.join(failures)}")
            tried.append(replica)
            replica.in_flight += 1
            pool_full = replica.in_flight > self.backend.max_connections  # this request waits for a connection
            response = None
            streamed = done = False
            try:
                started = time.perf_counter()
                response = await replica.session.post(replica.urls[kind], data=body)
                if response.status >= 400:
                    raise await self._refusal(replica, response)
                async for delta in self._deltas(response, started, want_logprobs):
                    streamed = True
                    yield delta
                replica.served += 1
                replica.consecutive = 0
                done = True
                return
            except UpstreamError:  # the request's own fault: the replica answered, and nothing is retried
                replica.served += 1
                replica.consecutive = 0
                raise
            except (*_TRANSPORT_ERRORS, _ReplicaFailed) as exc:
                if pool_full and isinstance(exc, aiohttp.ConnectionTimeoutError):  # our pool, not the replica, is full
                    raise EngineUnavailableError(
                        f"model '{self.info.name}': all {self.backend.max_connections} connections to {replica.name} "
                        "are busy"
                    ) from None
                sent = not isinstance(exc, _NOT_SENT)
                self._failed(replica, exc, sent)
                failures.append(f"replica {replica.name} failed ({_reason(exc)})")
                if streamed or (sent and retried):  # once tokens reached the client a retry would repeat them
                    raise EngineUnavailableError(f"model '{self.info.name}': {'; '.join(failures)}") from None
                retried = retried or sent
            finally:
                replica.in_flight -= 1
                if response is not None:
                    # A whole body hands the connection back to the pool; mid-stream (client gone) closing it is
                    # what tells the upstream to stop generating.
                    if done:
                        response.release()
                    else:
                        response.close()

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """`POST {url}/embeddings` on the least busy replica, as floats. Nothing streams, so a replica that fails
        is retried once on another (a 4xx is the request's own and goes back as it is)."""
        body: dict[str, Any] = {"model": self.config.source, "input": request.input, "encoding_format": "float"}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions  # the upstream knows whether its model allows it
        if request.truncate:
            body["truncate_prompt_tokens"] = -1  # vLLM's: cut to the model's context
        data = _encode(body)
        tried: list[_Replica] = []
        failures: list[str] = []
        while True:
            replica = self._pick(tried)
            if replica is None:
                failures.append(f"no replica of backend '{self.backend_name}' is up")
                raise EngineUnavailableError(f"model '{self.info.name}': {'; '.join(failures)}")
            tried.append(replica)
            replica.in_flight += 1
            try:
                async with replica.session.post(replica.urls["embeddings"], data=data) as response:
                    if response.status >= 400:
                        raise await self._refusal(replica, response)
                    answer = _decode_embeddings(await response.read())
                replica.served += 1
                replica.consecutive = 0
                vectors = [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]
                return Embeddings(vectors=vectors, prompt_tokens=answer.usage.prompt_tokens if answer.usage else 0)
            except UpstreamError:
                replica.served += 1
                replica.consecutive = 0
                raise
            except msgspec.MsgspecError as exc:
                raise EngineUnavailableError(
                    f"model '{self.info.name}': replica {replica.name} answered no embedding list ({exc})"
                ) from None
            except (*_TRANSPORT_ERRORS, _ReplicaFailed) as exc:
                sent = not isinstance(exc, _NOT_SENT)
                self._failed(replica, exc, sent)
                failures.append(f"replica {replica.name} failed ({_reason(exc)})")
                if len(tried) > 1 and sent:
                    raise EngineUnavailableError(f"model '{self.info.name}': {'; '.join(failures)}") from None
            finally:
                replica.in_flight -= 1

    def _upstream_body(self, request: GenerationRequest) -> tuple[str, bytes]:
        """The upstream request: the sampling fields that differ from their defaults (OpenAI itself refuses
        vLLM's extensions such as top_k), always streamed with usage."""
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.config.source,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        if s.stop:
            body["stop"] = s.stop
        if s.seed is not None:
            body["seed"] = s.seed
        if s.top_k:
            body["top_k"] = s.top_k
        if s.min_p:
            body["min_p"] = s.min_p
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            if (value := getattr(s, name)) is not None:
                body[name] = value
        if s.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": s.json_schema},
            }
        elif s.json_object:
            body["response_format"] = {"type": "json_object"}
        for name in ("regex", "choice", "grammar"):  # vLLM's extension, for upstreams that take it
            if getattr(s, name) is not None:
                body["structured_outputs"] = {name: getattr(s, name)}
        if request.messages is not None:
            body["messages"] = [_message(m) for m in request.messages]
            if s.logprobs is not None:
                body["logprobs"] = True
                if s.logprobs:
                    body["top_logprobs"] = s.logprobs
            if not request.add_generation_prompt:
                body["add_generation_prompt"] = False  # vLLM's extension: continue the last message
            if tools := _tools(request):
                body["tools"] = tools
                choice = request.tool_choice
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": choice.name}}
                    if isinstance(choice, NamedToolChoice)
                    else choice
                )
                if not request.parallel_tool_calls:
                    body["parallel_tool_calls"] = False
            reasoning = request.reasoning
            if reasoning.effort is not None:
                body["reasoning_effort"] = reasoning.effort
            if reasoning.budget_tokens is not None:
                body["thinking_token_budget"] = reasoning.budget_tokens  # vLLM's
            if kwargs := _template_kwargs(request):
                body["chat_template_kwargs"] = kwargs
            return "chat/completions", _encode(body)
        body["prompt"] = request.prompt
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
        return "completions", _encode(body)

    async def _refusal(self, replica: _Replica, response: aiohttp.ClientResponse) -> Exception:
        """A 5xx may be the replica's fault; a 4xx is the request's own and goes to the client as it is."""
        status = response.status
        body = await response.read()
        message = _error_message(body, response.reason or str(status))
        if status >= 500:
            return _ReplicaFailed(f"{status} {message}")
        headers = {k: v for k in _PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        if status in (401, 403):  # this server's api_key, which the client cannot fix
            logger.error(
                "model '%s': replica %s refused backends.%s.api_key: %s", self.info.name, replica.name,
                self.backend_name, message,
            )  # fmt: skip
            return UpstreamError(502, f"the upstream refused this server's credentials: {message}")
        return UpstreamError(status, message, headers, param=_error_param(body))

    async def _deltas(
        self, response: aiohttp.ClientResponse, started: float, want_logprobs: bool
    ) -> AsyncIterator[Delta]:
        """Upstream SSE → Deltas. The finishing delta waits for the usage event and the end of the body, so it
        carries the upstream's token counts and the connection goes back to the pool whole."""
        final: Delta | None = None
        usage: _Usage | None = None
        first = 0.0
        tokens = 0
        rest = b""
        async for data in response.content.iter_any():
            lines = (rest + data).split(b"\n") if rest else data.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators, `: keepalive` comments, `event:` names
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue  # the body ends right after it
                try:
                    event = _decode_event(payload)
                except msgspec.MsgspecError as exc:
                    raise _ReplicaFailed(f"unreadable event {payload[:200]!r}: {exc}") from None
                if event.error is not None:
                    raise _stream_error(event.error)
                if event.usage is not None:
                    usage = event.usage
                if not event.choices:
                    continue
                choice = event.choices[0]
                message = choice.delta
                if message is not None:
                    text = message.content or ""
                    reasoning = message.reasoning or message.reasoning_content or ""
                    calls = _tool_calls(message.tool_calls) if message.tool_calls else None
                else:
                    text, reasoning, calls = choice.text or "", "", None
                finish = _FINISH.get(choice.finish_reason, "stop") if choice.finish_reason else None
                logprobs = _logprobs(choice.logprobs) if want_logprobs and choice.logprobs is not None else None
                # tokens this chunk carries: exact with logprobs, else one per chunk that adds something
                count = len(logprobs) if logprobs else int(bool(text or reasoning or calls))
                if not count and finish is None:
                    continue  # the role-only opening chunk
                if not first:
                    first = time.perf_counter()
                tokens += count
                delta = Delta(
                    text=text,
                    reasoning=reasoning,
                    tool_calls=calls,
                    token_ids=[UNKNOWN_TOKEN_ID] * count,
                    logprobs=logprobs,
                    finish_reason=finish,
                    stop_sequence=choice.stop_reason if isinstance(choice.stop_reason, str) else None,
                )
                if finish is None:
                    yield delta
                elif final is None:
                    final = delta
        if final is None:
            raise _ReplicaFailed("the stream ended before the generation finished")
        now = time.perf_counter()
        final.usage = _usage(usage, tokens)
        final.usage.prompt_s = first - started
        final.usage.decode_s = now - first
        yield final


def _usage(upstream: _Usage | None, tokens: int) -> Usage:
    """The upstream's usage; without one (a server that ignores include_usage), the tokens counted in the stream
    and an unknown (0) prompt."""
    if upstream is None:
        return Usage(prompt_tokens=0, completion_tokens=tokens)
    details = upstream.completion_tokens_details
    cached = upstream.prompt_tokens_details
    return Usage(
        prompt_tokens=upstream.prompt_tokens or 0,
        completion_tokens=upstream.completion_tokens if upstream.completion_tokens is not None else tokens,
        reasoning_tokens=(details.reasoning_tokens or 0) if details is not None else 0,
        cached_prompt_tokens=(cached.cached_tokens or 0) if cached is not None else 0,
    )


def _tool_calls(fragments: list[_ToolCallFragment]) -> list[ToolCallDelta] | None:
    """The fragments that add something (vLLM ends a call with an empty one)."""
    calls = []
    for f in fragments:
        name = (f.function.name or None) if f.function is not None else None
        arguments = (f.function.arguments or "") if f.function is not None else ""
        if f.id or name or arguments:
            calls.append(ToolCallDelta(index=f.index, id=f.id or None, name=name, arguments=arguments))
    return calls or None


def _message(message: ChatMessage) -> dict[str, Any]:
    """A contract message as the chat-completions API spells it."""
    content: Any = (
        message.content
        if isinstance(message.content, str)
        else [{"type": "text", "text": part.text} for part in message.content]
    )
    out: dict[str, Any] = {"role": message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ]
        if content == "":
            out["content"] = None  # as OpenAI's own assistant turns with calls only
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    if message.reasoning:
        out["reasoning"] = message.reasoning  # vLLM's field for an earlier turn's thinking
    return out


def _tools(request: GenerationRequest) -> list[dict[str, Any]]:
    tools = []
    for tool in request.tools:
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.strict:
            function["strict"] = True
        tools.append({"type": "function", "function": function})
    return tools


def _template_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """`chat_template_kwargs` (vLLM's, SGLang's): the thinking switch, then the client's own, which win."""
    kwargs: dict[str, Any] = {}
    if request.reasoning.enabled is not None:
        kwargs["enable_thinking"] = request.reasoning.enabled
    kwargs.update(request.chat_template_kwargs)
    return kwargs


def _readiness(body: bytes, status: int, source: str) -> str | None:
    """None when `/ready` says the replica can serve `source`: this server's names each model, others answer
    200 or not."""
    try:
        models = _decode_readiness(body).models
    except msgspec.MsgspecError:
        models = None
    if models is not None and source in models:
        return None if models[source].ready else f"its /ready says '{source}' is not ready"
    return None if status == 200 else f"/ready answered {status}"


def _logprobs(upstream: _Logprobs) -> list[TokenLogprob] | None:
    if upstream.content is not None:
        return [
            TokenLogprob(
                token=t.token,
                token_id=UNKNOWN_TOKEN_ID,
                logprob=t.logprob,
                top=[TopLogprob(token=a.token, token_id=UNKNOWN_TOKEN_ID, logprob=a.logprob) for a in t.top_logprobs],
            )
            for t in upstream.content
        ]
    if upstream.tokens is None:
        return None
    values = upstream.token_logprobs or []
    tops = upstream.top_logprobs or []
    out = []
    for i, token in enumerate(upstream.tokens):
        alternatives = sorted((tops[i] or {}).items(), key=lambda kv: -kv[1]) if i < len(tops) else []
        out.append(
            TokenLogprob(
                token=token,
                token_id=UNKNOWN_TOKEN_ID,
                logprob=(values[i] if i < len(values) else None) or 0.0,
                top=[TopLogprob(token=t, token_id=UNKNOWN_TOKEN_ID, logprob=v) for t, v in alternatives],
            )
        )
    return out


def _error_message(body: bytes, fallback: str) -> str:
    try:
        parsed = _decode_error(body)
    except msgspec.MsgspecError:
        return body.decode(errors="replace").strip()[:1000] or fallback
    if isinstance(parsed.error, _Error) and parsed.error.message:
        return parsed.error.message
    if isinstance(parsed.error, str):
        return parsed.error
    if parsed.message:
        return parsed.message
    if parsed.detail is not None:
        return parsed.detail if isinstance(parsed.detail, str) else msgspec.json.encode(parsed.detail).decode()
    return fallback


def _error_param(body: bytes) -> str | None:
    """The request field an OpenAI-shaped refusal names, passed on so the client learns which of its fields."""
    try:
        parsed = _decode_error(body)
    except msgspec.MsgspecError:
        return None
    return parsed.error.param if isinstance(parsed.error, _Error) else None


def _stream_error(error: _Error | str) -> Exception:
    """An error event after the upstream's stream began. vLLM puts the HTTP status it means in `code`: a 4xx is the
    request's fault and reaches the client as it is; anything else (a 5xx, this server's string codes) may be the
    replica's."""
    if isinstance(error, str):
        return _ReplicaFailed(error)
    message = error.message or "the upstream failed"
    if isinstance(error.code, int) and 400 <= error.code < 500:
        return UpstreamError(error.code, message, param=error.param)
    return _ReplicaFailed(f"{error.code} {message}" if isinstance(error.code, int) else message)
