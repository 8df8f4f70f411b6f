"""`create_app(settings)`: decide which plugins to install, and nothing else."""

from __future__ import annotations

import importlib
import logging

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.exceptions.responses import create_exception_response
from litestar.logging import LoggingConfig
from litestar.plugins import PluginProtocol

from litestar_llm.config import Settings
from litestar_llm.dialects.anthropic import AnthropicRoutesPlugin
from litestar_llm.dialects.ollama import OllamaRoutesPlugin
from litestar_llm.dialects.openai import OpenAIRoutesPlugin
from litestar_llm.dialects.responses import ResponsesRoutesPlugin
from litestar_llm.engine.registry import EngineRegistryPlugin
from litestar_llm.errors import ConfigError
from litestar_llm.limits import BodyReadTimeout
from litestar_llm.plugins.auth import AuthPlugin
from litestar_llm.plugins.docs import DocsPlugin
from litestar_llm.plugins.health import HealthPlugin
from litestar_llm.plugins.state import StatePlugin
from litestar_llm.plugins.telemetry import TelemetryPlugin
from litestar_llm.plugins.telemetry.access import AccessLogMiddleware, log_access
from litestar_llm.plugins.ui import UIPlugin
from litestar_llm.reload import LiveConfig, route_set_guard


def load_plugin(target: str, index: int) -> PluginProtocol:
    """Import `module:Class` (or `module:factory`) from [server] plugins and instantiate it with no arguments."""
    where = f"server.plugins[{index}]"
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigError(where, f"expected 'module:ClassName', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(where, f"cannot import {module_name!r}: {exc}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ConfigError(where, f"module {module_name!r} has no {attr!r}") from None
    plugin = factory()
    if not isinstance(plugin, PluginProtocol):
        raise ConfigError(where, f"{target} is not a Litestar plugin")
    return plugin


def deployment_plugins(settings: Settings) -> list[PluginProtocol]:
    return [load_plugin(target, i) for i, target in enumerate(settings.server.plugins)]


def no_route(request: Request, exc: HTTPException) -> Response:
    """404 for a path nothing serves, 405 for a method a path does not take: in the shape of the dialect whose
    prefix the path has (Anthropic's under /v1/messages, OpenAI's elsewhere under /v1, Ollama's under /api), else
    Litestar's own."""
    method, path = request.method, request.url.path
    routed = "route_handler" in request.scope
    if not routed:  # raised by routing itself, not by a route: say what was asked
        if isinstance(exc, MethodNotAllowedException):
            allowed = (exc.headers or {}).get("allow", "")
            detail = f"{method} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
            exc = MethodNotAllowedException(detail=detail, headers=exc.headers)
        else:
            exc = NotFoundException(detail=f"Invalid URL ({method} {path})")
    if path.startswith("/v1/messages"):
        from litestar_llm.dialects.anthropic.errors import handle
    elif path == "/v1" or path.startswith("/v1/"):
        from litestar_llm.dialects.openai.errors import handle
    elif path == "/api" or path.startswith("/api/"):
        from litestar_llm.dialects.ollama.errors import handle
    else:
        handle = create_exception_response
    response = handle(request, exc)
    if not routed and request.app.state.get("access_log"):  # no route, so no middleware ran: log it here
        log_access(request.scope, response.status_code, 0.0)
    return response


def create_app(settings: Settings, *, load_in_background: bool = False) -> Litestar:
    """`load_in_background=True` (the server's, see `app_from_environment`) lets start-up finish, and the port
    answer, while the models load; by default start-up waits for them, as in-process callers (a TestClient) expect."""
    state = StatePlugin(settings.state)
    telemetry = TelemetryPlugin(settings.telemetry, status_reader=settings.routes.ui)
    auth = AuthPlugin(settings, state.windows)
    engines = EngineRegistryPlugin(settings, background=load_in_background)
    live = LiveConfig(settings)  # what a reload of server.toml changes in place
    live.subscribe(engines.registry.reconfigure)
    live.subscribe(auth.apply)
    plugins: list[PluginProtocol] = [
        telemetry,  # first: its middleware sees requests that auth refuses
        state,
        auth,
        engines,
        HealthPlugin(),
        DocsPlugin(),
    ]
    if settings.routes.ui:
        plugins.append(UIPlugin(settings, telemetry.status_reader))
    if settings.routes.openai:
        plugins.append(OpenAIRoutesPlugin())
    if settings.routes.ollama:
        plugins.append(OllamaRoutesPlugin())
    if settings.routes.responses:
        plugins.append(ResponsesRoutesPlugin(settings.state.responses_ttl_s))
    if settings.routes.anthropic:
        plugins.append(AnthropicRoutesPlugin())
    plugins.extend(deployment_plugins(settings))
    level = settings.server.log_level.upper()
    # Outermost first: the access log sees everything, including bodies that time out and requests auth refuses.
    middleware = [AccessLogMiddleware()] if settings.server.access_log else []
    middleware.append(BodyReadTimeout(settings.server.body_read_timeout_s))
    return Litestar(
        plugins=plugins,
        middleware=middleware,
        exception_handlers={NotFoundException: no_route, MethodNotAllowedException: no_route},
        state=State({"access_log": settings.server.access_log, "live_config": live}),
        guards=[route_set_guard],
        request_max_body_size=settings.server.max_request_bytes,
        cors_config=CORSConfig(allow_origins=settings.server.cors_origins) if settings.server.cors_origins else None,
        logging_config=LoggingConfig(
            root={"level": level, "handlers": ["queue_listener"]},
            loggers={"litestar_llm": {"level": level, "propagate": True}},
            log_exceptions="debug",
        ),
    )


def app_from_environment() -> Litestar:
    """granian's factory target: every worker resolves the same settings from the variables the CLI set."""
    from litestar_llm.engine.registry import prepare_worker
    from litestar_llm.settings import load_settings

    prepare_worker()
    settings = load_settings()
    logging.getLogger("litestar_llm").setLevel(settings.server.log_level.upper())
    return create_app(settings, load_in_background=True)
