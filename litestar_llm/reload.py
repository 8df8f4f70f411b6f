"""server.toml reloaded in place: on SIGHUP, and with `[server] watch = true` when the file changes.

`litestar-llm serve` validates the file first (cli.py): a broken one keeps the running config and logs one error
line naming the TOML path; a valid one gets the next config generation, and every granian worker re-reads it and
applies the difference (`LiveConfig.reload`): models added, removed (they drain, then unload) and changed (replaced
once their streams end) in the registry; keys, scopes and rate limits in the auth middleware; route sets switched
off by a guard that reads the live config; model defaults for new requests. Streams in flight keep what they had.
What needs a new process (the port, workers, plugins, telemetry, [state]) is named in a warning and waits for the
next restart.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotFoundException
from litestar.handlers.base import BaseRouteHandler

from litestar_llm.config import ServerConfig, Settings
from litestar_llm.errors import ConfigError

logger = logging.getLogger(__name__)

Applier = Callable[[Settings, Settings], Awaitable[None] | None]

LIVE_SERVER_FIELDS = frozenset({"max_loaded_models", "memory_budget", "load_wait_s", "watch", "drain_timeout_s"})
"""[server] fields a reload applies; the others need a restart."""


class LiveConfig:
    """The settings in force now, their generation (1 at start-up, +1 per reload), and what applies a change."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.generation = 1
        self.mounted_routes = {name for name in settings.routes.__struct_fields__ if getattr(settings.routes, name)}
        """Route sets mounted at start-up: a reload can switch these off and on again; others need a restart."""
        self._appliers: list[Applier] = []
        self._lock = asyncio.Lock()

    def subscribe(self, applier: Applier) -> None:
        self._appliers.append(applier)

    async def reload(self, generation: int | None = None, load: Callable[[], Settings] | None = None) -> bool:
        """Re-read server.toml (as `load_settings()` resolves it) and apply it; False, with one error line, when it
        does not validate (the running config stays)."""
        from litestar_llm.settings import load_settings

        async with self._lock:
            try:
                settings = await asyncio.to_thread(load or load_settings)
            except ConfigError as exc:
                logger.error("server.toml not reloaded, config generation %d stays: %s", self.generation, exc)
                return False
            await self._apply(settings, generation)
            return True

    async def apply(self, settings: Settings, generation: int | None = None) -> None:
        async with self._lock:
            await self._apply(settings, generation)

    async def _apply(self, settings: Settings, generation: int | None) -> None:
        old, self.settings = self.settings, settings
        self.generation = generation if generation is not None else self.generation + 1
        for applier in self._appliers:
            result = applier(old, settings)
            if inspect.isawaitable(result):
                await result
        logger.info("config generation %d applied: %s", self.generation, describe_changes(old, settings))
        if restart := self.needs_restart(old, settings):
            logger.warning("config generation %d: %s take effect at the next restart", self.generation,
                           ", ".join(restart))  # fmt: skip

    def needs_restart(self, old: Settings, new: Settings) -> list[str]:
        out = [
            f"server.{name}"
            for name in ServerConfig.__struct_fields__
            if name not in LIVE_SERVER_FIELDS and getattr(old.server, name) != getattr(new.server, name)
        ]
        out += [
            f"routes.{name} = true"
            for name in new.routes.__struct_fields__
            if getattr(new.routes, name) and name not in self.mounted_routes
        ]
        for table in ("state", "telemetry"):
            if getattr(old, table) != getattr(new, table):
                out.append(f"[{table}]")
        if old.auth.enabled != new.auth.enabled and not old.auth.keys:
            out.append("auth.enabled")
        return out


def describe_changes(old: Settings, new: Settings) -> str:
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    parts = []
    if added := [n for n in after if n not in before]:
        parts.append("models added: " + ", ".join(added))
    if removed := [n for n in before if n not in after]:
        parts.append("models removed: " + ", ".join(removed))
    if changed := [n for n in after if n in before and after[n] != before[n]]:
        parts.append("models changed: " + ", ".join(changed))
    for table in ("auth", "rate_limits", "routes", "backends"):
        if _plain(getattr(old, table)) != _plain(getattr(new, table)):
            parts.append(f"[{table}] changed")
    return "; ".join(parts) or "no changes"


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def route_set_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """A route set switched off by a reload answers as if it were not mounted."""
    name = handler.opt.get("route_set")
    live: LiveConfig | None = connection.app.state.get("live_config")
    if name and live is not None and not getattr(live.settings.routes, name, True):
        raise NotFoundException(detail=f"Invalid URL ({connection.scope.get('method', 'GET')} {connection.url.path})")
