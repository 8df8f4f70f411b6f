"""In-process checks of the app's edges (no server process needed): errors for paths nothing serves, the /metrics
content type, which paths a key's request limit does not count, and how the registry ends generations in flight
and answers for models that are still loading."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import model_toml
from litestar.testing import TestClient

from litestar_llm.app import create_app
from litestar_llm.config import parse_settings
from litestar_llm.engine import registry as registry_module
from litestar_llm.engine.base import Engine, ModelInfo
from litestar_llm.engine.registry import EngineRegistry
from litestar_llm.engine.types import Delta, GenerationRequest
from litestar_llm.errors import EngineUnavailableError

KEY = {"Authorization": "Bearer hardening-key"}


def app_for(tiny_model: Path, extra: str = ""):
    toml = (
        f'[routes]\nollama = true\nanthropic = true\n[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}\n{extra}'
    )
    return create_app(parse_settings(tomllib.loads(toml), tiny_model.parent))


@pytest.fixture(scope="module")
def client(tiny_model: Path):
    with TestClient(app_for(tiny_model)) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nowhere", 404),
        ("POST", "/v1/chat/completion", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ],
)
def test_openai_paths_nothing_serves_answer_in_openai_shape(client, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and path in error["message"]
    if status == 405:
        assert "POST" in response.headers["allow"] or "GET" in response.headers["allow"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/api/nowhere", 404), ("POST", "/api/tags", 405)])
def test_ollama_paths_nothing_serves_answer_in_ollama_shape(client, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"] and path in body["error"]


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/messages", 405), ("POST", "/v1/messages/x", 404)])
def test_anthropic_paths_nothing_serves_answer_in_anthropic_shape(client, method: str, path: str, status: int) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert path in body["error"]["message"]


def test_telemetry_labels_each_dialect_by_its_paths() -> None:
    from litestar_llm.plugins.telemetry import dialect_of

    paths = ["/v1/messages", "/v1/messages/count_tokens", "/v1/responses/r1", "/v1/chat/completions", "/api/chat"]
    assert [dialect_of(p) for p in paths] == ["anthropic", "anthropic", "responses", "openai", "ollama"]


def test_other_paths_keep_litestars_shape_and_routes_keep_their_own_404s(client) -> None:
    other = client.get("/nowhere")
    assert other.status_code == 404 and other.json()["status_code"] == 404
    model = client.get("/v1/models/nope")  # a route's own 404, not "no route": its message is kept
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found"


def test_metrics_content_type_has_one_charset(client) -> None:
    content_type = client.get("/metrics").headers["content-type"]
    assert content_type.startswith("text/plain; version=") and content_type.count("charset") == 1


def test_health_listings_and_metrics_do_not_count_against_a_keys_request_limit(tiny_model: Path) -> None:
    limited = '[[auth.keys]]\nname = "k"\nkey = "hardening-key"\nrate_limit = "two"\n'
    limited += "[rate_limits.two]\nrequests_per_minute = 2\n[auth]\npublic_paths = []\n"
    with TestClient(app_for(tiny_model, limited)) as client:
        for _ in range(3):
            for path in ("/health", "/ready", "/metrics", "/v1/models", "/v1/models/tiny", "/api/tags", "/api/ps",
                         "/api/version", "/"):  # fmt: skip
                assert client.get(path, headers=KEY).status_code == 200, path
            assert client.post("/api/show", json={"model": "tiny"}, headers=KEY).status_code == 200
        assert client.get("/v1/models").status_code == 401  # still behind the key
        body = {"model": "tiny", "prompt": "a", "max_tokens": 1}
        assert [client.post("/v1/completions", json=body, headers=KEY).status_code for _ in range(3)] == [200, 200, 429]


# -- the registry, with a fake engine ------------------------------------------------------------------------


class FakeEngine(Engine):
    """Loads when `loaded` is set; each generation sends one delta, then waits forever (a stuck backend)."""

    loaded: asyncio.Event

    def __init__(self, model, backend, backend_name) -> None:
        self.info = ModelInfo(name=model.name, backend="mlx", source=model.source)
        self.cancelled = 0

    async def start(self) -> None:
        await FakeEngine.loaded.wait()

    async def close(self) -> None:
        pass

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta(text="first", token_ids=[1])
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield Delta(text="never")  # pragma: no cover


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> EngineRegistry:
    monkeypatch.setattr(registry_module, "engine_class", lambda kind: FakeEngine)
    toml = f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}'
    registry = EngineRegistry(parse_settings(tomllib.loads(toml), tiny_model.parent))
    registry.build()
    return registry


def test_a_model_still_loading_answers_503_with_retry_after(fake_registry: EngineRegistry) -> None:
    async def scenario() -> None:
        FakeEngine.loaded = asyncio.Event()
        failures: list = []
        loader = fake_registry.start_in_background(failures.append)
        await asyncio.sleep(0)
        with pytest.raises(EngineUnavailableError) as error:
            fake_registry.resolve("tiny:latest")
        assert error.value.headers == {"Retry-After": "5"} and "still loading" in error.value.message
        assert not fake_registry.ready and fake_registry.load_state("tiny") == {"state": "loading"}
        FakeEngine.loaded.set()
        await loader
        assert fake_registry.resolve("tiny")[0].info.name == "tiny" and fake_registry.ready and not failures

    asyncio.run(scenario())


def test_abort_ends_generations_that_wait_on_a_stuck_backend(fake_registry: EngineRegistry) -> None:
    async def scenario() -> None:
        FakeEngine.loaded = asyncio.Event()
        FakeEngine.loaded.set()
        await fake_registry.start()
        engine, _ = fake_registry.resolve("tiny")
        request = GenerationRequest(model="tiny", prompt="a")
        outcomes: list[str] = []

        async def consume() -> None:
            stream = engine.generate(request)
            try:
                async for delta in stream:
                    outcomes.append(delta.text)
            except EngineUnavailableError as exc:
                outcomes.append(exc.message)

        tasks = [asyncio.create_task(consume()) for _ in range(3)]
        while fake_registry.in_flight < 3 or len(outcomes) < 3:
            await asyncio.sleep(0)
        assert fake_registry.drain() == 3 and not fake_registry.ready
        assert fake_registry.abort() == 3
        await asyncio.gather(*tasks)
        assert outcomes == ["first"] * 3 + ["server is shutting down"] * 3
        assert fake_registry.in_flight == 0 and engine.engine.cancelled == 3  # the backend's waits were cancelled
        with pytest.raises(EngineUnavailableError, match="server is shutting down"):
            fake_registry.resolve("tiny")
        with pytest.raises(EngineUnavailableError, match="server is shutting down"):
            await anext(engine.generate(request))
        assert await fake_registry.close(timeout=5)

    asyncio.run(scenario())


def test_a_cancelled_generation_is_not_mistaken_for_a_shutdown(fake_registry: EngineRegistry) -> None:
    async def scenario() -> None:
        FakeEngine.loaded = asyncio.Event()
        FakeEngine.loaded.set()
        await fake_registry.start()
        engine, _ = fake_registry.resolve("tiny")

        async def consume() -> None:
            async for _ in engine.generate(GenerationRequest(model="tiny", prompt="a")):
                pass

        task = asyncio.create_task(consume())
        while fake_registry.in_flight < 1:
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()  # the client left: a cancellation, as before
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake_registry.in_flight == 0

    asyncio.run(scenario())


ROUTE_SETS = {
    "openai": {"/v1/chat/completions", "/v1/completions", "/v1/models"},
    "responses": {"/v1/responses"},
    "ollama": {"/api/chat", "/api/generate", "/api/tags"},
    "anthropic": {"/v1/messages", "/v1/messages/count_tokens"},
}


@pytest.mark.parametrize("switched_off", list(ROUTE_SETS))
def test_a_route_set_switched_off_is_not_mounted(tiny_model, switched_off: str) -> None:
    """In process: the app's own route table, no server. Every set on but one: that one's paths are absent, the
    others' and /health are there."""
    from litestar_llm.app import create_app
    from litestar_llm.config import parse_settings

    routes = {name: name != switched_off for name in ROUTE_SETS}
    data = {"routes": routes, "backends": {"local": {"kind": "mlx"}}}
    data["models"] = [{"name": "tiny", "backend": "local", "source": str(tiny_model)}]
    paths = {route.path for route in create_app(parse_settings(data, tiny_model.parent)).routes}
    assert "/health" in paths
    for name, expected in ROUTE_SETS.items():
        present = expected & paths
        assert present == (set() if name == switched_off else expected), name
