"""Per-key rate limits over sliding one-minute windows: requests, tokens and concurrent streams; and the bound on
how long a request's body may take to arrive (slow clients).

A sliding log (every admitted request, every token reservation, kept with its time) is exact: no fixed-window
boundary lets 2x through. The windows live in one process (`MemoryWindows`) or in Redis (`RedisWindows`), where
each check-and-record is one Lua script, atomic across granian workers and server instances, timed by Redis's
own clock.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from litestar_llm.errors import InvalidRequestError, RateLimitError, StateUnavailableError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from litestar_llm.config import RateLimitPolicy

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
LEASE_S = 60.0
"""A stream's concurrency lease outlives a crashed worker by at most this long; live streams refresh it."""


class Verdict:
    """One window's answer: admitted or not, when it would admit (`retry_after`), how full it is (`used`), and
    when it will be empty again (`reset`)."""

    __slots__ = ("allowed", "reset", "retry_after", "used")

    def __init__(self, allowed: bool, retry_after: float, used: int, reset: float) -> None:
        self.allowed, self.retry_after, self.used, self.reset = allowed, max(retry_after, 0.0), used, max(reset, 0.0)


class StoreDown(Exception):
    """The shared store did not answer."""


class Windows(abc.ABC):
    """Where the windows live. `key` is the API key's name."""

    @abc.abstractmethod
    async def admit(self, key: str, rpm: int | None) -> tuple[Verdict, Verdict]:
        """Record one request if `rpm` allows it; also read the token window (for response headers)."""

    @abc.abstractmethod
    async def reserve(self, key: str, tpm: int, tokens: int, ticket: str) -> Verdict:
        """Reserve `tokens` in the token window under `ticket` if they fit."""

    @abc.abstractmethod
    async def settle(self, key: str, ticket: str, tokens: int) -> None:
        """Replace a reservation with the real count (if it is still in the window)."""

    @abc.abstractmethod
    async def acquire(self, key: str, limit: int, ticket: str) -> bool: ...

    @abc.abstractmethod
    async def refresh(self, key: str, ticket: str) -> None: ...

    @abc.abstractmethod
    async def release(self, key: str, ticket: str) -> None: ...

    async def close(self) -> None:
        return None


class MemoryWindows(Windows):
    """One process's windows: exact for one granian worker, per worker with several (use Redis to share)."""

    def __init__(self) -> None:
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, dict[str, tuple[float, int]]] = {}  # insertion order is time order
        self._leases: dict[str, dict[str, float]] = {}

    def _token_window(self, key: str, now: float) -> dict[str, tuple[float, int]]:
        window = self._tokens.setdefault(key, {})
        for ticket in [t for t, (at, _) in window.items() if at <= now - WINDOW_S]:
            del window[ticket]
        return window

    @staticmethod
    def _reset(newest: float | None, now: float) -> float:
        return 0.0 if newest is None else newest + WINDOW_S - now

    async def admit(self, key: str, rpm: int | None) -> tuple[Verdict, Verdict]:
        now = time.time()
        log = self._requests.setdefault(key, deque())
        while log and log[0] <= now - WINDOW_S:
            log.popleft()
        allowed, retry = True, 0.0
        if rpm is not None:
            if len(log) >= rpm:
                allowed, retry = False, log[len(log) - rpm] + WINDOW_S - now
            else:
                log.append(now)
        requests = Verdict(allowed, retry, len(log), self._reset(log[-1] if log else None, now))
        window = self._token_window(key, now)
        newest = next(reversed(window.values()))[0] if window else None
        return requests, Verdict(True, 0.0, sum(n for _, n in window.values()), self._reset(newest, now))

    async def reserve(self, key: str, tpm: int, tokens: int, ticket: str) -> Verdict:
        now = time.time()
        window = self._token_window(key, now)
        used = sum(n for _, n in window.values())
        if used + tokens > tpm:
            freed, retry = 0, WINDOW_S
            for at, n in window.values():
                freed += n
                if used - freed + tokens <= tpm:
                    retry = at + WINDOW_S - now
                    break
            newest = next(reversed(window.values()))[0]
            return Verdict(False, retry, used, self._reset(newest, now))
        window[ticket] = (now, tokens)
        return Verdict(True, 0.0, used + tokens, WINDOW_S)

    async def settle(self, key: str, ticket: str, tokens: int) -> None:
        window = self._tokens.get(key, {})
        if ticket in window:
            window[ticket] = (window[ticket][0], tokens)

    async def acquire(self, key: str, limit: int, ticket: str) -> bool:
        now = time.time()
        leases = self._leases.setdefault(key, {})
        for stale in [t for t, until in leases.items() if until <= now]:
            del leases[stale]
        if len(leases) >= limit:
            return False
        leases[ticket] = now + LEASE_S
        return True

    async def refresh(self, key: str, ticket: str) -> None:
        leases = self._leases.get(key, {})
        if ticket in leases:
            leases[ticket] = time.time() + LEASE_S

    async def release(self, key: str, ticket: str) -> None:
        self._leases.get(key, {}).pop(ticket, None)


# Shared by the scripts: Redis's clock (one clock for every instance) and the token window's bookkeeping (a ZSET of
# tickets by time plus a HASH of ticket → tokens, pruned together).
_LUA_PRELUDE = """
local W = tonumber(ARGV[1])
local T = redis.call('TIME')
local now = tonumber(T[1]) + tonumber(T[2]) / 1000000
local function reset_of(zkey)
  local last = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if #last == 0 then return 0 end
  return tonumber(last[2]) + W - now
end
local function tokens_used(zkey, hkey)
  local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', now - W)
  if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - W)
    redis.call('HDEL', hkey, unpack(old))
  end
  local used = 0
  for _, n in ipairs(redis.call('HVALS', hkey)) do used = used + tonumber(n) end
  return used
end
"""

# KEYS: requests zset, tokens zset, tokens hash. ARGV: window, rpm (0: none), ticket.
_ADMIT = (
    _LUA_PRELUDE
    + """
local rpm = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - W)
local used = redis.call('ZCARD', KEYS[1])
local allowed, retry = 1, 0
if rpm > 0 and used >= rpm then
  allowed = 0
  local e = redis.call('ZRANGE', KEYS[1], used - rpm, used - rpm, 'WITHSCORES')
  retry = tonumber(e[2]) + W - now
else
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(W * 1000))
  used = used + 1
end
local tused = tokens_used(KEYS[2], KEYS[3])
return {allowed, tostring(retry), used, tostring(reset_of(KEYS[1])), tused, tostring(reset_of(KEYS[2]))}
"""
)

# KEYS: tokens zset, tokens hash. ARGV: window, tpm, ticket, tokens.
_RESERVE = (
    _LUA_PRELUDE
    + """
local tpm, need = tonumber(ARGV[2]), tonumber(ARGV[4])
local used = tokens_used(KEYS[1], KEYS[2])
if used + need > tpm then
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local freed, retry = 0, W
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[2], entries[i]) or 0)
    if used - freed + need <= tpm then retry = tonumber(entries[i + 1]) + W - now break end
  end
  return {0, tostring(retry), used, tostring(reset_of(KEYS[1]))}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], need)
redis.call('PEXPIRE', KEYS[1], math.ceil(W * 1000))
redis.call('PEXPIRE', KEYS[2], math.ceil(W * 1000))
return {1, '0', used + need, tostring(W)}
"""
)

# KEYS: tokens zset, tokens hash. ARGV: ticket, tokens.
_SETTLE = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return 0
"""

# KEYS: leases zset (ticket → expiry). ARGV: window (unused), limit, ticket, lease seconds.
_ACQUIRE = (
    _LUA_PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) * 1000))
return 1
"""
)

_REFRESH = (
    _LUA_PRELUDE
    + """
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 0
"""
)


class RedisWindows(Windows):
    """Windows in Redis, shared by every worker and instance pointed at it. Keys carry a `{name}` hash tag so one
    key's windows stay in one Redis Cluster slot."""

    def __init__(self, redis: Redis, prefix: str = "litestar-llm:limits") -> None:
        from redis.exceptions import RedisError

        self._redis, self._prefix, self._errors = redis, prefix, (RedisError, OSError)
        self._admit = redis.register_script(_ADMIT)
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)

    def _keys(self, key: str, *parts: str) -> list[str]:
        return [f"{self._prefix}:{{{key}}}:{part}" for part in parts]

    async def _run(self, script, keys: list[str], args: list) -> list:
        try:
            return await script(keys=keys, args=args)
        except self._errors as exc:
            raise StoreDown(str(exc)) from None

    async def admit(self, key: str, rpm: int | None) -> tuple[Verdict, Verdict]:
        keys = self._keys(key, "requests", "tokens", "token-counts")
        allowed, retry, used, reset, tused, treset = await self._run(
            self._admit, keys, [WINDOW_S, rpm or 0, uuid.uuid4().hex]
        )
        return Verdict(bool(allowed), float(retry), int(used), float(reset)), Verdict(
            True, 0.0, int(tused), float(treset)
        )

    async def reserve(self, key: str, tpm: int, tokens: int, ticket: str) -> Verdict:
        keys = self._keys(key, "tokens", "token-counts")
        allowed, retry, used, reset = await self._run(self._reserve, keys, [WINDOW_S, tpm, ticket, tokens])
        return Verdict(bool(allowed), float(retry), int(used), float(reset))

    async def settle(self, key: str, ticket: str, tokens: int) -> None:
        await self._run(self._settle, self._keys(key, "tokens", "token-counts"), [ticket, tokens])

    async def acquire(self, key: str, limit: int, ticket: str) -> bool:
        return bool(await self._run(self._acquire, self._keys(key, "streams"), [WINDOW_S, limit, ticket, LEASE_S]))

    async def refresh(self, key: str, ticket: str) -> None:
        await self._run(self._refresh, self._keys(key, "streams"), [WINDOW_S, LEASE_S, ticket])

    async def release(self, key: str, ticket: str) -> None:
        try:
            await self._redis.zrem(self._keys(key, "streams")[0], ticket)
        except self._errors as exc:
            raise StoreDown(str(exc)) from None


def duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `120ms`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class KeyLimits:
    """One request's view of its key's policy: admits it, reserves and settles its tokens, holds its stream
    lease, and remembers the latest window figures for the `x-ratelimit-*` response headers."""

    __slots__ = ("_fail_open", "_policy", "_windows", "key", "requests", "tokens")

    def __init__(self, key: str, policy: RateLimitPolicy, windows: Windows, fail_open: bool) -> None:
        self.key, self._policy, self._windows, self._fail_open = key, policy, windows, fail_open
        self.requests: Verdict | None = None
        self.tokens: Verdict | None = None

    @property
    def token_limit(self) -> int | None:
        return self._policy.tokens_per_minute

    async def _call(self, operation, *args, default=None):
        """Run a store operation; an unreachable store fails closed (503) unless [state] fail_open."""
        try:
            return await operation(*args)
        except StoreDown as exc:
            if self._fail_open:
                _warn_store_down(exc)
                return default
            raise StateUnavailableError(
                "rate limits cannot be checked: the shared state store ([state] url) is unreachable; retry shortly"
            ) from None

    async def admit(self) -> None:
        verdicts = await self._call(self._windows.admit, self.key, self._policy.requests_per_minute)
        if verdicts is None:
            return
        self.requests, self.tokens = verdicts
        if not self.requests.allowed:
            raise self._limited("requests", self.requests.retry_after)

    async def reserve(self, tokens: int) -> str | None:
        """Reserve `tokens` of the key's tokens_per_minute; the ticket settles them later."""
        tpm = self._policy.tokens_per_minute
        if tpm is None:
            return None
        if tokens > tpm:
            raise InvalidRequestError(
                f"this request needs {tokens} tokens (prompt + max tokens), more than the "
                f"{tpm} tokens per minute this API key may use; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        ticket = uuid.uuid4().hex
        verdict = await self._call(self._windows.reserve, self.key, tpm, tokens, ticket)
        if verdict is None:
            return None
        self.tokens = verdict
        if not verdict.allowed:
            raise self._limited("tokens", verdict.retry_after)
        return ticket

    async def settle(self, ticket: str | None, tokens: int) -> None:
        if ticket is not None:
            await _quietly(self._windows.settle(self.key, ticket, tokens))

    async def acquire_stream(self) -> str | None:
        limit = self._policy.max_concurrent
        if limit is None:
            return None
        ticket = uuid.uuid4().hex
        granted = await self._call(self._windows.acquire, self.key, limit, ticket, default=True)
        if not granted:
            raise RateLimitError(
                f"this API key already has {limit} generations in flight (max_concurrent); retry when one ends",
                {"Retry-After": "1", **self.headers()},
            )
        return ticket

    async def refresh_stream(self, ticket: str) -> None:
        await _quietly(self._windows.refresh(self.key, ticket))

    async def release_stream(self, ticket: str | None) -> None:
        if ticket is not None:
            await _quietly(self._windows.release(self.key, ticket))

    def _limited(self, what: str, retry_after: float) -> RateLimitError:
        limit = self._policy.requests_per_minute if what == "requests" else self._policy.tokens_per_minute
        wait = max(1, math.ceil(retry_after))
        return RateLimitError(
            f"rate limit reached for this API key: {limit} {what} per minute; retry in {wait}s",
            {"Retry-After": str(wait), **self.headers()},
        )

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the windows this request has seen."""
        out: dict[str, str] = {}
        for what, limit, verdict in (
            ("requests", self._policy.requests_per_minute, self.requests),
            ("tokens", self._policy.tokens_per_minute, self.tokens),
        ):
            if limit is not None and verdict is not None:
                out[f"x-ratelimit-limit-{what}"] = str(limit)
                out[f"x-ratelimit-remaining-{what}"] = str(max(limit - verdict.used, 0))
                out[f"x-ratelimit-reset-{what}"] = duration(verdict.reset)
        return out


async def _quietly(operation) -> None:
    """Bookkeeping after the fact (settle, release) must not fail a finished request; leases expire by themselves.
    Shielded, so a cancelled stream still returns its lease."""
    with contextlib.suppress(StoreDown, asyncio.CancelledError):
        await asyncio.shield(operation)


_last_warning = 0.0


def _warn_store_down(exc: BaseException) -> None:
    global _last_warning
    if time.monotonic() - _last_warning > 10:  # once per outage burst, not once per request
        _last_warning = time.monotonic()
        logger.warning("shared state store unreachable (%s): rate limits are not enforced ([state] fail_open)", exc)


# -- slow clients -----------------------------------------------------------------------------------------------


class BodyReadTimeout(ASGIMiddleware):
    """A request's whole body must arrive within `timeout_s` of the request's start; else it answers 408 (in the
    route's dialect, through the exception handlers) and the connection closes.

    Why here: granian bounds how long headers may take (`http1_settings.header_read_timeout`, `[server]
    header_read_timeout_s`) and how many connections a worker holds (`backpressure`), but has no bound on the body:
    a client trickling a body a byte at a time would keep its connection, and one of those permits, for as long as
    it likes, and enough of them would lock everyone else out. Only waits for the body are timed; once it is
    complete, `receive` (which then only reports a disconnect) is passed through untouched."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                complete = True
                raise HTTPException(
                    status_code=408,
                    detail=f"the request body did not arrive within {self.timeout_s:g} s (server.body_read_timeout_s)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await next_app(scope, timed_receive, send)
