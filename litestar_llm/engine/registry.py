"""Model name → engine. Loads every declared model at start-up, closes them at shutdown."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide
from litestar.plugins import InitPlugin

from litestar_llm.caller import current_caller
from litestar_llm.config import ModelConfig, Settings
from litestar_llm.engine.base import Engine
from litestar_llm.errors import ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

EXIT_MODEL_LOAD = 3

# Backend kind → engine class, imported only when a model uses it (mlx-lm, vllm, aiohttp are optional installs).
ENGINE_CLASSES = {
    "mlx": "litestar_llm.engine.mlx:MLXEngine",
    "vllm": "litestar_llm.engine.vllm:VLLMEngine",
    "openai": "litestar_llm.engine.remote:RemoteEngine",
}


def engine_class(kind: str) -> type[Engine]:
    module, _, name = ENGINE_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), name)


class EngineRegistry:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, Engine] = {}
        self._by_name: dict[str, tuple[Engine, ModelConfig]] = {}

    def build(self) -> None:
        for model in self._settings.models:
            backend = self._settings.backends[model.backend]
            engine = engine_class(backend.kind)(model, backend, model.backend)
            self._engines[model.name] = engine
            for name in (model.name, *model.aliases):
                self._by_name[name] = (engine, model)

    async def start(self) -> None:
        if not self._engines:
            self.build()
        # Models load concurrently: each engine loads on its own thread.
        await asyncio.gather(*(engine.start() for engine in self._engines.values()))
        logger.info("models ready: %s", ", ".join(self._engines))

    async def close(self) -> None:
        await asyncio.gather(*(engine.close() for engine in self._engines.values()), return_exceptions=True)

    def resolve(self, name: str) -> tuple[Engine, ModelConfig]:
        """The engine serving `name` (a model name or alias) and its config. Unknown names, and models outside the
        calling API key's scope, raise 404: a scoped key cannot tell them apart."""
        found = self._by_name.get(name)
        caller = current_caller.get()
        if found is None or (caller is not None and not caller.may_use(found[1].name)):
            raise ModelNotFoundError(name)
        return found

    def __iter__(self) -> Iterator[tuple[str, Engine]]:
        """The models the calling API key may use, by name."""
        caller = current_caller.get()
        if caller is None or caller.models is None:
            return iter(self._engines.items())
        return iter([(name, engine) for name, engine in self._engines.items() if name in caller.models])

    @property
    def ready(self) -> bool:
        return bool(self._engines) and all(engine.ready for engine in self._engines.values())


class EngineRegistryPlugin(InitPlugin):
    """Builds the registry, loads the models in the app's lifespan and provides `registry` to handlers."""

    def __init__(self, settings: Settings) -> None:
        self.registry = EngineRegistry(settings)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        self.registry.build()
        app_config.dependencies["registry"] = Provide(self._provide, use_cache=True, sync_to_thread=False)
        app_config.lifespan.append(self._lifespan)
        app_config.state["registry"] = self.registry
        return app_config

    def _provide(self) -> EngineRegistry:
        return self.registry

    @asynccontextmanager
    async def _lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        try:
            try:
                await self.registry.start()
            except ModelLoadError as exc:
                # One readable line instead of a lifespan traceback; granian sees the worker exit and stops.
                print(f"litestar-llm: {exc}", file=sys.stderr, flush=True)
                await self.registry.close()
                os._exit(EXIT_MODEL_LOAD)
            yield
        finally:
            await self.registry.close()
