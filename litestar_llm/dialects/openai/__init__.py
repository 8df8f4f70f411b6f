"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from litestar_llm.dialects.openai.routes import openai_router


class OpenAIRoutesPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        router = openai_router()
        router.opt["route_set"] = "openai"  # a reload may switch it off (litestar_llm.reload)
        app_config.route_handlers.append(router)
        return app_config


__all__ = ["OpenAIRoutesPlugin"]
