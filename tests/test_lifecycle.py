"""The server as a process: start-up (busy port, models loading, load failures), shutdown (drain, Ctrl-C twice, a
stuck request), slow clients, disconnects, deployment plugins.

Where a test needs a request that runs until something happens, it uses a fake upstream (`FakeUpstream`: an
OpenAI-compatible server that streams forever, or sends one chunk and then nothing) behind a `kind = "openai"`
backend, and where it needs a model that is still loading, the registry's test hook `LITESTAR_LLM_TEST_LOAD_GATE`:
nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, Server, free_port, model_toml

from litestar_llm.engine.registry import TEST_LOAD_GATE_ENV


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class GroupServer(Server):
    """A server in a process group of its own, so that a test can send SIGINT to the whole group, as a terminal's
    Ctrl-C does (granian's workers get it too)."""

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
            process_group=0,
        )

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)


class FakeUpstream(ThreadingHTTPServer):
    """An OpenAI-compatible upstream on 127.0.0.1. Model "slow" streams a chunk every 50 ms until the client leaves;
    model "stuck" sends one chunk and then nothing, ever (until the test ends)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.released = threading.Event()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    body = json.dumps(
                        {
                            "object": "list",
                            "data": [
                                {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                                for m in ("slow", "stuck")
                            ],
                        }
                    )
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body.encode())
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith(("/completions", "/chat/completions")):
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": request["model"],
                         "choices": [{"index": 0, "text": "a", "finish_reason": None}]}  # fmt: skip
                try:
                    while not upstream.released.is_set():
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        if request["model"] == "stuck":
                            upstream.released.wait()
                        else:
                            upstream.released.wait(0.05)
                except OSError:  # the gateway went away
                    pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    yield fake
    fake.close()


def fake_toml(upstream: FakeUpstream, server: str = "") -> str:
    models = "".join(f'[[models]]\nname = "{m}"\nbackend = "fake"\nsource = "{m}"\n' for m in ("slow", "stuck"))
    return f'[server]\n{server}\n[backends.fake]\nkind = "openai"\nurls = ["{upstream.url}"]\n{models}'


@pytest.fixture
def start_group_server(tmp_path: Path) -> Iterator:
    """Start a `GroupServer` from a server.toml text; each one is stopped (its whole group) when the test ends."""
    servers: list[GroupServer] = []

    def start(toml: str, env: dict[str, str] | None = None) -> GroupServer:
        config = tmp_path / f"server{len(servers)}.toml"
        config.write_text(toml)
        server = GroupServer(config, free_port(), env)
        servers.append(server)
        return server.wait_ready()

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
        server._log_file.close()


class StreamReader(threading.Thread):
    """Reads one streamed completion in the background; `events` are its SSE data lines."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.started.set()


# -- start-up -----------------------------------------------------------------------------------------------------


def test_second_serve_on_a_busy_port_exits_2_before_loading(start_server, tiny_model, tmp_path) -> None:
    first = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    config = tmp_path / "server.toml"
    config.write_text(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    second = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "serve", "--config", str(config), "--port", str(first.port)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert second.returncode == 2, second.stderr
    assert f"cannot listen at 127.0.0.1:{first.port}: address already in use" in second.stderr
    assert "loading model" not in second.stdout + second.stderr and "Traceback" not in second.stderr
    assert httpx.get(f"{first.url}/ready").status_code == 200  # the first server was left alone


def test_health_answers_while_models_load_and_the_banner_follows_readiness(start_server, tiny_model, tmp_path):
    gate = tmp_path / "gate"  # the model's load waits for this file
    server = start_server(
        f'[routes]\nollama = true\n[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}',
        env={TEST_LOAD_GATE_ENV: str(gate)},
        wait=False,
    )

    def health() -> int | None:
        assert server.process.poll() is None, server.log.read_text()
        try:
            return httpx.get(f"{server.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    wait_for(lambda: health() == 200, 120, "/health")  # the port answers while the model loads
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    assert ready.json()["models"]["tiny"]["load"] == {"state": "loading"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    chat = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert chat.status_code == 503 and chat.headers["retry-after"] == "5"
    assert chat.json()["error"]["message"] == "model 'tiny' is still loading; retry in a few seconds"
    ollama = httpx.post(f"{server.url}/api/chat", json={**body, "stream": False})
    assert ollama.status_code == 503 and "still loading" in ollama.json()["error"]
    loading = f"loading model 'tiny' (mlx) from {tiny_model} (local folder)"
    wait_for(lambda: loading in server.log.read_text(), 60, "the loading line")  # logs reach the file a bit later
    log = server.log.read_text()
    assert "model 'tiny' ready" not in log and "Listening at" not in log  # granian's early line is gone too

    gate.touch()
    server.wait_ready()
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert httpx.get(f"{server.url}/ready").json()["models"]["tiny"]["load"]["state"] == "ready"
    wait_for(lambda: "Listening at" in server.log.read_text(), 60, "the banner")
    wait_for(lambda: "model 'tiny' ready in" in server.log.read_text(), 60, "the ready line")
    log = server.log.read_text()
    loaded = next(line for line in log.splitlines() if "model 'tiny' ready in" in line)
    assert "of weights" in loaded and "parameters" in loaded and "peak RSS" in loaded
    url = server.url
    banner = log[log.index("litestar-llm: Listening at") :]
    assert banner.startswith(f"litestar-llm: Listening at {url}\n")
    for served in (
        f"{url}/v1 ",
        f"Ollama API      {url} ",
        f"{url}/ui ",
        f"{url}/docs",
        f"{url}/metrics",
        f"{url}/health",
    ):
        assert served in banner, served
    assert "Listening at: http" not in log


def test_model_that_cannot_load_exits_1_with_one_line(start_server, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    server = start_server(
        f'[backends.local]\nkind = "mlx"\n[[models]]\nname = "x"\nbackend = "local"\nsource = "{broken}"\n', wait=False
    )
    assert server.process.wait(120) == 1
    log = server.log.read_text()
    failures = [line for line in log.splitlines() if "could not be loaded" in line]
    assert failures == [f"litestar-llm: model 'x' could not be loaded from {broken}: No safetensors found in {broken}"]
    assert "Traceback" not in log and "Unexpected exit" not in log and "Listening at" not in log
    assert log.rstrip().endswith(failures[0])  # the last word, after granian's shutdown lines


# -- shutdown -----------------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_streams_and_exits_0(start_server, tiny_model) -> None:
    server = start_server(f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}')
    reader = StreamReader(server.url, {"model": "tiny", "prompt": "The", "max_tokens": 400, "temperature": 0,
                                       "stream": True})  # fmt: skip
    reader.start()
    assert reader.started.wait(60)
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    reader.join(30)
    assert reader.events[-1] == "data: [DONE]"
    last = json.loads(reader.events[-2].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"  # the whole answer arrived, not a cut-off stream
    assert "shutting down: waiting for 1 generation in flight" in server.log.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_twice_ends_the_streams_and_exits_at_once(upstream, tmp_path, start_group_server, workers: int) -> None:
    server = start_group_server(fake_toml(upstream, f"drain_timeout_s = 600\nworkers = {workers}"))
    wait_for(lambda: "Listening at" in server.log.read_text(), 60, "the banner")  # every worker has started
    reader = StreamReader(server.url, {"model": "slow", "prompt": "a", "stream": True})  # streams until stopped
    reader.start()
    assert reader.started.wait(60) and reader.error is None
    server.ctrl_c()
    wait_for(lambda: "waiting for 1 generation in flight" in server.log.read_text(), 60, "the drain to begin")
    assert reader.is_alive()  # draining: the stream goes on
    server.ctrl_c()
    second = time.monotonic()
    assert server.process.wait(60) == 0
    took = time.monotonic() - second
    reader.join(30)
    log = server.log.read_text()
    assert took < 30, f"exited {took:.1f} s after the second Ctrl-C:\n{log}"  # not the 600 s drain
    error = json.loads(reader.events[-1].removeprefix("data: "))["error"]
    assert error["message"] == "server is shutting down" and error["type"] == "server_error"
    assert "ending 1 generation in flight" in log and "Traceback" not in log


def test_sigterm_with_a_stuck_stream_exits_after_drain_timeout(upstream, tmp_path, start_group_server) -> None:
    drain = 3
    server = start_group_server(fake_toml(upstream, f"drain_timeout_s = {drain}"))
    reader = StreamReader(server.url, {"model": "stuck", "prompt": "a", "stream": True})  # one chunk, then nothing
    reader.start()
    assert reader.started.wait(60) and reader.error is None
    stuck = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/completions", timeout=120,
                                                       json={"model": "stuck", "prompt": "a"}), daemon=True)  # fmt: skip
    stuck.start()
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["models"]["stuck"]["running"] == 2, 60, "2 in flight")
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)  # to the server process alone, as systemd or docker stop do
    assert server.process.wait(drain + 60) == 0
    took = time.monotonic() - signalled
    reader.join(30)
    log = server.log.read_text()
    assert took >= drain and "drain_timeout_s is over" in log, log
    assert took < drain + 30, f"exited {took:.1f} s after SIGTERM"
    assert json.loads(reader.events[-1].removeprefix("data: "))["error"]["message"] == "server is shutting down"
    assert "Traceback" not in log and "Killing worker" not in log


# -- clients ------------------------------------------------------------------------------------------------------


def test_a_thousand_trickling_bodies_do_not_lock_out_other_clients(upstream, tmp_path, start_group_server) -> None:
    count = 1100  # more than granian's default backpressure (1024 connections per worker)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 200:
        if hard != resource.RLIM_INFINITY and hard < count + 200:
            pytest.skip(f"open files are limited to {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 200, hard))
    server = start_group_server(fake_toml(upstream))
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")  # fmt: skip
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(head + b'{"model": ')  # and never the rest
            sockets.append(s)
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        answer = httpx.post(f"{server.url}/v1/models", timeout=30)
        assert answer.status_code == 405  # routed and answered, in OpenAI's shape
        listed = httpx.get(f"{server.url}/v1/models", timeout=30)
        assert listed.status_code == 200 and {m["id"] for m in listed.json()["data"]} == {"slow", "stuck"}
    finally:
        for s in sockets:
            s.close()


def test_a_body_that_does_not_arrive_in_time_answers_408(upstream, tmp_path, start_group_server) -> None:
    server = start_group_server(fake_toml(upstream, "body_read_timeout_s = 1"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")  # fmt: skip
        answer = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    error = json.loads(body)["error"]
    assert error["message"] == "the request body did not arrive within 1 s (server.body_read_timeout_s)"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_client_that_leaves_is_logged_and_audited_as_499(upstream, tmp_path, start_group_server) -> None:
    audit = tmp_path / "audit.jsonl"
    toml = fake_toml(upstream, 'plugins = ["plugins.audit:AuditPlugin"]')
    server = start_group_server(toml, env={"PYTHONPATH": str(ROOT), "AUDIT_LOG_FILE": str(audit)})
    # streamed: read the first chunk, then hang up
    with httpx.stream("POST", f"{server.url}/v1/completions", json={"model": "slow", "prompt": "a", "stream": True},
                      timeout=60) as response:  # fmt: skip
        next(response.iter_lines())
    # not streamed: hang up while the answer is being generated (it never would be: "slow" streams forever)
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        body = b'{"model": "slow", "prompt": "a"}'
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        wait_for(lambda: httpx.get(f"{server.url}/ready").json()["models"]["slow"]["running"] == 1, 60, "the request")
    wait_for(lambda: audit.exists() and len(audit.read_text().splitlines()) == 2, 60, "two audit lines")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/v1/completions", 499)] * 2
    wait_for(lambda: server.log.read_text().count("POST /v1/completions 499") == 2, 60, "two access lines")
    log = server.log.read_text()
    assert "Traceback" not in log and " 500 " not in log and "unhandled error" not in log
    wait_for(
        lambda: httpx.get(f"{server.url}/ready").json()["models"]["slow"]["running"] == 0, 60, "the upstream hang-up"
    )


# -- deployment plugins -------------------------------------------------------------------------------------------


def test_audit_plugin_from_plugins_folder_loads_and_logs(start_server, tiny_model, tmp_path) -> None:
    audit = tmp_path / "audit.jsonl"
    server = start_server(
        f"""
        [server]
        plugins = ["plugins.audit:AuditPlugin"]
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """,
        env={"PYTHONPATH": str(ROOT), "AUDIT_LOG_FILE": str(audit)},
    )
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": "nope", "prompt": "a"})
    assert (ok.status_code, missing.status_code) == (200, 404)
    # A line is written when the request is over, which may be just after the client has its answer.
    wait_for(lambda: len(audit.read_text().splitlines()) == 2, 60, "two audit lines")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [("/v1/completions", 200), ("/v1/completions", 404)]
    assert all(line["duration_ms"] > 0 and "prompt" not in line for line in lines)
    access = ("POST /v1/completions 200", "POST /v1/completions 404")  # the access log has them too
    wait_for(lambda: all(line in server.log.read_text() for line in access), 60, "the access log")


def test_health_and_ready(server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["models"]["tiny"]["ready"] is True
    assert ready.json()["models"]["tiny"]["load"]["state"] == "ready"
