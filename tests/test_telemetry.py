"""Telemetry against real servers: Prometheus /metrics after a known sequence of requests, spans in an in-memory
exporter with the client's trace id, and an OTLP/HTTP export received on 127.0.0.1 and decoded as OTLP protobuf."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from conftest import model_toml
from prometheus_client.parser import text_string_to_metric_families

ALICE = {"Authorization": "Bearer alice-telemetry-key"}


def metrics_of(text: str) -> dict[str, list]:
    """Prometheus samples by name: [(labels, value)]."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k, "") == want for k, want in labels.items()))


@pytest.fixture(scope="module")
def observed(start_server, tiny_model):
    return start_server(
        f"""
        [routes]
        openai = true
        ollama = true
        responses = true
        [auth]
        public_paths = ["/health", "/ready", "/metrics"]
        [[auth.keys]]
        name = "alice"
        key = "alice-telemetry-key"
        [[auth.keys]]
        name = "limited"
        key = "limited-telemetry-key"
        rate_limit = "one"
        [rate_limits.one]
        requests_per_minute = 1
        [telemetry]
        prometheus = true
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """
    )


def test_metrics_count_exactly_what_was_sent(observed) -> None:
    client = openai.OpenAI(base_url=f"{observed.url}/v1", api_key="alice-telemetry-key", max_retries=0)
    ollama_client = ollama.Client(host=observed.url, headers=ALICE)
    messages = [{"role": "user", "content": "hi"}]
    used = {"openai": [0, 0], "ollama": [0, 0], "responses": [0, 0]}  # dialect → [input, output]

    def add(dialect: str, prompt: int, completion: int) -> None:
        used[dialect][0] += prompt
        used[dialect][1] += completion

    for max_tokens in (3, 5):
        usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens).usage
        add("openai", usage.prompt_tokens, usage.completion_tokens)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    usage = next(chunk.usage for chunk in stream if chunk.usage)
    add("openai", usage.prompt_tokens, usage.completion_tokens)
    usage = client.completions.create(model="tiny", prompt="The", max_tokens=6).usage
    add("openai", usage.prompt_tokens, usage.completion_tokens)
    reply = ollama_client.chat(model="tiny", messages=messages, options={"num_predict": 7})
    add("ollama", reply.prompt_eval_count, reply.eval_count)
    last = list(ollama_client.generate(model="tiny", prompt="hello", stream=True, options={"num_predict": 2}))[-1]
    add("ollama", last.prompt_eval_count, last.eval_count)
    response = client.responses.create(model="tiny", input="hi", max_output_tokens=3)
    add("responses", response.usage.input_tokens, response.usage.output_tokens)
    counts = {"openai": 4, "ollama": 2, "responses": 1}

    assert httpx.get(f"{observed.url}/v1/models").status_code == 401  # refused: auth
    limited = {"Authorization": "Bearer limited-telemetry-key"}
    pull = {"json": {"model": "tiny"}, "headers": limited}  # a metered request (listings are not)
    assert httpx.post(f"{observed.url}/api/pull", **pull).status_code == 200
    assert httpx.post(f"{observed.url}/api/pull", **pull).status_code == 429  # refused: rate_limit

    scraped = httpx.get(f"{observed.url}/metrics")  # public by [auth] public_paths
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = metrics_of(scraped.text)
    for dialect, sent in counts.items():
        labels = {"litestar_llm_dialect": dialect, "gen_ai_request_model": "tiny", "gen_ai_provider_name": "mlx"}
        assert total(samples, "gen_ai_server_request_duration_seconds_count", **labels, error_type="") == sent
        assert total(samples, "gen_ai_server_time_to_first_token_seconds_count", **labels) == sent
        for kind, value in zip(("input", "output"), used[dialect], strict=True):
            assert total(samples, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type=kind) == value
            assert total(samples, "gen_ai_client_token_usage_count", **labels, gen_ai_token_type=kind) == sent
    all_input, all_output = (sum(u[i] for u in used.values()) for i in (0, 1))
    key = {"litestar_llm_api_key_name": "alice"}
    assert total(samples, "litestar_llm_api_key_tokens_total", **key, gen_ai_token_type="input") == all_input
    assert total(samples, "litestar_llm_api_key_tokens_total", **key, gen_ai_token_type="output") == all_output
    assert total(samples, "litestar_llm_requests_rejected_total", reason="auth") == 1
    assert (
        total(samples, "litestar_llm_requests_rejected_total", reason="rate_limit", litestar_llm_api_key_name="limited")
        == 1
    )
    assert total(samples, "litestar_llm_engine_requests_running", gen_ai_request_model="tiny") == 0
    assert total(samples, "gen_ai_server_time_per_output_token_seconds_count") >= 7  # every answer longer than 1 token
    assert (
        total(samples, "http_server_duration_milliseconds_count") >= 10
    )  # Litestar's HTTP server metrics: all 10 above
    assert "alice-telemetry-key" not in scraped.text


def test_duration_buckets_follow_the_genai_conventions(observed) -> None:
    samples = metrics_of(httpx.get(f"{observed.url}/metrics").text)
    bounds = {float(labels["le"]) for labels, _ in samples["gen_ai_server_time_to_first_token_seconds_bucket"]}
    assert {0.001, 0.005, 0.04, 0.1, 2.5, 10.0, float("inf")} <= bounds
    token_bounds = {float(labels["le"]) for labels, _ in samples["gen_ai_client_token_usage_bucket"]}
    assert {1, 4, 16, 64, 1024, 67108864} <= token_bounds


def _app(tiny_model: Path, extra: str):
    from litestar_llm.app import create_app
    from litestar_llm.config import parse_settings

    toml = f'[backends.local]\nkind = "mlx"\n{model_toml(tiny_model)}\n{extra}'
    return create_app(parse_settings(tomllib.loads(toml), tiny_model.parent))


def test_metrics_route_is_off_with_prometheus_false_and_follows_auth(tiny_model) -> None:
    from litestar.testing import TestClient

    with TestClient(_app(tiny_model, "[telemetry]\nprometheus = false")) as client:
        assert client.get("/metrics").status_code == 404
    keyed = '[[auth.keys]]\nname = "alice"\nkey = "alice-telemetry-key"'
    with TestClient(_app(tiny_model, keyed)) as client:
        assert client.get("/metrics").status_code == 401  # not in the default public_paths
        assert client.get("/metrics", headers=ALICE).status_code == 200


class OTLPReceiver(ThreadingHTTPServer):
    """A real OTLP/HTTP endpoint on 127.0.0.1 keeping what it receives."""

    def __init__(self) -> None:
        self.received: dict[str, list[bytes]] = {"/v1/traces": [], "/v1/metrics": []}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, path: str, timeout: float = 20) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while not self.received[path] and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.received[path]


def test_otlp_export_reaches_a_receiver_as_valid_protobuf(start_server, tiny_model) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    receiver = OTLPReceiver()
    server = start_server(
        f"""
        [telemetry]
        service_name = "llm-under-test"
        prometheus = false
        otlp_endpoint = "{receiver.url}"
        [backends.local]
        kind = "mlx"
        {model_toml(tiny_model)}
        """,
        env={"OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    reply = httpx.post(
        f"{server.url}/v1/chat/completions", json=body, headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert reply.status_code == 200
    spans = []
    deadline = time.monotonic() + 20
    while not any(s.name == "chat tiny" for s in spans) and time.monotonic() < deadline:
        spans = []
        for blob in receiver.wait_for("/v1/traces"):
            request = ExportTraceServiceRequest.FromString(blob)
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                assert service == "llm-under-test"
                spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
        time.sleep(0.1)
    inference = next(s for s in spans if s.name == "chat tiny")
    assert inference.trace_id.hex() == trace_id  # the client's traceparent is honoured
    attributes = {a.key: a.value for a in inference.attributes}
    assert attributes["gen_ai.usage.output_tokens"].int_value == reply.json()["usage"]["completion_tokens"]
    names: set[str] = set()
    deadline = time.monotonic() + 20
    while "gen_ai.server.request.duration" not in names and time.monotonic() < deadline:
        for blob in receiver.wait_for("/v1/metrics"):
            request = ExportMetricsServiceRequest.FromString(blob)
            names |= {m.name for rm in request.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        time.sleep(0.1)
    assert {"gen_ai.server.request.duration", "gen_ai.client.token.usage", "gen_ai.server.time_to_first_token"} <= names
    receiver.shutdown()


def test_spans_carry_genai_attributes_and_the_clients_trace(tiny_model) -> None:
    from litestar.testing import TestClient
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from litestar_llm.plugins.telemetry import TelemetryPlugin

    receiver = OTLPReceiver()  # somewhere for the OTLP exporter to send to; the spans are read from memory
    app = _app(tiny_model, f'[telemetry]\notlp_endpoint = "{receiver.url}"\nsample_ratio = 0.0')
    exporter = InMemorySpanExporter()
    app.plugins.get(TelemetryPlugin).tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with TestClient(app) as client:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0.5,
            "seed": 7,
        }
        sampled = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}  # sampled by the client: kept despite 0.0
        reply = client.post("/v1/chat/completions", json=body, headers=sampled).json()
        client.post("/v1/chat/completions", json=body)  # no traceparent: sample_ratio 0.0 drops it
        stream = client.post("/v1/chat/completions", json={**body, "stream": True}, headers=sampled)
        assert stream.status_code == 200
    spans = exporter.get_finished_spans()
    inference = [s for s in spans if s.name == "chat tiny"]
    assert len(inference) == 2 and all(format(s.context.trace_id, "032x") == trace_id for s in inference)
    server_span = next(s for s in spans if s.kind.name == "SERVER" and s.context.span_id == inference[0].parent.span_id)
    assert format(server_span.context.trace_id, "032x") == trace_id
    attributes = dict(inference[0].attributes)
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == "tiny"
    assert attributes["gen_ai.provider.name"] == "mlx" and attributes["gen_ai.request.max_tokens"] == 4
    assert attributes["gen_ai.request.temperature"] == 0.5 and attributes["gen_ai.request.seed"] == 7
    assert attributes["gen_ai.usage.input_tokens"] == reply["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == reply["usage"]["completion_tokens"]
    assert tuple(attributes["gen_ai.response.finish_reasons"]) == (reply["choices"][0]["finish_reason"],)
    receiver.shutdown()


def test_dashboard_queries_name_metrics_the_server_exports(observed) -> None:
    """examples/grafana: every metric a panel queries is one /metrics serves (KV cache usage: vLLM models only)."""
    from conftest import ROOT

    dashboard = json.loads((ROOT / "examples/grafana/litestar-llm.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\b((?:gen_ai|litestar_llm)_[a-z_]+)\b", expr)}
    samples = metrics_of(httpx.get(f"{observed.url}/metrics").text)
    labels = {label for series in samples.values() for got, _ in series for label in got}
    queried -= labels | {"litestar_llm_engine_kv_cache_usage"}
    exported = set(samples)
    assert queried and queried <= exported, queried - exported
