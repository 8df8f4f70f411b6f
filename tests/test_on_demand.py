"""Models on demand, on a real server with real tiny MLX models: the first request loads a model (its Ollama
load_duration is the load's), concurrent first requests share one load, a budget of loaded models swaps them least
recently used first (never a pinned or busy one), keep_alive unloads an idle model and its memory goes back (RSS
measured through /proc), a model that cannot load says why and recovers once fixed, a hub model missing from the
cache answers 503.

Two servers, shared by the tests of this module: `swapping` (max_loaded_models = 2 with one pinned model, so the
two on-demand models take turns in one place) and `expiring` (keep_alive, a bigger model, failures).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import pytest
from conftest import ROOT  # noqa: F401 - puts examples/ on the path

from examples.make_tiny_model import make_tiny_model
from litestar_llm.engine.registry import TEST_LOAD_GATE_ENV


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def states(server) -> dict[str, str]:
    models = httpx.get(f"{server.url}/ready", timeout=5).json()["models"]
    return {name: model["load"]["state"] for name, model in models.items()}


def load_state(server, name: str) -> dict:
    return httpx.get(f"{server.url}/ready", timeout=5).json()["models"][name]["load"]


def loads(server, name: str) -> int:
    return server.log.read_text().count(f"loading model '{name}'")


def rss(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_rss(server) -> int:
    """VmRSS (bytes) of the server's granian worker (the child process that holds the models: the largest)."""
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return max(rss(child) for child in children)


def greedy(client: ollama.Client, model: str, prompt: str = "Once upon", **kwargs) -> ollama.GenerateResponse:
    return client.generate(model=model, prompt=prompt, options={"temperature": 0, "num_predict": 12}, **kwargs)


def block(name: str, source: Path, extra: str = "") -> str:
    return f'[[models]]\nname = "{name}"\nbackend = "local"\nsource = "{source}"\n{extra}\n'


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "second", seed=1)


@pytest.fixture(scope="module")
def load_gate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gate = tmp_path_factory.mktemp("gate") / "open"
    gate.touch()
    return gate


@pytest.fixture(scope="module")
def swapping(start_server, tiny_model: Path, second_model: Path, load_gate: Path):
    server = start_server(
        f"""
        [server]
        max_loaded_models = 2
        [routes]
        ollama = true
        [backends.local]
        kind = "mlx"
        {block("pinned", tiny_model, "pin = true")}
        {block("a", tiny_model, 'load = "on_demand"')}
        {block("b", second_model, 'load = "on_demand"')}
        """,
        env={TEST_LOAD_GATE_ENV: str(load_gate)},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def swap_client(swapping) -> ollama.Client:
    return ollama.Client(host=swapping.url, timeout=120)


def test_first_request_loads_an_on_demand_model(swapping, swap_client: ollama.Client) -> None:
    assert states(swapping) == {"pinned": "ready", "a": "unloaded", "b": "unloaded"}
    assert httpx.get(f"{swapping.url}/ready").status_code == 200  # on-demand models do not hold readiness back
    first = greedy(swap_client, "a")
    state = load_state(swapping, "a")
    assert state["state"] == "ready" and loads(swapping, "a") == 1
    # load_duration is the time this request waited for the load: at least the load itself, within the request
    assert state["seconds"] <= first.load_duration / 1e9 <= first.total_duration / 1e9
    again = greedy(swap_client, "a")
    assert again.load_duration == 0 and again.response == first.response and loads(swapping, "a") == 1
    assert [m.model for m in swap_client.ps().models] == ["pinned:latest", "a:latest"]


def test_a_budget_of_one_swaps_the_models_and_every_answer_is_right(swapping, swap_client: ollama.Client) -> None:
    answers = {}
    for name in ("a", "b"):  # each model's own answer, with the other one unloaded
        answers[name] = greedy(swap_client, name).response
        assert states(swapping)[name] == "ready"
    assert answers["a"] != answers["b"]  # different weights: a mix-up would show
    before = loads(swapping, "a") + loads(swapping, "b")
    for name in ("a", "b", "a", "b"):
        answer = greedy(swap_client, name)
        assert answer.response == answers[name] and answer.load_duration > 0
        now = states(swapping)
        assert now["pinned"] == "ready" and now[name] == "ready"  # the pinned model is never the one evicted
        assert now["b" if name == "a" else "a"] in ("draining", "unloaded")
    assert loads(swapping, "a") + loads(swapping, "b") == before + 4
    assert loads(swapping, "pinned") == 1
    wait_for(lambda: "model 'a' draining (to make room for 'b')" in swapping.log.read_text(), what="the line")


def test_concurrent_first_requests_share_one_load(swapping, swap_client: ollama.Client, load_gate: Path) -> None:
    greedy(swap_client, "a")  # so that b is not loaded
    wait_for(lambda: states(swapping)["b"] == "unloaded", what="b unloaded")
    before = loads(swapping, "b")
    load_gate.unlink()  # the next load waits at the gate until all 8 requests wait for it
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(greedy, swap_client, "b", f"Story {i % 2}") for i in range(8)]
        state = wait_for(lambda: (s := load_state(swapping, "b")).get("requests") == 8 and s, what="8 waiting")
        assert state["state"] == "loading"
        load_gate.touch()
        answers = [future.result() for future in futures]
    assert loads(swapping, "b") == before + 1
    assert {a.response for a in answers[0::2]} == {answers[0].response}
    assert {a.response for a in answers[1::2]} == {answers[1].response}
    assert all(a.load_duration > 0 for a in answers)  # every one of them waited for that one load


def test_keep_alive_0_unloads_after_the_request(swapping, swap_client: ollama.Client) -> None:
    greedy(swap_client, "a", keep_alive=0)
    wait_for(lambda: states(swapping)["a"] == "unloaded", what="a unloaded")
    unloaded = "model 'a' unloaded (keep_alive 0: unloaded after use"
    wait_for(lambda: unloaded in swapping.log.read_text(), what="the unload line")
    loaded = swap_client.generate(model="a", prompt="")  # Ollama's load request loads it for real
    assert loaded.done_reason == "load" and loaded.load_duration > 0 and states(swapping)["a"] == "ready"
    unloaded = swap_client.generate(model="a", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and states(swapping)["a"] == "unloaded"
    with pytest.raises(ollama.ResponseError) as pinned:
        swap_client.generate(model="pinned", prompt="", keep_alive=0)
    assert pinned.value.status_code == 400 and "pinned" in pinned.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        swap_client.generate(model="a", prompt="x", keep_alive="soon")
    assert bad.value.status_code == 400 and "keep_alive" in bad.value.error


# -- keep_alive, memory, failures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 130 MB of float32 weights: enough for the RSS drop to stand far above the noise."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "big", hidden=768, layers=6, seed=2)


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("models") / "broken"
    folder.mkdir()
    for path in tiny_model.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "config.json").write_text("{ not json")
    return folder


@pytest.fixture(scope="module")
def expiring(start_server, big_model: Path, broken_model: Path, tiny_model: Path):
    weights = (big_model / "model.safetensors").stat().st_size + (tiny_model / "model.safetensors").stat().st_size
    server = start_server(
        f"""
        [server]
        memory_budget = {weights + 1000}
        [routes]
        ollama = true
        [backends.local]
        kind = "mlx"
        keep_alive = "1h"
        {block("big", big_model, 'load = "on_demand"' + chr(10) + 'keep_alive = "2s"')}
        {block("broken", broken_model, 'load = "on_demand"')}
        {block("tiny", tiny_model)}
        {block("hub", "example-org/not-downloaded", 'load = "on_demand"')}
        """
    )
    yield server
    server.stop()


def test_an_idle_model_unloads_after_keep_alive_and_its_memory_goes(expiring, big_model: Path) -> None:
    client = ollama.Client(host=expiring.url, timeout=120)
    weights = (big_model / "model.safetensors").stat()
    before = worker_rss(expiring)
    greedy(client, "big")
    loaded = worker_rss(expiring)
    [entry] = [m for m in client.ps().models if m.model == "big:latest"]
    expires = entry.expires_at.timestamp()
    assert time.time() < expires <= time.time() + 2.5  # keep_alive 2s, counted from the end of the request
    assert [m.model for m in client.ps().models if m.model == "tiny:latest"]  # the backend's 1h: still there
    wait_for(lambda: states(expiring)["big"] == "unloaded", 30, "the idle unload")
    after = worker_rss(expiring)
    print(f"\nworker RSS: before load {before / 2**20:.0f} MiB, loaded {loaded / 2**20:.0f} MiB, "
          f"after unload {after / 2**20:.0f} MiB; weights {weights.st_size / 2**20:.0f} MiB")  # fmt: skip
    assert loaded - before > weights.st_size * 0.8
    assert loaded - after > weights.st_size * 0.8  # the weights' memory was handed back...
    assert after - before < weights.st_size * 0.3  # ...nearly all of what the load took
    unloaded = "model 'big' unloaded (idle for keep_alive 2s"
    wait_for(lambda: unloaded in expiring.log.read_text(), what="the unload line")  # logs reach the file a bit later
    assert "big:latest" not in [m.model for m in client.ps().models]
    metrics = httpx.get(f"{expiring.url}/metrics").text
    for model, state in (("big", "unloaded"), ("tiny", "ready")):
        line = (
            rf'litestar_llm_model_state{{gen_ai_request_model="{model}",litestar_llm_model_state="{state}"[^}}]*}} 1.0'
        )
        assert re.search(line, metrics), line


def test_a_model_that_fails_to_load_says_why_and_recovers_when_fixed(expiring, broken_model, tiny_model) -> None:
    client = ollama.Client(host=expiring.url, timeout=120)
    with pytest.raises(ollama.ResponseError) as failed:
        greedy(client, "broken")
    assert failed.value.status_code == 503 and "could not be loaded" in failed.value.error
    state = load_state(expiring, "broken")
    assert state["state"] == "failed" and "broken" in state["error"] and state["retry_in_s"] >= 1
    assert httpx.get(f"{expiring.url}/ready").status_code == 200  # one on-demand model's failure is its own
    retry = httpx.post(f"{expiring.url}/api/generate", json={"model": "broken", "prompt": "x"})
    assert retry.status_code == 503 and "Retry-After" in retry.headers  # no new attempt before the back-off
    assert loads(expiring, "broken") == 1
    (broken_model / "config.json").write_bytes((tiny_model / "config.json").read_bytes())

    def answered():
        response = httpx.post(
            f"{expiring.url}/api/generate",
            json={"model": "broken", "prompt": "Once upon", "stream": False, "options": {"num_predict": 4}},
            timeout=60,
        )
        return response.status_code == 200 and response.json()

    answer = wait_for(answered, 60, "the fixed model to answer")
    assert answer["eval_count"] == 4 and states(expiring)["broken"] == "ready"
    assert loads(expiring, "broken") == 2  # retried once after the back-off, not in a loop


def test_a_missing_hub_model_answers_503_and_the_rest_serve(expiring) -> None:
    response = httpx.post(
        f"{expiring.url}/api/chat", json={"model": "hub", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 503
    error = response.json()["error"]
    assert "example-org/not-downloaded is not in the local cache" in error and "litestar-llm pull hub" in error
    assert load_state(expiring, "hub")["state"] == "failed"
    assert httpx.post(f"{expiring.url}/api/generate", json={"model": "tiny", "prompt": "x", "stream": False,
                                                            "options": {"num_predict": 2}}).status_code == 200  # fmt: skip
    assert json.loads(httpx.get(f"{expiring.url}/ready").text)["status"] == "ready"
