"""`litestar-llm serve | check`: validate server.toml before anything binds, then run the app under granian."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
from pathlib import Path

from litestar_llm import __version__
from litestar_llm.config import Settings, masked
from litestar_llm.errors import ConfigError, LitestarLLMError
from litestar_llm.settings import ENV_PREFIX, load_settings

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litestar-llm", description="An LLM inference server configured by server.toml."
    )
    parser.add_argument("--version", action="version", version=f"litestar-llm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="validate server.toml and serve it under granian")
    check = commands.add_parser("check", help="validate server.toml and print the resolved config (secrets masked)")
    for sub in (serve, check):
        sub.add_argument("--config", "-c", help=f"path to server.toml (default: ${ENV_PREFIX}CONFIG or ./server.toml)")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.add_argument("--workers", type=int, help="override [server] workers")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override [server] log_level")

    keys = commands.add_parser("keys", help="API keys for [[auth.keys]]").add_subparsers(dest="keys", required=True)
    new_key = keys.add_parser("new", help="print a fresh random key and the key_sha256 entry for server.toml")
    new_key.add_argument("name", help="the key's name in logs and metrics")
    return parser


def _settings(args: argparse.Namespace) -> tuple[Settings, Path]:
    from litestar_llm.app import deployment_plugins
    from litestar_llm.settings import environment_layer

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "workers", "log_level")}
    path = Path(args.config) if args.config else environment_layer().config
    settings = load_settings(path, **overrides)
    deployment_plugins(settings)  # an unimportable plugin is a config error too, caught before binding
    return settings, path.resolve()


def check(args: argparse.Namespace) -> int:
    settings, path = _settings(args)
    print(f"# {path}: OK", file=sys.stderr)
    print(json.dumps(masked(settings), indent=2))
    return 0


def serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces

    settings, path = _settings(args)
    server = settings.server
    # The workers rebuild the settings from the environment; hand them exactly what was validated here.
    os.environ[f"{ENV_PREFIX}CONFIG"] = str(path)
    for name in ("host", "port", "workers", "log_level"):
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(getattr(server, name))
    Granian(
        "litestar_llm.app:app_from_environment",
        factory=True,
        interface=Interfaces.ASGI,
        address=server.host,
        port=server.port,
        workers=server.workers,
        log_level=server.log_level,
        working_dir=path.parent,
    ).serve()
    return 0


def new_key(args: argparse.Namespace) -> int:
    """The key goes to the client; only its sha256 goes into server.toml, so the server never holds the key."""
    key = "sk-llm-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    print(f"# API key for {args.name!r}: give it to the client; it is not stored anywhere\n{key}\n")
    print(f'# for server.toml:\n[[auth.keys]]\nname = "{args.name}"\nkey_sha256 = "{digest}"')
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"serve": serve, "check": check, "keys": new_key}[args.command](args)
    except ConfigError as exc:
        print(f"litestar-llm: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LitestarLLMError as exc:
        print(f"litestar-llm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
