"""server.toml reloaded in place (SIGHUP, and `[server] watch = true`) on a real server, each edit made while a
2000-token stream runs: a model added, the streamed model removed (the stream completes, then 404), a key's rate
limit and scope changed, a route set switched off, a broken edit (the old config stays, one error line). No
request in flight fails in any of them. One server for the module; each test edits the file the last one left.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ALICE = {"Authorization": "Bearer alice-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
LONG = {"prompt": "The json module", "max_tokens": 2000, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}  # fmt: skip
"""The tiny model's greedy continuation of this prompt runs the full 2000 tokens."""


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def toml(model: Path, *, models: str = "", keys: str = "", ollama: bool = True, server: str = "") -> str:
    def block(name: str, extra: str = "") -> str:
        return f'[[models]]\nname = "{name}"\nbackend = "local"\nsource = "{model}"\n{extra}\n'

    return f"""
[server]
{server}
[routes]
openai = true
ollama = {str(ollama).lower()}
[backends.local]
kind = "mlx"
{block("tiny")}
{models if models else block("streamed")}
[rate_limits.loose]
requests_per_minute = 10000
[rate_limits.tight]
requests_per_minute = 2
[[auth.keys]]
name = "admin"
key = "admin-key"
[[auth.keys]]
name = "alice"
key = "alice-key"
{keys or 'rate_limit = "loose"'}
"""


class Reloading:
    def __init__(self, server, model: Path) -> None:
        self.server, self.model = server, model
        self.generation = 1
        self.digest = httpx.get(f"{server.url}/ui/status", headers=ADMIN).json()["config_digest"]

    def edit(self, text: str, signal_it: bool = True) -> None:
        self.server.config.write_text(text)
        if signal_it:
            self.server.process.send_signal(signal.SIGHUP)

    def applied(self, text: str, **kwargs) -> None:
        """Write, reload, and wait until the worker applied the next generation."""
        self.edit(text, **kwargs)
        self.generation += 1
        line = f"config generation {self.generation} applied"
        wait_for(lambda: line in self.server.log.read_text(), 60, line)
        assert httpx.get(f"{self.server.url}/ready").json()["config_generation"] == self.generation
        status = httpx.get(f"{self.server.url}/ui/status", headers=ADMIN).json()  # the status page says it too
        assert status["config_generation"] == self.generation and status["config_digest"] != self.digest
        self.digest = status["config_digest"]


@pytest.fixture(scope="module")
def reloading(start_server, tiny_model: Path) -> Iterator[Reloading]:
    server = start_server(toml(tiny_model))
    yield Reloading(server, tiny_model)
    server.stop()


class LongStream:
    """A 2000-token completion stream, opened until its first token arrived; `finish()` reads the rest."""

    def __init__(self, server, model: str = "streamed", headers: dict | None = None, path: str = "/v1/completions",
                 body: dict | None = None) -> None:  # fmt: skip
        self.http = httpx.Client(base_url=server.url, timeout=120, headers=headers or ADMIN)
        self.response = self.http.send(
            self.http.build_request("POST", path, json={"model": model, **(body or LONG)}), stream=True
        )
        assert self.response.status_code == 200, self.response.read()
        self.lines = self.response.iter_lines()
        self.seen: list[str] = []
        while '"text":"' not in (line := next(self.lines)) and '"response":"' not in line:
            self.seen.append(line)

    def finish(self) -> list[str]:
        self.seen += list(self.lines)
        self.http.close()
        assert not [line for line in self.seen if '"error":' in line], "the stream in flight failed"
        return self.seen

    def completion_tokens(self) -> int:
        [usage] = [json.loads(line[6:])["usage"] for line in self.seen if '"usage":{' in line]
        return usage["completion_tokens"]


def complete(server, model: str, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/completions",
        json={"model": model, "prompt": "Hi", "max_tokens": 2, **body},
        headers=headers or ADMIN,
        timeout=60,
    )


def test_add_a_model_and_change_defaults_while_a_stream_runs(reloading: Reloading) -> None:
    server, model = reloading.server, reloading.model
    assert complete(server, "added").status_code == 404
    stream = LongStream(server)
    added = f'[[models]]\nname = "added"\nbackend = "local"\nsource = "{model}"\nload = "on_demand"\n'
    streamed = f'[[models]]\nname = "streamed"\nbackend = "local"\nsource = "{model}"\n'
    defaults = '[[models]]\nname = "tiny"\nbackend = "local"\nsource = "{model}"\n[models.defaults]\nmax_tokens = 3\n'
    text = toml(model, models=streamed + added).replace(
        f'[[models]]\nname = "tiny"\nbackend = "local"\nsource = "{model}"\n', defaults.format(model=model)
    )
    reloading.applied(text)
    answer = complete(server, "added")
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    no_max = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi"}, headers=ADMIN)
    assert no_max.json()["usage"]["completion_tokens"] == 3  # the new default, for new requests
    assert "models added: added" in server.log.read_text()
    stream.finish()
    assert stream.completion_tokens() == 2000


def test_remove_the_model_being_streamed(reloading: Reloading) -> None:
    server, model = reloading.server, reloading.model
    stream = LongStream(server)
    added = f'[[models]]\nname = "added"\nbackend = "local"\nsource = "{model}"\nload = "on_demand"\n'
    reloading.applied(toml(model, models=added))
    gone = complete(server, "streamed")
    assert gone.status_code == 404 and "streamed" in gone.json()["error"]["message"]  # at once, mid-stream
    wait_for(
        lambda: "model 'streamed' draining (removed from server.toml; 1 request in flight)" in server.log.read_text(),
        what="the drain line",
    )
    stream.finish()
    assert stream.completion_tokens() == 2000
    wait_for(lambda: "model 'streamed' unloaded (removed from server.toml" in server.log.read_text(), what="unload")
    assert "streamed" not in httpx.get(f"{server.url}/ready").json()["models"]
    assert complete(server, "streamed").status_code == 404


def test_change_a_keys_rate_limit_and_scope(reloading: Reloading) -> None:
    server, model = reloading.server, reloading.model
    added = f'[[models]]\nname = "added"\nbackend = "local"\nsource = "{model}"\nload = "on_demand"\n'
    assert complete(server, "added", ALICE).status_code == 200
    stream = LongStream(server, "tiny", ALICE)
    reloading.applied(toml(model, models=added, keys='models = ["tiny"]\nrate_limit = "tight"'))
    assert complete(server, "added", ALICE).status_code in (404, 429)  # out of scope now (or already limited)
    statuses = [complete(server, "tiny", ALICE).status_code for _ in range(3)]
    assert 429 in statuses  # 2 requests a minute now
    assert complete(server, "added", ADMIN).status_code == 200  # other keys keep theirs
    stream.finish()
    assert stream.completion_tokens() == 2000


def test_switch_a_route_set_off_and_watch_the_file(reloading: Reloading) -> None:
    server, model = reloading.server, reloading.model
    added = f'[[models]]\nname = "added"\nbackend = "local"\nsource = "{model}"\nload = "on_demand"\n'
    assert httpx.get(f"{server.url}/api/tags", headers=ADMIN).status_code == 200
    body = {
        "prompt": "The json module",
        "raw": True,
        "stream": True,
        "options": {"temperature": 0, "num_predict": 2000},
    }
    stream = LongStream(server, "tiny", ADMIN, "/api/generate", body)
    reloading.applied(toml(model, models=added, ollama=False, server="watch = true"))
    tags = httpx.get(f"{server.url}/api/tags", headers=ADMIN)
    assert tags.status_code == 404 and "Invalid URL (GET /api/tags)" in tags.json()["error"]
    assert complete(server, "tiny").status_code == 200  # the OpenAI routes stay
    lines = stream.finish()
    assert json.loads(lines[-1])["done"] and json.loads(lines[-1])["eval_count"] == 2000
    # watch = true: the next edit applies without a signal
    reloading.applied(toml(model, models=added, server="watch = true"), signal_it=False)
    assert httpx.get(f"{server.url}/api/tags", headers=ADMIN).status_code == 200


def test_a_broken_edit_keeps_the_running_config(reloading: Reloading) -> None:
    server, model = reloading.server, reloading.model
    stream = LongStream(server, "tiny")
    broken = toml(model).replace('backend = "local"', 'backend = "gpu"', 1)
    reloading.edit(broken, signal_it=True)  # watch is on too: the signal and the change may both report it
    line = f"not reloaded, config generation {reloading.generation} stays: config error: models[0].backend: no backend"
    wait_for(lambda: line in server.log.read_text(), 30, "the error line")
    time.sleep(1.5)  # past the watcher's next look, so a second report of the same edit would be in the log now
    assert server.log.read_text().count("not reloaded") <= 2
    assert str(server.config) in next(x for x in server.log.read_text().splitlines() if "not reloaded" in x)
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["config_generation"] == reloading.generation and "added" in ready["models"]
    assert complete(server, "added").status_code == 200
    stream.finish()
    assert stream.completion_tokens() == 2000


def test_every_worker_applies_a_reload(start_server, tiny_model: Path) -> None:
    block = f'[[models]]\nname = "{{name}}"\nbackend = "local"\nsource = "{tiny_model}"\n{{extra}}\n'
    base = '[server]\nworkers = 2\n[backends.local]\nkind = "mlx"\n' + block.format(name="tiny", extra="")
    server = start_server(base)
    try:
        server.config.write_text(base + block.format(name="added", extra='load = "on_demand"'))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: server.log.read_text().count("config generation 2 applied") == 2, 60, "both workers")
        for _ in range(8):  # new connections, spread over the workers by the kernel: each one knows the model
            answer = httpx.post(
                f"{server.url}/v1/completions", json={"model": "added", "prompt": "Hi", "max_tokens": 1}
            )
            assert answer.status_code == 200
    finally:
        server.stop()
