"""`GET /health`: the process answers (200 from the moment it serves, while models still load). `GET /ready`: every
model is loaded and its engine is running, and no shutdown is under way (503 until then, and while draining)."""

from __future__ import annotations

from litestar import Request, Response, get
from litestar.config.app import AppConfig
from litestar.di import NamedDependency
from litestar.plugins import InitPlugin

from litestar_llm.engine.registry import EngineRegistry


@get("/health", opt={"exclude_from_auth": True}, include_in_schema=False)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", opt={"exclude_from_auth": True}, include_in_schema=False)
async def ready(request: Request, registry: NamedDependency[EngineRegistry]) -> Response[dict]:
    models = {
        name: {"ready": engine.ready, "load": registry.load_state(name), **engine.stats()} for name, engine in registry
    }
    ok = registry.ready
    if ok:
        status = "ready"
    elif registry.draining:
        status = "shutting down"
    elif any(model["load"]["state"] == "failed" for model in models.values()):
        status = "failed"
    else:
        status = "loading"
    body = {"status": status, "models": models}
    if (live := request.app.state.get("live_config")) is not None:
        body["config_generation"] = live.generation
    return Response(body, status_code=200 if ok else 503)


class HealthPlugin(InitPlugin):
    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        app_config.route_handlers.extend([health, ready])
        return app_config
