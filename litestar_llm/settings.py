"""The environment layer over server.toml: `LITESTAR_LLM_CONFIG`, `_HOST`, `_PORT`, `_WORKERS`, `_LOG_LEVEL`.

Precedence: command-line flags, then the environment, then the file. The CLI hands its flags to granian's
workers through these same variables, so every worker resolves exactly the settings that were checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydantic
from pydantic_settings import BaseSettings, SettingsConfigDict

from litestar_llm.config import ConfigError, Settings, expand_env, parse_settings, read_toml

ENV_PREFIX = "LITESTAR_LLM_"


class EnvironmentLayer(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    config: Path = Path("server.toml")
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    log_level: str | None = None

    def server_overrides(self) -> dict:
        fields = ("host", "port", "workers", "log_level")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


def environment_layer() -> EnvironmentLayer:
    try:
        return EnvironmentLayer()
    except pydantic.ValidationError as exc:
        error = exc.errors()[0]
        name = ENV_PREFIX + str(error["loc"][0]).upper()
        raise ConfigError(f"environment {name}", error["msg"].lower()) from None


def load_settings(config: str | Path | None = None, **overrides: object) -> Settings:
    """Read, expand and validate server.toml with the environment and `overrides` (CLI flags) on top."""
    env = environment_layer()
    path = Path(config) if config is not None else env.config
    data = expand_env(read_toml(path))
    server = data.setdefault("server", {})
    if not isinstance(server, dict):
        raise ConfigError("server", "expected a table")
    server.update(env.server_overrides())
    server.update({k: v for k, v in overrides.items() if v is not None})
    base_dir = path.resolve().parent
    settings = parse_settings(data, base_dir)
    # Deployment plugins (`plugins.audit:AuditPlugin`) import relative to server.toml's folder.
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    return settings
