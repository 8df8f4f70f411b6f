"""Remote backend (`kind = "openai"`): OpenAI-compatible replicas of one deployment behind this server.

Every generation is one upstream streaming request (`/chat/completions` for messages, `/completions` for a prompt,
with `stream_options.include_usage`) to the replica with the fewest requests in flight; its SSE events become
Deltas. A replica that fails before the first token has reached the client (no connection, a 5xx, a timeout) is
taken out for `cooldown_s` and the request is retried once on another; a background probe (`GET {url}/models`)
brings it back. An upstream 4xx reaches the client with the upstream's status and message.
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
from litestar_llm.engine.types import Delta, FinishReason, GenerationRequest, TokenLogprob, TopLogprob, Usage
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
"""Upstreams send token texts, not ids: logprobs carry this id, and deltas no token_ids."""

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "cancelled", "cancelled": "cancelled"}
_PASSED_HEADERS = ("retry-after",)
"""Upstream response headers a refused request passes on to the client."""


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


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Error(msgspec.Struct):
    message: str = ""
    code: int | str | None = None


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


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_error = msgspec.json.Decoder(_ErrorBody).decode
_decode_models = msgspec.json.Decoder(_ModelList).decode
_encode = msgspec.json.Encoder().encode


class _ReplicaFailed(Exception):
    """The replica, not the request, is at fault: take it out and retry elsewhere while nothing has streamed."""


_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
"""No connection, a dropped connection, a truncated body, no byte within timeout_s: the replica's fault."""


def _public(url: str) -> str:
    """A replica's URL for logs and /ready, without a password."""
    return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1****@", url)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Replica:
    """One upstream base URL, its own connection pool, and the figures /ready shows."""

    __slots__ = ("failures", "in_flight", "name", "probe", "served", "session", "up", "urls")

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.name = _public(url)
        self.session = session
        self.urls = {kind: URL(f"{url}/{kind}") for kind in ("chat/completions", "completions", "models")}
        self.in_flight = 0
        self.served = 0
        self.failures = 0
        self.up = True
        self.probe: asyncio.Task | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.name,
            "up": self.up,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
        }


class RemoteEngine(Engine):
    def __init__(self, model: ModelConfig, backend: OpenAIBackendConfig, backend_name: str) -> None:
        self.config = model
        self.backend = backend
        self.backend_name = backend_name
        # Constrained decoding is the upstream's business: response_format is passed on, and refused there if
        # the upstream cannot honour it.
        self.info = ModelInfo(
            name=model.name, backend="openai", source=model.source, created=int(time.time()), structured_output=True
        )
        self._replicas: list[_Replica] = []
        self._turn = 0

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
        listings = await asyncio.gather(*(self._probe(replica) for replica in self._replicas))
        for replica, listing in zip(self._replicas, listings, strict=True):
            if listing is None:
                logger.warning(
                    "model '%s': replica %s of backend '%s' is unreachable at start-up; probing it every %ss",
                    self.info.name, replica.name, self.backend_name, backend.cooldown_s,
                )  # fmt: skip
                self._take_out(replica, None)
        self._describe([m for listing in listings if listing for m in listing])

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
        for replica in self._replicas:
            if replica.probe is not None:
                replica.probe.cancel()
        await asyncio.gather(*(replica.session.close() for replica in self._replicas), return_exceptions=True)

    @property
    def ready(self) -> bool:
        return any(replica.up for replica in self._replicas)

    def stats(self) -> dict[str, Any]:
        return {
            "running": sum(replica.in_flight for replica in self._replicas),
            "replicas": [replica.stats() for replica in self._replicas],
        }

    # -- balancing and failure handling ----------------------------------------------------------------------

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

    def _take_out(self, replica: _Replica, reason: BaseException | None) -> None:
        if reason is not None:
            replica.failures += 1
        if not replica.up and replica.probe is not None:
            return
        replica.up = False
        if reason is not None:
            logger.warning(
                "model '%s': replica %s failed (%s); out for %ss",
                self.info.name, replica.name, _reason(reason), self.backend.cooldown_s,
            )  # fmt: skip
        replica.probe = asyncio.create_task(self._bring_back(replica), name=f"probe {replica.name}")

    async def _bring_back(self, replica: _Replica) -> None:
        while True:
            await asyncio.sleep(self.backend.cooldown_s)
            listing = await self._probe(replica)
            if listing is not None:
                if self.info.context_length is None:
                    self._describe(listing)
                replica.up, replica.probe = True, None
                logger.info("model '%s': replica %s is back", self.info.name, replica.name)
                return

    async def _probe(self, replica: _Replica) -> list[_Model] | None:
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

    # -- generation ------------------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        kind, body = self._upstream_body(request)
        want_logprobs = request.sampling.logprobs is not None
        tried: list[_Replica] = []
        failures: list[str] = []
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
                done = True
                return
            except UpstreamError:
                replica.served += 1
                raise
            except (*_TRANSPORT_ERRORS, _ReplicaFailed) as exc:
                if pool_full and isinstance(exc, aiohttp.ConnectionTimeoutError):  # our pool, not the replica, is full
                    raise EngineUnavailableError(
                        f"model '{self.info.name}': all {self.backend.max_connections} connections to {replica.name} "
                        "are busy"
                    ) from None
                self._take_out(replica, exc)
                failures.append(f"replica {replica.name} failed ({_reason(exc)})")
                if streamed or len(tried) > 1:  # once tokens reached the client a retry would repeat them
                    raise EngineUnavailableError(f"model '{self.info.name}': {'; '.join(failures)}") from None
            finally:
                replica.in_flight -= 1
                if response is not None:
                    # A whole body hands the connection back to the pool; mid-stream (client gone) closing it is
                    # what tells the upstream to stop generating.
                    if done:
                        response.release()
                    else:
                        response.close()

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
        if request.messages is not None:
            body["messages"] = request.messages
            if s.logprobs is not None:
                body["logprobs"] = True
                if s.logprobs:
                    body["top_logprobs"] = s.logprobs
            if not request.add_generation_prompt:
                body["add_generation_prompt"] = False  # vLLM's extension: continue the last message
            return "chat/completions", _encode(body)
        body["prompt"] = request.prompt
        if s.logprobs is not None:
            body["logprobs"] = s.logprobs
        return "completions", _encode(body)

    async def _refusal(self, replica: _Replica, response: aiohttp.ClientResponse) -> Exception:
        """A 5xx takes the replica out; a 4xx is the request's own fault and goes to the client as it is."""
        status = response.status
        message = _error_message(await response.read(), response.reason or str(status))
        if status >= 500:
            return _ReplicaFailed(f"{status} {message}")
        headers = {k: v for k in _PASSED_HEADERS if (v := response.headers.get(k)) is not None}
        if status in (401, 403):  # this server's api_key, which the client cannot fix
            logger.error(
                "model '%s': replica %s refused backends.%s.api_key: %s", self.info.name, replica.name,
                self.backend_name, message,
            )  # fmt: skip
            return UpstreamError(502, f"the upstream refused this server's credentials: {message}")
        return UpstreamError(status, message, headers)

    async def _deltas(
        self, response: aiohttp.ClientResponse, started: float, want_logprobs: bool
    ) -> AsyncIterator[Delta]:
        """Upstream SSE → Deltas. The finishing delta waits for the usage event and the end of the body, so it
        carries the upstream's token counts and the connection goes back to the pool whole."""
        final: Delta | None = None
        usage: _Usage | None = None
        first = 0.0
        pieces = 0
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
                text = (choice.delta.content if choice.delta is not None else choice.text) or ""
                finish = _FINISH.get(choice.finish_reason, "stop") if choice.finish_reason else None
                logprobs = _logprobs(choice.logprobs) if want_logprobs and choice.logprobs is not None else None
                if not text and finish is None and not logprobs:
                    continue  # the role-only opening chunk
                if not first:
                    first = time.perf_counter()
                pieces += 1
                delta = Delta(text=text, logprobs=logprobs, finish_reason=finish)
                if finish is None:
                    yield delta
                elif final is None:
                    final = delta
        if final is None:
            raise _ReplicaFailed("the stream ended before the generation finished")
        now = time.perf_counter()
        final.usage = Usage(
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else pieces,  # no usage sent: one token a chunk
            prompt_s=first - started,
            decode_s=now - first,
        )
        yield final


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


def _stream_error(error: _Error | str) -> UpstreamError:
    """An error event after the upstream's stream began; vLLM puts the HTTP status it means in `code`."""
    if isinstance(error, str):
        return UpstreamError(502, error)
    status = error.code if isinstance(error.code, int) and 400 <= error.code < 600 else 502
    return UpstreamError(status, error.message or "the upstream failed")
