"""`litestar-llm serve | check`: validate server.toml before anything binds, then run the app under granian.

`serve` runs granian in this process and its workers as child processes, and supervises them:

- before anything loads, it checks that the port is free: granian's listeners set SO_REUSEPORT, so a second server
  on a busy port would otherwise share it with the first, and the kernel would split the traffic between them;
- the port answers (/health) while the models load; once every worker has loaded its models and the server
  answers, it prints "Listening at ..." with the URLs served (granian's own line comes before any worker runs);
- a worker whose model cannot load writes its one-line reason into a folder private to this server (RUN_DIR_ENV);
  the CLI stops the server and exits 1 with that line instead of the banner, without granian's "Unexpected exit";
- on SIGINT/SIGTERM it asks the workers (through the same folder) to drain, and after drain_timeout_s or a second
  signal to end the generations still in flight; granian's workers_kill_timeout is the last resort.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import http.client
import json
import logging
import math
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from litestar_llm import __version__
from litestar_llm.config import Settings, masked
from litestar_llm.errors import ConfigError, LitestarLLMError
from litestar_llm.settings import ENV_PREFIX, load_settings

EXIT_CONFIG = 2
EXIT_FAILED = 1
KILL_GRACE_S = 35
"""granian kills a worker still alive this long after drain_timeout_s (one whose event loop is stuck): beyond the
time its engines get to close (registry.CLOSE_TIMEOUT_S)."""
POLL_S = 0.1


class CannotListen(LitestarLLMError):
    """The address cannot be listened on (in use, not on this machine, privileged): exit 2 before anything loads."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litestar-llm", description="An LLM inference server configured by server.toml."
    )
    parser.add_argument("--version", action="version", version=f"litestar-llm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="validate server.toml and serve it under granian")
    check = commands.add_parser("check", help="validate server.toml and print the resolved config (secrets masked)")
    pull = commands.add_parser("pull", help="download the declared Hugging Face models into the local cache")
    pull.add_argument("models", nargs="*", metavar="MODEL", help="model names from server.toml (default: all)")
    for sub in (serve, check, pull):
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
    from litestar_llm.pull import missing_from_cache

    settings, path = _settings(args)
    print(f"# {path}: OK", file=sys.stderr)
    for name, repo in missing_from_cache(path):
        print(f"# model '{name}': {repo} is not in the local Hugging Face cache: litestar-llm pull {name}",
              file=sys.stderr)  # fmt: skip
    print(json.dumps(masked(settings), indent=2))
    return 0


def pull(args: argparse.Namespace) -> int:
    from litestar_llm.pull import pull as pull_models
    from litestar_llm.settings import environment_layer

    path = Path(args.config) if args.config else environment_layer().config
    return pull_models(path.resolve(), args.models)


def serve(args: argparse.Namespace) -> int:
    from granian import Granian
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings

    from litestar_llm.engine.registry import RUN_DIR_ENV

    settings, path = _settings(args)
    server = settings.server
    check_can_listen(server.host, server.port)
    _raise_open_files_limit(server.backpressure + 512)
    # The workers rebuild the settings from the environment; hand them exactly what was validated here.
    os.environ[f"{ENV_PREFIX}CONFIG"] = str(path)
    for name in ("host", "port", "workers", "log_level"):
        os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(getattr(server, name))
    run_dir = Path(tempfile.mkdtemp(prefix="litestar-llm-"))
    os.environ[RUN_DIR_ENV] = str(run_dir)
    granian = Granian(
        "litestar_llm.app:app_from_environment",
        factory=True,
        interface=Interfaces.ASGI,
        address=server.host,
        port=server.port,
        workers=server.workers,
        log_level=server.log_level,
        log_dictconfig=_granian_logging(hide_listening=server.port != 0),
        working_dir=path.parent,
        backpressure=server.backpressure,
        http1_settings=HTTP1Settings(header_read_timeout=max(1, round(server.header_read_timeout_s * 1000))),
        workers_kill_timeout=math.ceil(server.drain_timeout_s) + KILL_GRACE_S,
    )
    supervisor = Supervisor(settings, run_dir, path)
    granian.on_startup(supervisor.start)  # runs after granian set its signal handlers, before workers spawn
    code = 0
    try:
        granian.serve()
    except SystemExit as exc:  # granian exits 1 when a worker died on its own
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
    finally:
        supervisor.stop()
        failure = supervisor.failure()
        shutil.rmtree(run_dir, ignore_errors=True)
    if failure:
        print(f"litestar-llm: {failure}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return code


def check_can_listen(host: str, port: int) -> None:
    """Bind host:port once, without SO_REUSEPORT, and let go. granian's listeners set SO_REUSEPORT (each worker has
    its own), and a second server's would too: the kernel would let it share a busy port and split the
    connections between the two servers. This probe fails while anything listens there. SO_REUSEADDR: connections
    of an earlier run still in TIME_WAIT are no conflict."""
    if port == 0:
        return
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CannotListen(
                    f"cannot listen at {where}: address already in use (is another server running there? stop it, "
                    "or choose another port: --port, LITESTAR_LLM_PORT or [server] port)"
                ) from None
            raise CannotListen(f"cannot listen at {where}: {(exc.strerror or str(exc)).lower()}") from None


def _raise_open_files_limit(needed: int) -> None:
    """Each connection holds a file descriptor: let the soft limit rise to what `backpressure` needs (up to the
    hard limit), so that the connection limit is granian's, not the shell's `ulimit -n`."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed:
        print(
            f"litestar-llm: warning: open files are limited to {want} (ulimit -n), fewer than [server] backpressure "
            "needs: connections beyond that are refused",
            file=sys.stderr,
        )


class HideGranianListening(logging.Filter):
    """granian logs "Listening at: ..." before any worker has started, let alone answered; `serve` prints its own
    once the server answers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Listening at")


def _granian_logging(hide_listening: bool) -> dict:
    """granian's own logging (its `log_dictconfig`): as its default, less the early "Listening at"."""
    handler = {"class": "logging.StreamHandler", "formatter": "generic", "stream": "ext://sys.stdout"}
    if hide_listening:
        handler["filters"] = ["hide_listening"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"hide_listening": {"()": f"{__name__}.HideGranianListening"}},
        "formatters": {"generic": {"()": "logging.Formatter", "fmt": "[%(levelname)s] %(message)s"}},
        "handlers": {"console": handler},
        "loggers": {"_granian": {"handlers": ["console"], "level": "INFO", "propagate": False}},
    }


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def banner(settings: Settings) -> str:
    """What the server serves, and where."""
    server, routes = settings.server, settings.routes
    url = base_url(server.host, server.port)
    lines = [f"litestar-llm: Listening at {url}"]
    if routes.openai or routes.responses:
        lines.append(f"  OpenAI API      {url}/v1" + ("  (Responses API: /v1/responses)" if routes.responses else ""))
    if routes.ollama:
        lines.append(f"  Ollama API      {url}  (/api/chat, /api/generate, ...)")
    if routes.anthropic:
        lines.append(f"  Anthropic API   {url}  (/v1/messages)")
    if routes.ui:
        lines.append(f"  Status page     {url}/ui  (playground; JSON: /ui/status)")
    lines.append(f"  API docs        {url}/docs")
    if settings.telemetry.prometheus:
        lines.append(f"  Metrics         {url}/metrics")
    lines.append(f"  Health          {url}/health  (ready: /ready)")
    lines.append(f"  Models          {', '.join(model.name for model in settings.models)}")
    return "\n".join(lines)


class Supervisor:
    """`serve`'s side of the talk with its granian workers (see `litestar_llm.engine.registry.RUN_DIR_ENV`)."""

    def __init__(self, settings: Settings, run_dir: Path, path: Path | None = None) -> None:
        self.settings, self.run_dir, self.path = settings, run_dir, path
        self.generation = 1
        self._reload_wanted = False
        self._mtime = self._modified()
        self._next_look = 0.0
        self.signals = 0
        self.failing = False
        self._now_sent = False
        self._deadline: float | None = None
        self._banner_done = settings.server.port == 0
        self._previous: dict[int, object] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="litestar-llm supervisor", daemon=True)

    def start(self) -> None:
        """granian's startup hook: chain our signal handlers in front of granian's, and start watching."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        if hasattr(signal, "SIGHUP"):  # ours, not granian's (which would restart the workers and cut every stream)
            signal.signal(signal.SIGHUP, self._on_hangup)
        self._thread.start()

    def _on_hangup(self, _signum: int, _frame: object) -> None:
        self._reload_wanted = True  # validated on the supervisor's thread, not in the handler

    def _modified(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns if self.path is not None else None
        except OSError:
            return None

    def _changed_on_disk(self) -> bool:
        """With [server] watch = true: whether server.toml changed since the last look (once a second)."""
        if not self.settings.server.watch or time.monotonic() < self._next_look:
            return False
        self._next_look = time.monotonic() + 1.0
        mtime = self._modified()
        changed, self._mtime = mtime != self._mtime and mtime is not None, mtime
        return changed

    def _reload(self) -> None:
        """Validate server.toml as the workers will read it; broken: one line, and the running config stays;
        valid: the next generation, which every worker applies."""
        from litestar_llm.settings import load_settings

        self._reload_wanted = False
        self._mtime = self._modified()  # this version is handled: the watcher waits for the next change
        try:
            settings = load_settings()
        except LitestarLLMError as exc:
            self._say(
                f"litestar-llm: {self.path}: not reloaded, config generation {self.generation} stays: config error: "
                f"{exc}"
            )
            return
        self.generation += 1
        self.settings = settings
        self._say(f"litestar-llm: reloading {self.path} as config generation {self.generation}")
        part = self.run_dir / f"reload.{threading.get_ident()}"
        try:
            part.write_text(str(self.generation), encoding="utf-8")
            os.replace(part, self.run_dir / "reload")
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def failure(self) -> str | None:
        """The line a worker left when its model could not load."""
        try:
            return (self.run_dir / "failed").read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signals += 1
        if not self.failing:
            drain = self.settings.server.drain_timeout_s
            if self.signals == 1 and drain > 0:
                self._request("drain")
                self._deadline = time.monotonic() + drain
                self._say(
                    f"litestar-llm: {signal.Signals(signum).name}: shutting down; requests in flight may finish "
                    f"(drain_timeout_s = {drain:g} s; Ctrl-C again to end them now)"
                )
            elif not self._now_sent:
                self._request("now")
                self._say("litestar-llm: shutting down now: ending the requests still in flight")
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # granian's: stop accepting, then stop the workers

    def _request(self, what: str) -> None:
        """Tell every worker: the file is written whole, then renamed into place."""
        if what == "now":
            self._now_sent = True
        part = self.run_dir / f"shutdown.{threading.get_ident()}"
        try:
            part.write_text(what, encoding="utf-8")
            os.replace(part, self.run_dir / "shutdown")
        except OSError:  # the folder is gone: the server is already down
            pass

    @staticmethod
    def _say(text: str) -> None:
        os.write(2, (text + "\n").encode())  # also safe inside a signal handler: no buffer, no lock

    def _run(self) -> None:
        failed = self.run_dir / "failed"
        while not self._stopped.wait(POLL_S):
            if not self.failing and failed.exists():
                # A model could not load: end everything now and stop; `serve` prints the line.
                self.failing = True
                self._request("now")
                os.kill(os.getpid(), signal.SIGTERM)
                continue
            if not self.signals and not self.failing and (self._reload_wanted or self._changed_on_disk()):
                self._reload()
            if self._deadline is not None and not self._now_sent and time.monotonic() >= self._deadline:
                self._request("now")
                self._say("litestar-llm: drain_timeout_s is over: ending the requests still in flight")
            if not self._banner_done and not self.signals and not self.failing and self._loaded() and self._answers():
                self._banner_done = True
                self._say(banner(self.settings))

    def _loaded(self) -> bool:
        """Whether every worker has loaded every model."""
        return len(list(self.run_dir.glob("loaded.*"))) >= self.settings.server.workers

    def _answers(self) -> bool:
        """Whether the server answers HTTP now (any status: /health may sit behind a key)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.settings.server.host, self.settings.server.host)
        connection = http.client.HTTPConnection(host, self.settings.server.port, timeout=2)
        try:
            connection.request("GET", "/health")
            connection.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()


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
        return {"serve": serve, "check": check, "pull": pull, "keys": new_key}[args.command](args)
    except ConfigError as exc:
        print(f"litestar-llm: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except CannotListen as exc:
        print(f"litestar-llm: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LitestarLLMError as exc:
        print(f"litestar-llm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
