"""In-process checks of /ui/status and /docs (the browser's view is in test_ui_browser.py): the figures after a known
sequence of requests over the tiny MLX model, who sees which keys, percentiles from the telemetry's own histograms,
and an OpenAPI document whose request bodies are the wire Structs' schemas."""

from __future__ import annotations

import tomllib
from pathlib import Path

import jsonschema
import msgspec
import pytest
from conftest import model_toml
from litestar.testing import TestClient
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from litestar_llm.app import create_app
from litestar_llm.config import parse_settings
from litestar_llm.dialects.openai import wire as openai_wire
from litestar_llm.plugins.telemetry import TelemetryPlugin
from litestar_llm.plugins.telemetry.genai import GenAIMetrics
from litestar_llm.plugins.ui import UIPlugin
from litestar_llm.plugins.ui.status import Sampler, read

KEYS = {"root": "ui-root-key", "alice": "ui-alice-key", "bob": "ui-bob-key"}
AUTH = "".join(
    f'[[auth.keys]]\nname = "{name}"\nkey = "{key}"\n{"admin = true" if name == "root" else ""}\n'
    for name, key in KEYS.items()
)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def app_for(tiny_model: Path, extra: str = ""):
    toml = (
        f'[routes]\nollama = true\nanthropic = true\n[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}\n{extra}'
    )
    return create_app(parse_settings(tomllib.loads(toml), tiny_model.parent))


@pytest.fixture(scope="module")
def client(tiny_model: Path):
    with TestClient(app_for(tiny_model, AUTH)) as client:
        yield client


def chat(client: TestClient, key: str, max_tokens: int, stream: bool = False) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    body["temperature"] = 0  # greedy: the same token counts every run
    response = client.post("/v1/chat/completions", json={**body, "stream": stream}, headers=bearer(key))
    assert response.status_code == 200, response.text


def test_status_counts_requests_tokens_and_refusals_per_key(client: TestClient) -> None:
    chat(client, "alice", 4)
    chat(client, "alice", 3, stream=True)
    chat(client, "bob", 2)
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    status = client.get("/ui/status", headers=bearer("root")).json()
    assert status["status"] == "ready" and status["admin"] is True
    (model,) = status["models"]
    assert (model["name"], model["state"], model["backend"], model["max_batch_size"]) == ("tiny", "ready", "mlx", 32)
    assert model["context_length"] and model["running"] == 0
    keys = {k["name"]: k for k in status["keys"]}
    assert list(keys) == ["root", "alice", "bob"]  # every declared key, in order, for an admin
    assert (keys["alice"]["requests"], keys["alice"]["output_tokens"]) == (2, 7)
    assert (keys["bob"]["requests"], keys["bob"]["output_tokens"], keys["root"]["requests"]) == (1, 2, 0)
    assert keys["alice"]["input_tokens"] > 0
    traffic = status["traffic"]
    by_status = {(r["dialect"], r["status"]): r["count"] for r in traffic["requests"]}
    assert by_status[("openai", 200)] == 3 and by_status[("openai", 401)] == 1
    assert traffic["refusals"] == {"auth": 1}
    assert traffic["ttft_s"]["count"] == 3 and 0 < traffic["ttft_s"]["p50"] <= traffic["ttft_s"]["p95"]
    assert traffic["itl_s"]["count"] == 3 and traffic["itl_s"]["p50"] > 0
    assert status["links"] == {"docs": "/docs", "metrics": "/metrics", "chat": "/v1/chat/completions"}
    assert len(status["config_digest"]) == 12 and status["uptime_s"] >= 0


def test_a_key_sees_only_its_own_usage_and_status_needs_a_key(client: TestClient) -> None:
    mine = client.get("/ui/status", headers=bearer("bob")).json()
    assert mine["admin"] is False and [k["name"] for k in mine["keys"]] == ["bob"]
    assert client.get("/ui/status").status_code == 401
    assert client.get("/ui/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = client.get("/ui")  # the page itself needs no key: it asks for one
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/ui/assets/ui.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_status_requests_do_not_count_against_a_request_limit(tiny_model: Path) -> None:
    limited = '[[auth.keys]]\nname = "k"\nkey = "ui-limited"\nrate_limit = "two"\n[rate_limits.two]\nrequests_per_minute = 2\n'
    with TestClient(app_for(tiny_model, limited)) as client:
        headers = {"Authorization": "Bearer ui-limited"}
        assert [client.get("/ui/status", headers=headers).status_code for _ in range(5)] == [200] * 5


def test_ui_off_mounts_nothing(tiny_model: Path) -> None:
    assert any(route.path == "/ui/status" for route in app_for(tiny_model).routes)  # on by default
    toml = f'[routes]\nui = false\n[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}'
    off = create_app(parse_settings(tomllib.loads(toml), tiny_model.parent))
    assert not [route.path for route in off.routes if route.path.startswith("/ui")]


def test_telemetry_off_leaves_the_page_without_traffic_and_adds_no_instrumentation(tiny_model: Path) -> None:
    app = app_for(tiny_model, "[telemetry]\nprometheus = false\n")
    (ui,) = [plugin for plugin in app.plugins.init if isinstance(plugin, UIPlugin)]
    (telemetry,) = [plugin for plugin in app.plugins.init if isinstance(plugin, TelemetryPlugin)]
    assert telemetry.meter_provider is None and not telemetry.active  # off stays off: no reader for the page either
    assert ui.sampler.figures() == (None, {})


def test_percentiles_and_rates_come_from_the_telemetry_histograms() -> None:
    reader = InMemoryMetricReader()
    metrics = GenAIMetrics(MeterProvider(metric_readers=[reader]).get_meter("t"), None, lambda: [])
    sampler = Sampler(reader, sample_s=1, window_s=60)
    sampler.sample()
    for seconds in [0.003] * 10 + [0.03] * 8 + [0.3] * 2:  # TTFT buckets (0.001, 0.005], (0.02, 0.04], (0.25, 0.5]
        metrics.ttft.record(seconds, {"litestar_llm.dialect": "openai"})
    metrics.tokens.record(120, {"gen_ai.token.type": "output"})
    traffic, _keys = sampler.figures()
    assert traffic.ttft_s.count == 20 and traffic.itl_s.count == 0 and traffic.itl_s.p50 is None
    assert traffic.ttft_s.p50 == pytest.approx(0.005)  # rank 10 of 20: the top of the first bucket holding values
    assert 0.25 < traffic.ttft_s.p95 <= 0.5
    assert read(reader, 0).output_tokens == 120 and traffic.output_tokens_per_s > 0
    assert traffic.series.ttft_p95_s[-1] == traffic.ttft_s.p95  # one interval: the chart's last point is the window


def test_docs_describe_every_request_body_with_the_wire_schema(client: TestClient) -> None:
    document = client.get("/docs/openapi.json", headers=bearer("alice")).json()
    schemas = document["components"]["schemas"]
    posts = {path: item["post"] for path, item in document["paths"].items() if "post" in item}
    expected = {
        "/v1/chat/completions": "OpenAI.ChatCompletionRequest",
        "/v1/completions": "OpenAI.CompletionRequest",
        "/v1/responses": "Responses.CreateResponse",
        "/api/chat": "Ollama.ChatRequest",
        "/api/generate": "Ollama.GenerateRequest",
        "/v1/messages": "Anthropic.MessagesRequest",
    }
    for path, name in expected.items():
        ref = posts[path]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}" and name in schemas, path
    assert "text/event-stream" in posts["/v1/chat/completions"]["responses"]["200"]["content"]
    assert "application/x-ndjson" in posts["/api/chat"]["responses"]["200"]["content"]
    assert "Status" in schemas  # /ui/status is documented from its return type
    # The documented schema is msgspec's: what it accepts, the decoder accepts, and what it refuses, it refuses.
    request = {"$ref": "#/components/schemas/OpenAI.ChatCompletionRequest", "components": document["components"]}
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    jsonschema.validate(good, request)
    msgspec.convert(good, openai_wire.ChatCompletionRequest)
    bad = {**good, "max_tokens": 0}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, request)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, openai_wire.ChatCompletionRequest)
    page = client.get("/docs", headers=bearer("alice")).text
    assert "/docs-assets/swagger-ui-bundle.js" in page and "https://" not in page


def test_an_on_demand_model_shows_unloaded_until_asked(tiny_model: Path) -> None:
    toml = f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}load = "on_demand"\n'
    with TestClient(create_app(parse_settings(tomllib.loads(toml), tiny_model.parent))) as client:
        (model,) = client.get("/ui/status").json()["models"]
        assert model["state"] == model["load"]["state"] == "unloaded", model
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        (model,) = client.get("/ui/status").json()["models"]
        assert model["state"] == "ready" and model["load_s"] > 0, model
