"""API keys, scopes and rate limits against real servers: one worker with in-memory state, and two granian workers
sharing a real Redis, where limits must hold exactly across the workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import ROOT, RedisProcess, Server, model_toml

KEYS = {"alice": "alice-key-6f1c9e", "carol": "carol-key-0b7d21", "wrong": "not-a-key-at-all"}
LIMITED = {  # key name → its own policy, so each test starts from an empty window
    "burst": "requests_per_minute = 30",
    "meter": "requests_per_minute = 5\ntokens_per_minute = 1000",
    "budget": "tokens_per_minute = 300",
    "streams": "max_concurrent = 2",
    "trickle": "requests_per_minute = 2",
    "sip": "tokens_per_minute = 100",
}
KEYS.update({name: f"{name}-key-{i:04d}" for i, name in enumerate(LIMITED)})
RESET = re.compile(r"^(\d+m)?\d+s$|^\d+ms$")


def generated_key(name: str) -> tuple[str, str]:
    """`litestar-llm keys new NAME`: the key and the server.toml lines with its sha256."""
    out = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "keys", "new", name], capture_output=True, text=True, check=True
    ).stdout
    key = next(line for line in out.splitlines() if line.startswith("sk-llm-"))
    toml = out[out.index("[[auth.keys]]") :]
    return key, toml


def server_toml(tiny_model: Path, state_url: str, workers: int, bob_toml: str, fail_open: bool = False) -> str:
    limited = "".join(
        f'[[auth.keys]]\nname = "{name}"\nkey = "${{{name.upper()}_KEY}}"\nrate_limit = "{name}"\n' for name in LIMITED
    )
    policies = "".join(f"[rate_limits.{name}]\n{policy}\n" for name, policy in LIMITED.items())
    return f"""
    [server]
    workers = {workers}
    log_level = "debug"
    plugins = ["plugins.audit:AuditPlugin"]
    [routes]
    openai = true
    ollama = true
    [state]
    url = "{state_url}"
    fail_open = {str(fail_open).lower()}
    [auth]
    [[auth.keys]]
    name = "alice"
    key = "${{ALICE_KEY}}"
    models = ["tiny"]
    {bob_toml}
    models = ["tiny2:latest"]
    [[auth.keys]]
    name = "carol"
    key = "${{CAROL_KEY}}"
    {limited}
    {policies}
    [backends.local]
    kind = "mlx"
    {model_toml(tiny_model)}
    {model_toml(tiny_model, name="tiny2")}
    """


def key_env() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), **{f"{name.upper()}_KEY": key for name, key in KEYS.items()}}


@pytest.fixture(scope="module")
def memory_deployment(start_server, tiny_model) -> tuple[Server, str, None]:
    """One worker, windows in process memory: (server, bob's generated key, no Redis)."""
    bob_key, bob_toml = generated_key("bob")
    return start_server(server_toml(tiny_model, "memory://", 1, bob_toml), env=key_env()), bob_key, None


@pytest.fixture(scope="module")
def redis_deployment(start_server, tiny_model, redis_server) -> tuple[Server, str, RedisProcess]:
    """Two granian workers sharing their windows through a real Redis."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    bob_key, bob_toml = generated_key("bob")
    server = start_server(server_toml(tiny_model, redis_server.url, 2, bob_toml), env=key_env())
    return server, bob_key, redis_server


@pytest.fixture(scope="module", params=["memory-1-worker", "redis-2-workers"])
def deployment(request):
    return request.getfixturevalue(request.param.split("-")[0] + "_deployment")


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def chat(server: Server, key: str, max_tokens: int = 4, **extra) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=bearer(key), timeout=60)


def dialect_routes(server: Server) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, read from the app itself, with path parameters filled in."""
    from litestar_llm.app import create_app
    from litestar_llm.settings import load_settings

    saved = dict(os.environ)
    os.environ.update(key_env())
    try:
        app = create_app(load_settings(server.config))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    routes = []
    for route in app.routes:
        if route.path in ("/health", "/ready") or route.path.startswith("/docs"):
            continue
        if all(h.opt.get("public_asset") for h in route.route_handlers if h.http_methods != {"OPTIONS"}):
            continue  # the status page and the docs' files: a browser loads them before it has a key
        path = re.sub(r"\{[^}]+\}", "tiny", route.path)
        routes += [(method, path) for method in sorted(route.methods) if method not in ("OPTIONS", "HEAD")]
    return routes


def assert_dialect_error(path: str, response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status, (path, response.text)
    body = response.json()
    if path.startswith("/v1"):
        assert body["error"]["type"] == error_type and body["error"]["message"], body
    elif path.startswith("/api/") or path == "/":  # Ollama: {"error": "..."} and nothing else
        assert list(body) == ["error"] and isinstance(body["error"], str), body
    else:  # not a dialect's route (/metrics): Litestar's own shape
        assert body["status_code"] == status and body["detail"], body


def test_every_dialect_route_rejects_missing_and_wrong_keys_in_its_format(deployment) -> None:
    server, _, _ = deployment
    routes = dialect_routes(server)
    assert ("POST", "/v1/chat/completions") in routes and ("POST", "/api/chat") in routes and len(routes) > 15
    for method, path in routes:
        body = {"model": "tiny", "prompt": "hi"} if method == "POST" else None
        missing = httpx.request(method, f"{server.url}{path}", json=body, timeout=10)
        wrong = httpx.request(method, f"{server.url}{path}", json=body, headers=bearer("wrong"), timeout=10)
        for response in (missing, wrong):
            assert_dialect_error(path, response, 401, "authentication_error")
            assert KEYS["wrong"] not in response.text
    assert httpx.get(f"{server.url}/health").status_code == 200  # public_paths need no key


def test_real_clients_see_401_and_work_with_a_key(deployment) -> None:
    server, _, _ = deployment
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["wrong"], max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=server.url).list()
    assert raised.value.status_code == 401
    client = ollama.Client(host=server.url, headers=bearer("alice"))
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 3})
    assert reply.done and reply.eval_count == 3
    via_x_api_key = httpx.get(f"{server.url}/v1/models", headers={"x-api-key": KEYS["carol"]})
    assert via_x_api_key.status_code == 200


def test_scopes_hide_models_from_listings_and_requests(deployment) -> None:
    server, bob_key, _ = deployment
    alice = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["alice"], max_retries=0)
    bob = openai.OpenAI(base_url=f"{server.url}/v1", api_key=bob_key, max_retries=0)  # key_sha256 from `keys new`
    carol = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["carol"], max_retries=0)
    assert [m.id for m in alice.models.list()] == ["tiny"]
    assert [m.id for m in bob.models.list()] == ["tiny2"]
    assert sorted(m.id for m in carol.models.list()) == ["tiny", "tiny2"]
    tags = httpx.get(f"{server.url}/api/tags", headers=bearer("alice")).json()
    assert [m["name"] for m in tags["models"]] == ["tiny:latest"]
    for model in ("tiny2", "tiny2:latest", "does-not-exist"):
        with pytest.raises(openai.NotFoundError) as hidden:
            alice.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert hidden.value.body["code"] == "model_not_found"
        shown = httpx.post(f"{server.url}/api/show", json={"model": model}, headers=bearer("alice"))
        assert shown.status_code == 404 and shown.json() == {"error": f"model '{model}' not found"}
    assert bob.chat.completions.create(model="tiny2", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


async def counted(client: httpx.AsyncClient, dialect: str) -> httpx.Response:
    """A cheap request that counts against a key's request limit (listings and health do not): a stored-response
    lookup (404) in OpenAI's dialect, a pull of a declared model in Ollama's."""
    if dialect == "openai":
        return await client.get("/v1/responses/resp_none")
    return await client.post("/api/pull", json={"model": "tiny"})


def test_burst_of_100_against_30_rpm_lets_exactly_30_through(deployment) -> None:
    server, _, _ = deployment

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers=bearer("burst"), limits=limits, timeout=60) as c:
            return await asyncio.gather(*(counted(c, "openai" if i % 2 else "ollama") for i in range(100)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert statuses.count(429) == 70 and statuses.count(404) + statuses.count(200) == 30
    for response in responses:
        if response.status_code == 429:
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
            assert_dialect_error(response.request.url.path, response, 429, "rate_limit_error")


def test_headers_count_down_and_tokens_settle_to_real_usage(deployment, tokenizer) -> None:
    server, _, _ = deployment
    free = chat(server, "alice", max_tokens=40, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(free) > 20
    first = chat(server, "meter", max_tokens=40, temperature=0, stop=[free[8:12]])
    usage = first.json()["usage"]
    prompt = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    assert usage["prompt_tokens"] == prompt and usage["completion_tokens"] < 40  # stopped early
    headers = first.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("5", "4")
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 1000 - (prompt + 40)  # the reservation
    assert RESET.match(headers["x-ratelimit-reset-requests"]) and RESET.match(headers["x-ratelimit-reset-tokens"])
    for remaining in ("3", "2"):
        later = httpx.post(f"{server.url}/api/pull", json={"model": "tiny"}, headers=bearer("meter"))
        assert later.status_code == 200 and later.headers["x-ratelimit-remaining-requests"] == remaining
        assert int(later.headers["x-ratelimit-remaining-tokens"]) == 1000 - usage["total_tokens"]  # settled


def test_tokens_per_minute_reserve_prompt_plus_max_tokens_exactly(deployment, tokenizer) -> None:
    server, _, _ = deployment
    prompt = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
    )
    max_tokens = 60 - prompt  # each request reserves exactly 60 of the 300 tokens per minute
    probe = chat(server, "alice", max_tokens=max_tokens, temperature=0).json()
    assert probe["choices"][0]["finish_reason"] == "length"  # so each admitted request settles at exactly 60

    async def burst() -> list[httpx.Response]:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        async with httpx.AsyncClient(base_url=server.url, headers=bearer("budget"), timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(12)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert statuses.count(200) == 5 and statuses.count(429) == 7
    too_big = chat(server, "budget", max_tokens=400)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"


def test_concurrent_streams_are_capped_and_released(deployment) -> None:
    server, _, _ = deployment
    body = {"model": "tiny", "prompt": "The", "max_tokens": 1500, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, headers=bearer("streams"), timeout=60) as client:
        with (
            client.stream("POST", "/v1/completions", json=body) as one,
            client.stream("POST", "/v1/completions", json=body) as two,
        ):
            assert one.status_code == two.status_code == 200
            lines = [one.iter_lines(), two.iter_lines()]  # held: a collected iterator would close its connection
            assert all(next(line).startswith("data: ") for line in lines)
            third = httpx.post(
                f"{server.url}/api/generate", json={"model": "tiny", "prompt": "a"}, headers=bearer("streams")
            )
            assert third.status_code == 429 and "max_concurrent" in third.json()["error"]
        deadline = time.monotonic() + 10  # the closed streams give their slots back
        while (status := chat(server, "streams").status_code) == 429 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200


def test_retry_after_is_honest(redis_deployment) -> None:
    """Waiting exactly Retry-After seconds succeeds, for requests and for tokens (a minute: the window's length)."""
    server, _, _ = redis_deployment
    assert chat(server, "sip", max_tokens=60).status_code == 200
    trickle = {"json": {"model": "tiny"}, "headers": bearer("trickle")}
    for _ in range(2):
        assert httpx.post(f"{server.url}/api/pull", **trickle).status_code == 200
    waits = {}
    for name, attempt in (
        ("trickle", lambda: httpx.post(f"{server.url}/api/pull", **trickle)),
        ("sip", lambda: chat(server, "sip", max_tokens=60)),
    ):
        refused = attempt()
        assert refused.status_code == 429
        waits[name] = (time.monotonic() + int(refused.headers["retry-after"]), attempt)
    for name, (at, attempt) in sorted(waits.items(), key=lambda item: item[1][0]):
        time.sleep(max(at - time.monotonic(), 0))
        assert attempt().status_code == 200, name


def test_redis_outage_fails_closed_then_recovers(redis_deployment, start_server, tiny_model) -> None:
    server, _, redis_server = redis_deployment
    _, bob_toml = generated_key("bob")
    lenient = start_server(server_toml(tiny_model, redis_server.url, 1, bob_toml, fail_open=True), env=key_env())
    redis_server.stop()
    try:
        pull = {"json": {"model": "tiny"}, "headers": bearer("meter"), "timeout": 10}
        down = httpx.get(f"{server.url}/v1/responses/resp_none", headers=bearer("meter"), timeout=10)
        assert down.status_code == 503 and "state store" in down.json()["error"]["message"]
        ollama_down = httpx.post(f"{server.url}/api/pull", **pull)
        assert ollama_down.status_code == 503 and "state store" in ollama_down.json()["error"]
        assert httpx.get(f"{server.url}/v1/models", headers=bearer("alice"), timeout=10).status_code == 200
        assert httpx.post(f"{lenient.url}/api/pull", **pull).status_code == 200
    finally:
        redis_server.start()
    deadline = time.monotonic() + 15
    pull = {"json": {"model": "tiny"}, "headers": bearer("meter")}
    while (status := httpx.post(f"{server.url}/api/pull", **pull).status_code) != 200:
        assert status == 503 and time.monotonic() < deadline
        time.sleep(0.2)


def test_no_key_text_in_logs_or_check_output(deployment) -> None:
    server, bob_key, _ = deployment
    checked = subprocess.run(
        [sys.executable, "-m", "litestar_llm", "check", "--config", str(server.config)],
        capture_output=True,
        text=True,
        env={**os.environ, **key_env()},
        cwd=server.config.parent,
    )
    assert checked.returncode == 0
    log = server.log.read_text()
    assert '"key": "alice"' in log and '"status": 401' in log  # audit lines name the key, never show it
    for text in (checked.stdout + checked.stderr, log):
        for key in (*KEYS.values(), bob_key):
            assert key not in text
        assert hashlib.sha256(KEYS["alice"].encode()).hexdigest() not in text


def test_stored_responses_belong_to_the_key_that_created_them(deployment) -> None:
    """Stored in [state] (Redis in the two-worker deployment, so any worker finds them), visible to one key only."""
    server, _, _ = deployment
    alice = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["alice"], max_retries=0)
    carol = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEYS["carol"], max_retries=0)
    created = alice.responses.create(model="tiny", input="hi", max_output_tokens=3)
    for _ in range(4):  # several tries: with two workers each may answer
        assert alice.responses.retrieve(created.id).output_text == created.output_text
    with pytest.raises(openai.NotFoundError):
        carol.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        carol.responses.create(model="tiny", input="more", previous_response_id=created.id, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        carol.responses.delete(created.id)
    follow_up = alice.responses.create(model="tiny", input="more", previous_response_id=created.id, max_output_tokens=2)
    assert follow_up.usage.input_tokens > created.usage.input_tokens
