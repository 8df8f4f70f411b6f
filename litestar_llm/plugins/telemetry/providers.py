"""One OpenTelemetry SDK setup per process: a MeterProvider (Prometheus and/or OTLP readers) and a TracerProvider
(OTLP), both with the service's resource. The standard OTEL_* variables keep working: OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_METRIC_EXPORT_INTERVAL, OTEL_TRACES_SAMPLER, ..."""

from __future__ import annotations

import os

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from litestar_llm import __version__
from litestar_llm.config import TelemetryConfig


def resource(config: TelemetryConfig) -> Resource:
    attributes = {"service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = config.service_name
    return Resource.create(attributes)  # merges OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME


def otlp_endpoint(config: TelemetryConfig) -> str | None:
    return config.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def meter_provider(
    config: TelemetryConfig, registry: CollectorRegistry | None, *extra: MetricReader
) -> MeterProvider | None:
    """None when nothing would read the metrics. `extra`: readers of this process's own (the status page's)."""
    readers: list[MetricReader] = list(extra)
    if registry is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers.append(PrometheusMetricReader(registry=registry))
    if endpoint := otlp_endpoint(config):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics")))
    if not readers:
        return None
    return MeterProvider(metric_readers=readers, resource=resource(config), shutdown_on_exit=False)


def tracer_provider(config: TelemetryConfig) -> TracerProvider | None:
    """None when traces are off or have nowhere to go."""
    endpoint = otlp_endpoint(config)
    if not (config.traces and endpoint):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(config.sample_ratio))
    provider = TracerProvider(resource=resource(config), sampler=sampler, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")))
    return provider
