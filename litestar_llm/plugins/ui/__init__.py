"""[routes] ui + [ui]: a status page and chat playground at /ui, and its figures at GET /ui/status (JSON).

The page and its assets are files in this package (no CDN, no build step) and need no key: the page asks for one,
keeps it in the browser's sessionStorage, and sends it to /ui/status and the chat route like any client. The
status answer reads the registry and the telemetry's instruments (through `Sampler`); it costs nothing per token.
With several granian workers, each answers with its own process's figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.config.app import AppConfig
from litestar.di import NamedDependency
from litestar.plugins import InitPlugin
from litestar.static_files import create_static_files_router

from litestar_llm import __version__
from litestar_llm.caller import current_caller
from litestar_llm.config import Settings
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.plugins.ui.status import KeyUsage, Sampler, Traffic

STATIC = Path(__file__).parent / "static"
PUBLIC = {"public_asset": True}
"""Served without a key (see AuthMiddleware): the page must load before it can ask for one."""
PAGE_HEADERS = {
    # Nothing the page loads may come from elsewhere: a browser enforces what the tests check.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


class ModelStatus(msgspec.Struct, kw_only=True):
    name: str
    state: str
    """As the registry's load_state says: unloaded, loading, ready, draining, failed."""
    error: str | None = None
    """Why it failed, when it did."""
    load_s: float | None = None
    backend: str
    source: str
    context_length: int | None = None
    size_bytes: int | None = None
    """The weights' size on disk, where the backend knows it."""
    kv_cache_usage: float | None = None
    running: int | None = None
    waiting: int | None = None
    max_batch_size: int | None = None
    batch_occupancy: float | None = None
    """running / max_batch_size."""
    load: dict[str, Any] = {}
    """The registry's load_state, as /ready shows it (expires_at, pinned, retry_in_s, ... where they apply)."""
    stats: dict[str, Any] = {}
    """The backend's own figures, as /ready shows them."""


class Links(msgspec.Struct, kw_only=True):
    docs: str = "/docs"
    metrics: str | None = None
    chat: str | None = None
    """The playground's route (OpenAI chat completions), when that dialect is on."""


class Status(msgspec.Struct, kw_only=True):
    """GET /ui/status: what the status page shows."""

    version: str
    started_at: float
    """Unix time."""
    uptime_s: float
    config_digest: str
    """sha256 (first 12 hex digits) of the validated server.toml: two workers or two restarts with the same
    digest run the same configuration."""
    config_generation: int | None
    """As /ready says: 1 at start-up, +1 per reload of server.toml; None where the app has no live config."""
    status: str
    """As /ready says: ready, loading, failed, shutting down."""
    models: list[ModelStatus]
    traffic: Traffic | None
    """None when telemetry is off."""
    keys: list[KeyUsage]
    """Every key for an admin key (or with no [auth]); the caller's own otherwise."""
    admin: bool
    links: Links


class UIPlugin(InitPlugin):
    def __init__(self, settings: Settings, reader: Any) -> None:
        self.settings = settings
        """The start-up settings; a reload's live config (app.state.live_config) takes over from them."""
        self.sampler = Sampler(reader, settings.ui.sample_s, settings.ui.window_s)
        self.started_at = time.time()
        self.started = time.monotonic()
        self._digested: tuple[Settings, str] | None = None
        self.links = Links(
            metrics="/metrics" if settings.telemetry.prometheus else None,
            chat="/v1/chat/completions" if settings.routes.openai else None,
        )

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        page = (STATIC / "index.html").read_bytes()

        @get("/ui", opt=PUBLIC, include_in_schema=False, sync_to_thread=False)
        def ui_page() -> Response[bytes]:
            return Response(page, media_type="text/html", headers=PAGE_HEADERS)

        @get("/ui/status", sync_to_thread=False, tags=["Status"])
        def ui_status(request: Request, registry: NamedDependency[EngineRegistry]) -> Status:
            """The status page's figures: models, traffic over the last [ui] window_s, keys, configuration."""
            live = request.app.state.get("live_config")
            if live is None:
                return self.status(registry, self.settings, None)
            return self.status(registry, live.settings, live.generation)

        assets = create_static_files_router(
            "/ui/assets", directories=[STATIC], opt=PUBLIC, include_in_schema=False, name="ui-assets"
        )
        app_config.route_handlers.extend([ui_page, ui_status, assets])
        app_config.lifespan.append(self._sampling)
        return app_config

    @contextlib.asynccontextmanager
    async def _sampling(self, _app: Litestar) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                self.sampler.sample()
                await asyncio.sleep(self.sampler.sample_s)

        task = asyncio.create_task(sample(), name="ui status sampler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self, registry: EngineRegistry, settings: Settings, generation: int | None) -> Status:
        caller = current_caller.get()
        admin = caller is None or any(key.admin and key.name == caller.name for key in settings.auth.keys)
        traffic, keys = self.sampler.figures()
        names = ([key.name for key in settings.auth.keys] or sorted(keys)) if admin else [caller.name]
        return Status(
            version=__version__,
            started_at=self.started_at,
            uptime_s=round(time.monotonic() - self.started, 1),
            config_digest=self._digest(settings),
            config_generation=generation,
            status=_overall(registry),
            models=[self._model(registry, settings, name, engine) for name, engine in registry],
            traffic=traffic,
            keys=[keys.get(name) or KeyUsage(name, 0, 0, 0) for name in dict.fromkeys(names)],
            admin=admin,
            links=self.links,
        )

    def _digest(self, settings: Settings) -> str:
        """sha256 of the settings in force, computed once per generation (a reload replaces the object)."""
        if self._digested is None or self._digested[0] is not settings:
            self._digested = (settings, hashlib.sha256(msgspec.json.encode(settings)).hexdigest()[:12])
        return self._digested[1]

    def _model(self, registry: EngineRegistry, settings: Settings, name: str, engine: Any) -> ModelStatus:
        load, stats, info = registry.load_state(name), engine.stats(), engine.info
        # A model a reload removed may still drain here: it is no longer in the settings.
        model = next((m for m in settings.models if m.name == name), None)
        backend = settings.backends.get(model.backend) if model else None
        capacity = getattr(backend, "max_batch_size", None) or getattr(backend, "max_num_seqs", None)
        running = _number(stats.get("running"))
        return ModelStatus(
            name=name,
            state=str(load.get("state")),
            error=load.get("error") or load.get("reason"),
            load_s=load.get("seconds"),
            backend=info.backend,
            source=info.source,
            context_length=info.context_length,
            size_bytes=info.size_bytes,
            kv_cache_usage=_number(stats.get("kv_cache_usage")),
            running=running,
            waiting=_number(stats.get("waiting")),
            max_batch_size=capacity,
            batch_occupancy=round(running / capacity, 3) if capacity and running is not None else None,
            load=load,
            stats={k: v for k, v in stats.items() if isinstance(v, int | float | str | bool | None)},
        )


def _number(value: Any) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _overall(registry: EngineRegistry) -> str:
    """As /ready words it."""
    if registry.ready:
        return "ready"
    if registry.draining:
        return "shutting down"
    if any(registry.load_state(name)["state"] == "failed" for name, _ in registry):
        return "failed"
    return "loading"
