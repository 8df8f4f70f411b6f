"""The Anthropic dialect: POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API), and
Anthropic's model list for /v1/models requests that carry `anthropic-version`."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from litestar_llm.dialects.anthropic.routes import STATE_KEY, anthropic_router


class AnthropicRoutesPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        router = anthropic_router()
        router.opt["route_set"] = "anthropic"  # a reload may switch it off (litestar_llm.reload)
        app_config.route_handlers.append(router)
        app_config.state[STATE_KEY] = True
        return app_config


__all__ = ["AnthropicRoutesPlugin"]
