"""[auth] + [rate_limits]: API keys with model scopes, and per-key limits, on every route of every dialect.

Keys are held only as sha256 digests and compared in constant time against all of them. A request's key name
(never the key) goes to `scope["state"]["api_key_name"]` for logs and metrics, and its `Caller` to a context
variable that the registry (scopes) and `generate_choices` (tokens, streams) read. Errors raised here are
rendered by the matched route's dialect, so an Ollama client gets `{"error": ...}` and an OpenAI client
`{"error": {"type": "authentication_error", ...}}`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from litestar import Litestar, Request, Response
from litestar.config.app import AppConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from litestar_llm.caller import Caller, current_caller
from litestar_llm.config import APIKey, RateLimitPolicy, Settings
from litestar_llm.errors import AuthenticationError, LitestarLLMError
from litestar_llm.limits import KeyLimits, Windows

logger = logging.getLogger(__name__)


class KeyEntry:
    __slots__ = ("digest", "models", "name", "policy")

    def __init__(self, key: APIKey, models: frozenset[str] | None, policy: RateLimitPolicy | None) -> None:
        self.name, self.models, self.policy = key.name, models, policy
        self.digest = bytes.fromhex(key.key_sha256) if key.key_sha256 else hashlib.sha256(key.key.encode()).digest()


def key_entries(settings: Settings) -> list[KeyEntry]:
    canonical = {alias: m.name for m in settings.models for alias in (m.name, *m.aliases)}
    return [
        KeyEntry(
            key,
            None if key.models is None else frozenset(canonical[m] for m in key.models),
            settings.rate_limits[key.rate_limit] if key.rate_limit else None,
        )
        for key in settings.auth.keys
    ]


def presented_key(scope: Scope) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI and Ollama clients) or `x-api-key: <key>`."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    return None


UNMETERED_PATHS = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/ui/status",
        "/",
        "/v1/models",
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/version",
    }
)
"""Health, model listings and metrics: authenticated like everything else, but never counted against a key's
requests_per_minute (a client that lists models before each call, or a dashboard, must not use up its budget)."""


def unmetered(path: str) -> bool:
    return path in UNMETERED_PATHS or path.startswith("/v1/models/")


class AuthMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)
    exclude_opt_key = "public_asset"
    """Routes with this opt are files a browser loads before it has a key (the status page, the docs' scripts)."""

    def __init__(self, settings: Settings, windows: Windows) -> None:
        self.windows = windows
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Keys, scopes, rate limits and public paths from `settings`; a reload calls it again for new requests."""
        self.entries = key_entries(settings)
        self.active = settings.auth.enabled and bool(self.entries)
        self.public, self.fail_open = frozenset(settings.auth.public_paths), settings.state.fail_open

    def match(self, key: str) -> KeyEntry | None:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for entry in self.entries:  # no early exit: timing does not tell how many digests were compared
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if not self.active or scope["path"] in self.public or scope["method"] == "OPTIONS":  # preflights: no key
            await next_app(scope, receive, send)
            return
        key = presented_key(scope)
        if key is None:
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'")
        entry = self.match(key)
        if entry is None:
            raise AuthenticationError("invalid API key")
        scope.setdefault("state", {})["api_key_name"] = entry.name
        limits = KeyLimits(entry.name, entry.policy, self.windows, self.fail_open) if entry.policy else None
        token = current_caller.set(Caller(entry.name, entry.models, limits))
        try:
            if limits is not None and not unmetered(scope["path"]):
                await limits.admit()
                send = _with_headers(send, limits)
            await next_app(scope, receive, send)
        finally:
            current_caller.reset(token)


def _with_headers(send: Send, limits: KeyLimits) -> Send:
    """Every response of a limited key carries OpenAI's x-ratelimit-* headers, as of when it started."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableScopeHeaders.from_message(message)
            for name, value in limits.headers().items():
                if name not in headers:
                    headers[name] = value
        await send(message)

    return wrapped


def _plain_error(_request: Request, exc: LitestarLLMError) -> Response:
    detail = getattr(exc, "message", str(exc))
    return Response(
        {"status_code": exc.status_code, "detail": detail},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


class AuthPlugin(InitPlugin):
    def __init__(self, settings: Settings, windows: Windows) -> None:
        self.entries = key_entries(settings)
        self.settings, self.windows = settings, windows
        self.middleware = AuthMiddleware(settings, windows)

    def apply(self, _old: Settings, new: Settings) -> None:
        """A reload: the keys, scopes and limits of `new` for the requests from now on."""
        self.settings, self.entries = new, key_entries(new)
        self.middleware.configure(new)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # Installed even with no keys, so that a reload can add some; it lets everything through meanwhile.
        app_config.middleware.append(self.middleware)
        # Dialect routes render these in their own format; the rest (/metrics, /docs) in Litestar's.
        app_config.exception_handlers.setdefault(LitestarLLMError, _plain_error)
        app_config.on_startup.append(self._announce)
        return app_config

    async def _announce(self, _app: Litestar) -> None:
        settings = self.settings
        if not (settings.auth.enabled and self.entries):
            logger.warning("no API keys: the server is open to anyone who can reach it ([auth] in server.toml)")
        elif settings.server.workers > 1 and settings.rate_limits and settings.state.url.startswith("memory://"):
            logger.warning(
                "rate limits are kept per worker with [state] url = memory:// and %d workers: each worker allows the "
                "full limit; use redis:// to share them",
                settings.server.workers,
            )
