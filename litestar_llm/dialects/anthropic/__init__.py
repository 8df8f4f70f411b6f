"""The Anthropic dialect: POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API), and
Anthropic's model list for /v1/models requests that carry `anthropic-version`."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from litestar_llm.dialects.anthropic.routes import STATE_KEY, anthropic_router


class AnthropicRoutesPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.append(anthropic_router())
        app_config.state[STATE_KEY] = True
        return app_config


__all__ = ["AnthropicRoutesPlugin"]
