"""[telemetry]: OpenTelemetry metrics (GenAI semantic conventions) and traces, Prometheus /metrics.

One SDK setup per process (`providers.py`); HTTP server spans and metrics come from Litestar's OpenTelemetry
plugin; the GenAI instruments and inference spans from `genai.py`, attached to each request through the
`litestar_llm.observation` seam.
"""

from __future__ import annotations

import time

from litestar import Litestar, Response, get
from litestar.config.app import AppConfig
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.plugins import InitPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from litestar_llm.caller import current_caller
from litestar_llm.config import TelemetryConfig
from litestar_llm.observation import current_observer
from litestar_llm.plugins.telemetry import providers

REJECTION_REASONS = {401: "auth", 429: "rate_limit", 503: "overload", 529: "overload"}  # 529: Anthropic's overload


def dialect_of(path: str) -> str:
    if path.startswith("/v1/responses"):
        return "responses"
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "ollama" if path.startswith("/api/") or path == "/" else "other"


class TelemetryMiddleware(ASGIMiddleware):
    """Gives each request its GenAI observer and counts refusals by reason. Outside the auth middleware, so a
    401 or 429 raised there passes through here."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, plugin: TelemetryPlugin) -> None:
        self.plugin = plugin

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        from litestar_llm.plugins.telemetry.genai import RequestObserver

        metrics = self.plugin.metrics
        if metrics is None:  # before start-up finished
            await next_app(scope, receive, send)
            return
        dialect = dialect_of(scope["path"])
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        token = current_observer.set(RequestObserver(metrics, dialect, time.perf_counter()))
        try:
            await next_app(scope, receive, observed_send)
        except Exception as exc:  # answered by the exception handlers outside every middleware
            status = getattr(exc, "status_code", 500)
            raise
        finally:
            current_observer.reset(token)
            name = scope.get("state", {}).get("api_key_name")
            if dialect != "other":
                counted = {"litestar_llm.dialect": dialect, "http.response.status_code": status}
                if name:
                    counted["litestar_llm.api_key.name"] = name
                metrics.requests.add(1, counted)
            if reason := REJECTION_REASONS.get(status):
                attributes = {"reason": reason, "litestar_llm.dialect": dialect}
                if name:
                    attributes["litestar_llm.api_key.name"] = name
                metrics.rejected.add(1, attributes)


class TelemetryPlugin(InitPlugin):
    """`status_reader=True` adds an in-memory reader that the status page (/ui/status) collects from when it
    samples: the instruments are the same, so the figures cost nothing more per token. Only where telemetry is on
    (Prometheus or OTLP): off means no instrumentation at all."""

    def __init__(self, config: TelemetryConfig, *, status_reader: bool = False) -> None:
        self.config = config
        self.registry = None
        if config.prometheus:
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry(auto_describe=True)
        self.status_reader = None
        if status_reader and (config.prometheus or providers.otlp_endpoint(config)):
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            self.status_reader = InMemoryMetricReader()
        extra = [self.status_reader] if self.status_reader is not None else []
        self.meter_provider = providers.meter_provider(config, self.registry, *extra)
        self.tracer_provider = providers.tracer_provider(config)
        self.metrics = None

    @property
    def active(self) -> bool:
        return self.meter_provider is not None or self.tracer_provider is not None

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if not self.active:
            return app_config
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

        app_config.plugins.append(
            OpenTelemetryPlugin(
                OpenTelemetryConfig(
                    tracer_provider=self.tracer_provider,
                    meter_provider=self.meter_provider,
                    exclude=["/metrics"],
                    exclude_spans=["receive", "send"],  # not a span per streamed chunk: the hot path stays O(1)
                )
            )
        )
        app_config.middleware.append(TelemetryMiddleware(self))
        if self.registry is not None:
            app_config.route_handlers.append(self._metrics_route())
        app_config.on_startup.append(self._start)
        app_config.on_shutdown.append(self._stop)
        return app_config

    def _metrics_route(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = self.registry

        @get("/metrics", include_in_schema=False, sync_to_thread=False)
        def metrics() -> Response[bytes]:
            # As a header: given as media_type, Litestar would add a second "; charset=utf-8" to this text/ type.
            return Response(generate_latest(registry), headers={"content-type": CONTENT_TYPE_LATEST})

        return metrics

    def _start(self, app: Litestar) -> None:
        from opentelemetry.metrics import NoOpMeter

        from litestar_llm.plugins.telemetry.genai import GenAIMetrics

        registry = app.state["registry"]
        meter = self.meter_provider.get_meter("litestar_llm") if self.meter_provider else NoOpMeter("litestar_llm")
        tracer = self.tracer_provider.get_tracer("litestar_llm") if self.tracer_provider else None
        self.metrics = GenAIMetrics(meter, tracer, lambda: list(_all_engines(registry)))

    def _stop(self, _app: Litestar) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                provider.shutdown()


def _all_engines(registry):
    token = current_caller.set(None)  # gauges cover every model, whoever's request triggered the collection
    try:
        return list(registry)
    finally:
        current_caller.reset(token)
