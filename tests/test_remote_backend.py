"""`kind = "openai"`: a gateway server in front of real upstreams on 127.0.0.1: two instances of this server (the
tiny MLX model, behind an API key) and mlx_lm.server as a foreign one, with the official clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import Server, free_port, model_toml

FLEET_KEY = "sk-fleet-test-key"
ENV = {"FLEET_KEY": FLEET_KEY}
BEARER = {"Authorization": f"Bearer {FLEET_KEY}"}
HELLO = [{"role": "user", "content": "Tell me about JSON."}]


def upstream_toml(tiny_model: Path) -> str:
    return f"""
    [routes]
    ollama = true
    [backends.local]
    kind = "mlx"
    [[auth.keys]]
    name = "gateway"
    key = "${{FLEET_KEY}}"
    {model_toml(tiny_model)}
    """


def fleet_toml(name: str, urls: list[str], source: str, api_key: bool = True) -> str:
    listed = ", ".join(f'"{url}/v1"' for url in urls)
    key = 'api_key = "${FLEET_KEY}"' if api_key else ""
    return f"""
    [backends.{name}]
    kind = "openai"
    urls = [{listed}]
    {key}
    timeout_s = 60
    cooldown_s = 1
    [[models]]
    name = "{name}"
    backend = "{name}"
    source = "{source}"
    """


@pytest.fixture(scope="module")
def upstreams(start_server, tiny_model: Path) -> Iterator[tuple[Server, Server]]:
    servers = (
        start_server(upstream_toml(tiny_model), ENV, wait=False),
        start_server(upstream_toml(tiny_model), ENV, wait=False),
    )
    yield tuple(s.wait_ready() for s in servers)
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def mlx_lm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """mlx_lm.server on the same model: a foreign OpenAI-compatible upstream (it answers to "default_model")."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlx_lm") / "mlx_lm.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm.server", "--model", str(tiny_model), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture(scope="module")
def gateway(start_server, upstreams: tuple[Server, Server], mlx_lm_server: str) -> Iterator[Server]:
    """`tiny` on both upstreams, `ghost` (a model they do not have) and `mlx` on mlx_lm.server."""
    a, b = upstreams
    server = start_server(
        "[routes]\nollama = true\n"
        + fleet_toml("tiny", [a.url, b.url], "tiny")
        + fleet_toml("ghost", [a.url, b.url], "no-such-model")
        + fleet_toml("mlx", [mlx_lm_server], "default_model", api_key=False),
        ENV,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def direct(upstreams: tuple[Server, Server], mlx_lm_server: str) -> dict[str, tuple[openai.OpenAI, str]]:
    """The reference for each gateway model: a client straight to its upstream, and the model id it knows."""
    a, _ = upstreams
    return {
        "tiny": (openai.OpenAI(base_url=f"{a.url}/v1", api_key=FLEET_KEY, max_retries=0, timeout=60), "tiny"),
        "mlx": (
            openai.OpenAI(base_url=f"{mlx_lm_server}/v1", api_key="unused", max_retries=0, timeout=60),
            "default_model",
        ),
    }


def stream_text(chunks) -> tuple[str, list[str], object]:
    chunks = list(chunks)
    text = "".join(
        (c.choices[0].delta.content if hasattr(c.choices[0], "delta") else c.choices[0].text) or ""
        for c in chunks
        if c.choices
    )
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, chunks[-1].usage


def replica_stats(server: Server, model: str) -> list[dict]:
    return httpx.get(f"{server.url}/ready", timeout=5).json()["models"][model]["replicas"]


def posts_answered(server: Server, status: int) -> int:
    """POST requests the server answered with `status`, by its own count (its Prometheus /metrics)."""
    total = 0.0
    metrics = httpx.get(f"{server.url}/metrics", headers=BEARER, timeout=5)
    assert metrics.status_code == 200, metrics.text
    for line in metrics.text.splitlines():
        if (
            line.startswith("http_server_duration_milliseconds_count{")
            and 'http_method="POST"' in line
            and f'http_status_code="{status}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def wait_until(condition, what: str, timeout: float = 120) -> None:
    """Wait for something the servers do by themselves; the deadline only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_check_resolves_and_masks(tmp_path: Path) -> None:
    """The source is the upstream's model id (no local folder needed); the api_key never shows."""
    config = tmp_path / "server.toml"
    fleet = '[backends.fleet]\nkind = "openai"\nurls = ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1/"]\n'
    fleet += 'api_key = "${FLEET_KEY}"\n[[models]]\nname = "llama-70b"\nbackend = "fleet"\n'
    fleet += 'source = "meta-llama/Llama-3.3-70B-Instruct"\n'
    config.write_text(fleet + fleet_toml("plain", ["http://u:pw@10.0.0.7:8000"], "default_model"))
    env = {**os.environ, **ENV}
    result = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    fleet = resolved["backends"]["fleet"]
    assert fleet["kind"] == "openai" and fleet["api_key"] == "****" and FLEET_KEY not in result.stdout
    assert fleet["urls"] == ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]
    assert resolved["backends"]["plain"]["urls"] == ["http://u:****@10.0.0.7:8000/v1"]
    assert [m["source"] for m in resolved["models"]] == ["meta-llama/Llama-3.3-70B-Instruct", "default_model"]

    config.write_text(fleet_toml("fleet", ["10.0.0.5:8000"], "x"))
    result = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 2 and "backends.fleet" in result.stderr and "http://" in result.stderr


@pytest.mark.parametrize("model", ["tiny", "mlx"])
def test_chat_equals_upstream(client: openai.OpenAI, direct, model: str) -> None:
    upstream, upstream_model = direct[model]
    expected = upstream.chat.completions.create(model=upstream_model, messages=HELLO, temperature=0, max_tokens=16)
    got = client.chat.completions.create(model=model, messages=HELLO, temperature=0, max_tokens=16)
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert got.choices[0].finish_reason == expected.choices[0].finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )
    assert got.model == model

    text, finishes, usage = stream_text(
        client.chat.completions.create(
            model=model,
            messages=HELLO,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == expected.choices[0].message.content
    assert finishes == [expected.choices[0].finish_reason]
    assert (
        usage.completion_tokens == expected.usage.completion_tokens
        and usage.prompt_tokens == expected.usage.prompt_tokens
    )


@pytest.mark.parametrize("model", ["tiny", "mlx"])
def test_completions_equal_upstream(client: openai.OpenAI, direct, model: str) -> None:
    upstream, upstream_model = direct[model]
    expected = upstream.completions.create(model=upstream_model, prompt="The json module", temperature=0, max_tokens=12)
    got = client.completions.create(model=model, prompt="The json module", temperature=0, max_tokens=12)
    assert got.choices[0].text == expected.choices[0].text
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (
        expected.usage.prompt_tokens,
        expected.usage.completion_tokens,
    )
    text, finishes, usage = stream_text(
        client.completions.create(
            model=model,
            prompt="The json module",
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == expected.choices[0].text and finishes == [expected.choices[0].finish_reason]
    assert usage.completion_tokens == expected.usage.completion_tokens


def test_logprobs_pass_through(client: openai.OpenAI, direct) -> None:
    upstream, _ = direct["tiny"]
    expected = upstream.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    got = client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    for mine, theirs in zip(got.choices[0].logprobs.content, expected.choices[0].logprobs.content, strict=True):
        assert mine.token == theirs.token and mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.token for t in mine.top_logprobs] == [t.token for t in theirs.top_logprobs]
    streamed = [
        c
        for c in client.chat.completions.create(
            model="tiny", messages=HELLO, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, stream=True
        )
        if c.choices and c.choices[0].logprobs
    ]
    assert [t.token for c in streamed for t in c.choices[0].logprobs.content] == [
        t.token for t in expected.choices[0].logprobs.content
    ]

    expected = upstream.completions.create(model="tiny", prompt="The", temperature=0, max_tokens=4, logprobs=2)
    got = client.completions.create(model="tiny", prompt="The", temperature=0, max_tokens=4, logprobs=2)
    assert got.choices[0].logprobs.tokens == expected.choices[0].logprobs.tokens
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(
        expected.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    assert [sorted(t) for t in got.choices[0].logprobs.top_logprobs] == [
        sorted(t) for t in expected.choices[0].logprobs.top_logprobs
    ]


def test_ollama_dialect_over_remote(gateway: Server, upstreams) -> None:
    options = {"temperature": 0, "num_predict": 12}
    expected = ollama.Client(host=upstreams[0].url, headers=BEARER, timeout=60).chat(
        model="tiny", messages=HELLO, options=options
    )
    through = ollama.Client(host=gateway.url, timeout=60)
    got = through.chat(model="tiny", messages=HELLO, options=options)
    assert got.message.content == expected.message.content
    assert (got.prompt_eval_count, got.eval_count) == (expected.prompt_eval_count, expected.eval_count)
    assert got.done_reason == expected.done_reason and got.eval_duration > 0
    parts = list(through.chat(model="tiny", messages=HELLO, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected.message.content
    assert parts[-1].done and parts[-1].eval_count == expected.eval_count


def test_responses_api_over_remote(client: openai.OpenAI, direct) -> None:
    upstream, _ = direct["tiny"]
    expected = upstream.responses.create(
        model="tiny", input="Tell me about JSON.", temperature=0, max_output_tokens=12, store=False
    )
    got = client.responses.create(model="tiny", input="Tell me about JSON.", temperature=0, max_output_tokens=12)
    assert got.output_text == expected.output_text and got.status == expected.status
    assert (got.usage.input_tokens, got.usage.output_tokens) == (
        expected.usage.input_tokens,
        expected.usage.output_tokens,
    )
    assert client.responses.retrieve(got.id).output_text == got.output_text  # stored by the gateway
    events = list(
        client.responses.create(
            model="tiny", input="Tell me about JSON.", temperature=0, max_output_tokens=12, stream=True
        )
    )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected.output_text
    assert events[-1].response.usage.output_tokens == expected.usage.output_tokens


def test_upstream_4xx_reaches_the_client_in_its_dialect(client: openai.OpenAI, gateway: Server) -> None:
    # the upstream does not know the gateway's source for "ghost": its 404, in OpenAI's shape
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model="ghost", messages=HELLO, max_tokens=4, stream=stream)
        assert raised.value.status_code == 404
        assert raised.value.body["message"] == "The model 'no-such-model' does not exist"
    raw = httpx.post(f"{gateway.url}/v1/completions", json={"model": "ghost", "prompt": "x"}, timeout=30)
    assert raw.status_code == 404 and raw.json()["error"]["message"] == "The model 'no-such-model' does not exist"
    # ... and in Ollama's
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=gateway.url, timeout=30).chat(model="ghost", messages=HELLO)
    assert refused.value.status_code == 404 and refused.value.error == "The model 'no-such-model' does not exist"
    raw = httpx.post(f"{gateway.url}/api/generate", json={"model": "ghost", "prompt": "x"}, timeout=30)
    assert raw.status_code == 404 and raw.json() == {"error": "The model 'no-such-model' does not exist"}
    # a foreign upstream's own refusal (mlx_lm.server allows at most 11 top logprobs) keeps its status and text
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="mlx", messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=15)
    assert bad.value.status_code == 400 and bad.value.body["message"] == "top_logprobs must be at most 11"


def test_least_in_flight_balances_equal_replicas(client: openai.OpenAI, gateway: Server, upstreams) -> None:
    def one(max_tokens: int) -> int:
        return client.chat.completions.create(
            model="tiny", messages=HELLO, temperature=0, max_tokens=max_tokens
        ).usage.prompt_tokens

    # One at a time both replicas are always idle: ties go round-robin, an exact split, counted by the upstreams
    # themselves (their prompt_tokens), and the gateway's own bookkeeping agrees.
    before = [s.stats()["prompt_tokens"] for s in upstreams]
    served_before = [r["served"] for r in replica_stats(gateway, "tiny")]
    [prompt_length] = set(one(8) for _ in range(40))
    counts = [(s.stats()["prompt_tokens"] - b) // prompt_length for s, b in zip(upstreams, before, strict=True)]
    served = [r["served"] - b for r, b in zip(replica_stats(gateway, "tiny"), served_before, strict=True)]
    assert counts == served == [20, 20]

    # Least in flight, not round robin: with long streams held open (the greedy continuation of this prompt runs
    # the full 2000 tokens), empty one replica and the next two requests both go to it. Only the in-flight counts
    # decide here, not how fast either replica is.
    def in_flight() -> list[int]:
        return [r["in_flight"] for r in replica_stats(gateway, "tiny")]

    body = {"model": "tiny", "prompt": "The json module", "max_tokens": 2000, "temperature": 0, "stream": True}
    streams: list[tuple[int, httpx.Response, Iterator[str]]] = []
    with httpx.Client(base_url=gateway.url, timeout=60) as http:

        def open_stream() -> int:
            before = in_flight()
            response = http.send(http.build_request("POST", "/v1/completions", json=body), stream=True)
            lines = response.iter_lines()
            while '"text":"' not in next(lines):  # its first token has arrived: it is running upstream
                pass
            [replica] = [i for i, (x, y) in enumerate(zip(in_flight(), before, strict=True)) if x == y + 1]
            streams.append((replica, response, lines))  # the line iterator too: dropping it closes the stream
            return replica

        try:
            for _ in range(4):
                open_stream()
            assert in_flight() == [2, 2]
            emptied = streams[0][0]
            for _, response, _ in [s for s in streams if s[0] == emptied]:
                response.close()
            wait_until(lambda: in_flight()[emptied] == 0, "the gateway kept closed streams in flight")
            assert [open_stream(), open_stream()] == [emptied, emptied]
            assert in_flight() == [2, 2]
        finally:
            for _, response, _ in streams:
                response.close()
    wait_until(lambda: in_flight() == [0, 0], "streams still in flight after their clients left")


def test_client_disconnect_stops_the_upstream_generation(gateway: Server, upstreams) -> None:
    body = {"model": "tiny", "prompt": "The", "max_tokens": 1500, "temperature": 0, "stream": True}
    before = sum(s.stats()["generated_tokens"] for s in upstreams)
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert sum(s.stats()["running"] for s in upstreams) == 1
    deadline = time.monotonic() + 10
    while (
        sum(s.stats()["running"] for s in upstreams)
        or httpx.get(f"{gateway.url}/ready").json()["models"]["tiny"]["running"]
    ):
        assert time.monotonic() < deadline, "the upstream kept generating after the client left"
        time.sleep(0.05)
    assert sum(s.stats()["generated_tokens"] for s in upstreams) - before < 1000


def test_poison_request_is_not_retried_on_another_replica(client: openai.OpenAI, gateway: Server, upstreams) -> None:
    """A request the upstream refuses (a token id beyond its vocabulary: 400) reaches the client with the upstream's
    status and message, tried on one replica only, and counts nothing against it."""
    before = [posts_answered(s, 400) for s in upstreams]
    failures = [r["failures"] for r in replica_stats(gateway, "tiny")]
    for stream in (False, True) * 3:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny", prompt=[10**6], max_tokens=4, stream=stream)
        assert bad.value.status_code == 400 and bad.value.body["message"] == "token ids must be in [0, 2048)"
    refused = [posts_answered(s, 400) - b for s, b in zip(upstreams, before, strict=True)]
    assert refused == [3, 3]  # six requests, one upstream request each (round robin)
    stats = replica_stats(gateway, "tiny")
    assert all(r["up"] for r in stats) and [r["failures"] for r in stats] == failures


def test_health_comes_from_ready(start_server, tiny_model: Path, gateway: Server, upstreams) -> None:
    """An upstream of this server answers /ready per model: one whose `void` model is down (its only replica does
    not exist) still lists `void` in /models, but is out for `void` and in for `tiny`. Servers without /ready
    (mlx_lm.server) are read through /models."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    mixed = start_server(
        upstream_toml(tiny_model)
        + f'''
        [backends.void]
        kind = "openai"
        urls = ["{nowhere}/v1"]
        [[models]]
        name = "void"
        backend = "void"
        source = "void"
        ''',
        ENV,
        wait=False,
    )

    def mixed_loaded() -> bool:
        try:
            return httpx.get(f"{mixed.url}/ready", timeout=2).json()["models"]["tiny"]["ready"]
        except (httpx.HTTPError, KeyError, ValueError):
            assert mixed.process.poll() is None, mixed.log.read_text()
            return False

    wait_until(mixed_loaded, "the upstream never loaded tiny")
    assert httpx.get(f"{mixed.url}/ready").status_code == 503  # void is not ready
    listed = httpx.get(f"{mixed.url}/v1/models", headers=BEARER).json()["data"]
    assert {m["id"] for m in listed} >= {"tiny", "void"}  # /models alone would call it healthy for both
    front = start_server(
        fleet_toml("tiny", [mixed.url], "tiny") + fleet_toml("void", [mixed.url], "void"), ENV, wait=False
    )
    try:
        # the start-up check's verdict, logged once the gateway has taken the replica out
        wait_until(lambda: "its /ready says 'void' is not ready" in front.log.read_text(), front.log.read_text())
        wait_until(lambda: replica_stats(front, "tiny") and replica_stats(front, "void"), "the gateway did not start")
        tiny, void = replica_stats(front, "tiny")[0], replica_stats(front, "void")[0]
        assert (tiny["up"], tiny["health"]) == (True, "ready")
        assert (void["up"], void["health"]) == (False, "ready")
        ok = httpx.post(f"{front.url}/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 4})
        assert ok.status_code == 200
        refused = httpx.post(f"{front.url}/v1/completions", json={"model": "void", "prompt": "The", "max_tokens": 4})
        assert refused.status_code == 503  # no replica up: the gateway does not even try
    finally:
        front.stop()
        mixed.stop()
    [mlx] = replica_stats(gateway, "mlx")
    assert (mlx["up"], mlx["health"]) == (True, "models")
    assert all(r["health"] == "ready" for r in replica_stats(gateway, "tiny"))


def test_token_limits_settle_on_the_upstreams_usage(start_server, upstreams, tokenizer) -> None:
    """tokens_per_minute over the remote backend: a ~1,000-token prompt with a few dozen completion tokens is
    charged exactly what the upstream reports, streamed or not."""
    a, b = upstreams
    budget = 20_000
    metered = {"Authorization": "Bearer metered-key-7c41"}
    front = start_server(
        f"""
        [auth]
        [[auth.keys]]
        name = "metered"
        key = "metered-key-7c41"
        rate_limit = "tpm"
        [rate_limits.tpm]
        tokens_per_minute = {budget}
        """
        + fleet_toml("tiny", [a.url, b.url], "tiny"),
        ENV,
    )
    try:
        words = "The json module encodes and decodes JSON documents. "
        messages = [{"role": "user", "content": words * 62}]
        prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        assert 900 <= prompt <= 1100
        body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 50}

        def remaining() -> int:
            # a metered request (listings are not) that generates nothing: a stored-response lookup, a 404
            response = httpx.get(f"{front.url}/v1/responses/resp_none", headers=metered, timeout=30)
            return int(response.headers["x-ratelimit-remaining-tokens"])

        answer = httpx.post(f"{front.url}/v1/chat/completions", json=body, headers=metered, timeout=60)
        assert answer.status_code == 200, answer.text
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] == prompt and 0 < usage["completion_tokens"] <= 50
        charged = budget - remaining()
        assert charged == usage["total_tokens"]

        streamed_usage = None
        with httpx.stream(
            "POST",
            f"{front.url}/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
            headers=metered,
            timeout=60,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    streamed_usage = json.loads(line[6:])["usage"]
        assert streamed_usage is not None and streamed_usage["prompt_tokens"] == prompt
        # a stream's count settles as its generation ends, which may come just after its last byte reached us
        expected = charged + streamed_usage["total_tokens"]
        wait_until(lambda: budget - remaining() == expected, f"charged {budget - remaining()}, not {expected}")
        assert budget - remaining() == expected
    finally:
        front.stop()


# -- a replica dies mid-run -----------------------------------------------------------------------------------


def kill_server(server: Server) -> None:
    """SIGKILL the server and its granian workers: no graceful shutdown, connections just break."""
    pid = server.process.pid
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


@pytest.fixture(scope="module")
def doomed(start_server, tiny_model: Path) -> Iterator[Server]:
    server = start_server(upstream_toml(tiny_model), ENV)
    yield server
    server.stop()


def test_killed_replica_loses_no_request_that_had_not_started_streaming(
    start_server, upstreams, doomed: Server
) -> None:
    survivor = upstreams[0]
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: down from the start, a warning only
    gateway = start_server(
        fleet_toml("tiny", [survivor.url, doomed.url, nowhere], "tiny") + fleet_toml("lost", [nowhere], "tiny"),
        ENV,
        wait=False,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            models = httpx.get(f"{gateway.url}/ready", timeout=2).json()["models"]
            if models["tiny"]["ready"]:
                break
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        assert gateway.process.poll() is None and time.monotonic() < deadline, gateway.log.read_text()
        time.sleep(0.2)
    assert [r["up"] for r in replica_stats(gateway, "tiny")] == [True, True, False]
    assert "is out at start-up" in gateway.log.read_text()
    # no replica reachable: 503 in the dialect's shape, and /ready says the model is not ready
    lost = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "lost", "messages": HELLO}, timeout=30)
    assert lost.status_code == 503 and lost.json()["error"]["type"] == "server_error"
    assert httpx.get(f"{gateway.url}/ready").status_code == 503

    plain: list[tuple[float, bool, str]] = []  # (started, ok, error)
    streamed: list[tuple[float, bool, bool]] = []  # (started, ok, content before the end)
    stop = threading.Event()
    body = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 24}

    def plain_load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                r = http.post(f"{gateway.url}/v1/chat/completions", json=body)
                plain.append((started, r.status_code == 200, "" if r.status_code == 200 else r.text))

    def stream_load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started, content, ok = time.monotonic(), False, False
                with http.stream("POST", f"{gateway.url}/v1/chat/completions", json={**body, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            ok = r.status_code == 200
                        elif line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                            content = True
                streamed.append((started, ok, content))

    workers = [threading.Thread(target=plain_load) for _ in range(6)] + [
        threading.Thread(target=stream_load) for _ in range(3)
    ]
    for w in workers:
        w.start()
    try:
        wait_until(  # the doomed replica has been serving and is busy now
            lambda: (stats := replica_stats(gateway, "tiny")[1])["served"] >= 8 and stats["in_flight"],
            "the doomed replica never got busy",
        )
        kill_server(doomed)
        killed_at = time.monotonic()
        # Load goes on until enough requests that began after the kill have finished, however long that takes on
        # this machine: the test is about which requests fail, not how many fit in a time.
        wait_until(
            lambda: (
                sum(1 for r in list(plain) if r[0] > killed_at) >= 10
                and any(started > killed_at and ok for started, ok, _ in list(streamed))
            ),
            "requests started after the kill did not finish",
            timeout=300,
        )
    finally:
        stop.set()
        for w in workers:
            w.join(60)

    after = [r for r in plain if r[0] > killed_at]
    assert len(after) >= 10 and all(ok for _, ok, _ in after), [e for _, ok, e in after if not ok][:3]
    # the only failures are requests in flight at the kill; a stream only if its tokens had begun to arrive
    assert all(started < killed_at for started, ok, _ in plain if not ok)
    assert all(started < killed_at and content for started, ok, content in streamed if not ok)
    assert any(started > killed_at and ok for started, ok, _ in streamed)
    doomed_stats = replica_stats(gateway, "tiny")[1]
    assert not doomed_stats["up"] and doomed_stats["failures"] >= 1 and doomed_stats["in_flight"] == 0

    # back on its port, the probe brings it back and it takes requests again
    revived = Server(doomed.config, doomed.port, ENV)
    try:
        revived.wait_ready()
        wait_until(lambda: replica_stats(gateway, "tiny")[1]["up"], "the health check did not bring it back")
        served = replica_stats(gateway, "tiny")[1]["served"]
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda _: httpx.post(
                        f"{gateway.url}/v1/chat/completions", json=body, timeout=60
                    ).raise_for_status(),
                    range(8),
                )
            )
        assert replica_stats(gateway, "tiny")[1]["served"] > served
    finally:
        revived.stop()
        gateway.stop()


BAD_SAMPLING = [
    ({"top_k": 10**9}, "top_k"),
    ({"seed": -1, "temperature": 1}, "seed"),
    ({"min_p": 5}, "min_p"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"logprobs": True, "top_logprobs": 100000}, "top_logprobs"),
]


def test_bad_sampling_through_the_gateway_spares_the_fleet(gateway: Server, upstreams) -> None:
    """The values that once killed an MLX model, sent through a two-replica gateway while a stream runs: each is a
    400 naming the field (from the gateway's own checks, or from the one upstream that got it, never retried), the
    stream finishes whole, every replica stays up and serves."""
    before = [posts_answered(s, 400) for s in upstreams]
    result: dict = {}

    def stream() -> None:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 48, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=120) as response:
            result["lines"] = [line for line in response.iter_lines() if line.startswith("data: ")]

    runner = threading.Thread(target=stream)
    runner.start()
    for fields, param in BAD_SAMPLING:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, **fields}
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param or param in response.json()["error"]["message"]
    runner.join(120)
    assert result["lines"][-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(result["lines"])
    reached = sum(posts_answered(s, 400) - b for s, b in zip(upstreams, before, strict=True))
    assert reached <= 1  # top_k is the upstream's to judge (the gateway cannot know its vocabulary): once, no retry
    assert all(r["up"] for r in replica_stats(gateway, "tiny"))
    for upstream in upstreams:
        assert httpx.get(f"{upstream.url}/ready", timeout=5).status_code == 200
    ok = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "max_tokens": 4})
    assert ok.status_code == 200
