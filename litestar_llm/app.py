"""`create_app(settings)`: decide which plugins to install, and nothing else."""

from __future__ import annotations

import importlib
import logging

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig
from litestar.plugins import PluginProtocol

from litestar_llm import __version__
from litestar_llm.config import Settings
from litestar_llm.dialects.anthropic import AnthropicRoutesPlugin
from litestar_llm.dialects.ollama import OllamaRoutesPlugin
from litestar_llm.dialects.openai import OpenAIRoutesPlugin
from litestar_llm.dialects.responses import ResponsesRoutesPlugin
from litestar_llm.engine.registry import EngineRegistryPlugin
from litestar_llm.errors import ConfigError
from litestar_llm.plugins.auth import AuthPlugin
from litestar_llm.plugins.health import HealthPlugin
from litestar_llm.plugins.state import StatePlugin
from litestar_llm.plugins.telemetry import TelemetryPlugin


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


def create_app(settings: Settings) -> Litestar:
    state = StatePlugin(settings.state)
    plugins: list[PluginProtocol] = [
        TelemetryPlugin(settings.telemetry),  # first: its middleware sees requests that auth refuses
        state,
        AuthPlugin(settings, state.windows),
        EngineRegistryPlugin(settings),
        HealthPlugin(),
    ]
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
    return Litestar(
        plugins=plugins,
        request_max_body_size=settings.server.max_request_bytes,
        cors_config=CORSConfig(allow_origins=settings.server.cors_origins) if settings.server.cors_origins else None,
        openapi_config=OpenAPIConfig(title="litestar-llm", version=__version__, path="/docs"),
        logging_config=LoggingConfig(
            root={"level": level, "handlers": ["queue_listener"]},
            loggers={"litestar_llm": {"level": level, "propagate": True}},
            log_exceptions="debug",
        ),
    )


def app_from_environment() -> Litestar:
    """granian's factory target: every worker resolves the same settings from the variables the CLI set."""
    from litestar_llm.settings import load_settings

    settings = load_settings()
    logging.getLogger("litestar_llm").setLevel(settings.server.log_level.upper())
    return create_app(settings)
