"""The Ollama dialect: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version, /api/embed."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from litestar_llm.dialects.ollama.routes import ollama_router


class OllamaRoutesPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        router = ollama_router()
        router.opt["route_set"] = "ollama"  # a reload may switch it off (litestar_llm.reload)
        app_config.route_handlers.append(router)
        return app_config


__all__ = ["OllamaRoutesPlugin"]
