"""[state]: where shared state lives. Litestar's stores (`app.stores.get(name)`) and the rate-limit windows both
come from here: in process memory, or in Redis so that granian workers and server instances share them."""

from __future__ import annotations

import logging

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin
from litestar.stores.registry import StoreRegistry

from litestar_llm.config import StateConfig
from litestar_llm.errors import MissingDependencyError
from litestar_llm.limits import MemoryWindows, RedisWindows, Windows

logger = logging.getLogger(__name__)

NAMESPACE = "litestar-llm"
TIMEOUT_S = 2.0
"""A Redis that does not answer within this fails the request (503 or fail_open) instead of hanging it."""


class StatePlugin(InitPlugin):
    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self._redis = None
        self.windows: Windows = MemoryWindows()
        if config.url.startswith("memory://"):
            return
        try:
            from redis.asyncio import Redis
        except ImportError:
            raise MissingDependencyError("redis", "redis") from None
        # One client (and connection pool) per worker; it reconnects by itself when Redis comes back.
        self._redis = Redis.from_url(
            config.url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, health_check_interval=15
        )
        self.windows = RedisWindows(self._redis, prefix=f"{NAMESPACE}:limits")

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if self._redis is not None:
            from litestar.stores.redis import RedisStore

            root = RedisStore(self._redis, namespace=NAMESPACE)
            app_config.stores = StoreRegistry(default_factory=root.with_namespace)
            app_config.on_startup.append(self._check)
            app_config.on_shutdown.append(self._close)
        return app_config

    async def _check(self, _app: Litestar) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:  # not fatal: requests fail closed (or open) until Redis answers
            logger.warning("state store %s is unreachable at start-up: %s", _safe(self.config.url), exc)

    async def _close(self, _app: Litestar) -> None:
        await self._redis.aclose()


def _safe(url: str) -> str:
    """The URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"
