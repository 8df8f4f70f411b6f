"""The OpenAI Responses API: /v1/responses, with stored responses and `previous_response_id` conversations."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from litestar_llm.dialects.responses.routes import responses_router

THIRTY_DAYS_S = 30 * 24 * 3600


class ResponsesRoutesPlugin(InitPlugin):
    def __init__(self, ttl_s: int = THIRTY_DAYS_S) -> None:
        self.ttl_s = ttl_s
        """How long a stored response stays retrievable ([state] responses_ttl_s)."""

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        router = responses_router(self.ttl_s)
        router.opt["route_set"] = "responses"  # a reload may switch it off (litestar_llm.reload)
        app_config.route_handlers.append(router)
        return app_config


__all__ = ["ResponsesRoutesPlugin"]
