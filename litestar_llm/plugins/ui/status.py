"""The figures behind /ui/status: cumulative readings of the telemetry's own instruments, taken every `sample_s`
into a ring that covers `window_s`; rates and percentiles are differences between two readings. Nothing here runs
per token or per request: a reading is one collection of the in-memory metric reader."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from typing import Any

import msgspec
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from litestar_llm.plugins.telemetry.genai import DIALECT, KEY_NAME

RATE_S = 10.0
"""Headline rates (tokens/s, requests/s) cover the last this many seconds."""
CHART_POINTS = 90
"""At most this many points per chart, whatever window_s / sample_s."""


class Histogram:
    """A histogram's cumulative bucket counts, summed over every attribute set."""

    __slots__ = ("bounds", "counts")

    def __init__(self, bounds: tuple[float, ...] = (), counts: list[int] | None = None) -> None:
        self.bounds, self.counts = bounds, counts if counts is not None else [0] * (len(bounds) + 1)

    def add(self, bounds: tuple[float, ...], counts: list[int]) -> None:
        if not self.bounds:
            self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)
        if bounds == self.bounds:
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]

    def since(self, earlier: Histogram) -> Histogram:
        if earlier.bounds != self.bounds:
            return self
        return Histogram(self.bounds, [a - b for a, b in zip(self.counts, earlier.counts, strict=True)])

    @property
    def total(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """Linear interpolation within the bucket holding rank q (Prometheus' histogram_quantile); None when empty."""
        total = self.total
        if not total or not self.bounds:
            return None
        rank, seen = q * total, 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                if i == len(self.bounds):  # the +Inf bucket: the highest bound is all that is known
                    return self.bounds[-1]
                lower = self.bounds[i - 1] if i else 0.0
                return lower + (self.bounds[i] - lower) * (rank - seen) / count
            seen += count
        return self.bounds[-1]


class Reading:
    """Cumulative totals at one moment (monotonic `at`)."""

    __slots__ = ("at", "itl", "keys", "output_tokens", "rejected", "requests", "ttft")

    def __init__(self, at: float) -> None:
        self.at = at
        self.requests: dict[tuple[str, int], int] = {}
        self.output_tokens = 0
        self.rejected: dict[str, int] = {}
        self.keys: dict[str, list[int]] = {}  # name -> [requests, input tokens, output tokens]
        self.ttft = Histogram()
        self.itl = Histogram()


def read(reader: InMemoryMetricReader, at: float) -> Reading:
    reading = Reading(at)
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                _add(reading, metric.name, metric.data.data_points)
    return reading


def _add(reading: Reading, name: str, points: Any) -> None:
    for point in points:
        attributes = point.attributes or {}
        if name == "litestar_llm.requests":
            key = (str(attributes.get(DIALECT)), int(attributes.get("http.response.status_code", 0)))
            reading.requests[key] = reading.requests.get(key, 0) + point.value
            if owner := attributes.get(KEY_NAME):
                reading.keys.setdefault(owner, [0, 0, 0])[0] += point.value
        elif name == "litestar_llm.requests.rejected":
            if attributes.get(DIALECT) == "other":  # /ready's 503 while loading, /ui/status without a key
                continue
            reason = str(attributes.get("reason"))
            reading.rejected[reason] = reading.rejected.get(reason, 0) + point.value
        elif name == "litestar_llm.api_key.tokens":
            slot = 1 if attributes.get("gen_ai.token.type") == "input" else 2
            reading.keys.setdefault(str(attributes.get(KEY_NAME)), [0, 0, 0])[slot] += point.value
        elif name == "gen_ai.client.token.usage":
            if attributes.get("gen_ai.token.type") == "output":
                reading.output_tokens += int(point.sum)
        elif name == "gen_ai.server.time_to_first_token":
            reading.ttft.add(tuple(point.explicit_bounds), list(point.bucket_counts))
        elif name == "gen_ai.server.time_per_output_token":
            reading.itl.add(tuple(point.explicit_bounds), list(point.bucket_counts))


# -- the answer ------------------------------------------------------------------------------------------------


class Percentiles(msgspec.Struct):
    count: int
    """Observations in the window."""
    p50: float | None
    p95: float | None


class RequestCount(msgspec.Struct):
    dialect: str
    status: int
    count: int
    """In the window."""
    per_s: float
    """Over the last RATE_S seconds."""


class Series(msgspec.Struct):
    """One point per interval, oldest first: `t` is seconds before now at the interval's end; null where an
    interval saw nothing to measure."""

    t: list[float]
    output_tokens_per_s: list[float]
    requests_per_s: list[float]
    ttft_p50_s: list[float | None]
    ttft_p95_s: list[float | None]
    itl_p50_s: list[float | None]
    itl_p95_s: list[float | None]


class Traffic(msgspec.Struct):
    window_s: float
    """What the counts, percentiles and series cover (less right after start-up)."""
    output_tokens_per_s: float
    requests_per_s: float
    requests: list[RequestCount]
    refusals: dict[str, int]
    """Requests refused before generation in the window, by reason: auth, rate_limit, overload."""
    ttft_s: Percentiles
    """Time to first token."""
    itl_s: Percentiles
    """Inter-token latency (time per output token after the first)."""
    series: Series


class KeyUsage(msgspec.Struct):
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    """Since the server started."""


class Sampler:
    """Takes a reading every `sample_s` (from the UI plugin's lifespan task) and keeps `window_s` of them."""

    def __init__(self, reader: InMemoryMetricReader | None, sample_s: float, window_s: float) -> None:
        self.reader, self.sample_s, self.window_s = reader, sample_s, window_s
        self.readings: deque[Reading] = deque(maxlen=int(window_s / sample_s) + 1)

    def sample(self) -> None:
        if self.reader is not None:
            self.readings.append(read(self.reader, time.monotonic()))

    def figures(self) -> tuple[Traffic | None, dict[str, KeyUsage]]:
        """Traffic over the window, and each key's totals, as of now (the ring keeps its own pace)."""
        if self.reader is None:
            return None, {}
        latest = read(self.reader, time.monotonic())
        keys = {name: KeyUsage(name, *counts) for name, counts in latest.keys.items()}
        return self._traffic([*self.readings, latest]), keys

    def _traffic(self, readings: list[Reading]) -> Traffic:
        latest = readings[-1]
        oldest = readings[0]
        recent = readings[max(0, _index_before(readings, latest.at - RATE_S))]
        dt = max(latest.at - recent.at, 1e-9)
        rates = {key: (count - recent.requests.get(key, 0)) / dt for key, count in latest.requests.items()}
        requests = []
        for (dialect, status), count in sorted(latest.requests.items()):
            in_window, rate = count - oldest.requests.get((dialect, status), 0), rates[(dialect, status)]
            if in_window or rate:
                requests.append(RequestCount(dialect, status, in_window, round(rate, 3)))
        ttft, itl = latest.ttft.since(oldest.ttft), latest.itl.since(oldest.itl)
        return Traffic(
            window_s=round(latest.at - oldest.at, 1),
            output_tokens_per_s=round((latest.output_tokens - recent.output_tokens) / dt, 2) if dt > 1e-6 else 0.0,
            requests_per_s=round(sum(rates.values()), 3) if dt > 1e-6 else 0.0,
            requests=requests,
            refusals={
                reason: count - oldest.rejected.get(reason, 0)
                for reason, count in sorted(latest.rejected.items())
                if count - oldest.rejected.get(reason, 0)
            },
            ttft_s=Percentiles(ttft.total, _round(ttft.quantile(0.5)), _round(ttft.quantile(0.95))),
            itl_s=Percentiles(itl.total, _round(itl.quantile(0.5)), _round(itl.quantile(0.95))),
            series=_series(readings[:-1] if len(readings) > 2 else readings),  # whole intervals only
        )


def _index_before(readings: list[Reading], at: float) -> int:
    """The last reading taken at or before `at` (0 if none)."""
    return max(0, bisect.bisect_right([r.at for r in readings], at) - 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _series(readings: list[Reading]) -> Series:
    step = max(1, -(-(len(readings) - 1) // CHART_POINTS))
    points = readings[::-1][::step][::-1]  # anchored at the newest reading
    series = Series([], [], [], [], [], [], [])
    now = readings[-1].at
    for before, after in itertools.pairwise(points):
        dt = max(after.at - before.at, 1e-9)
        ttft, itl = after.ttft.since(before.ttft), after.itl.since(before.itl)
        series.t.append(round(after.at - now, 1))
        series.output_tokens_per_s.append(round((after.output_tokens - before.output_tokens) / dt, 2))
        done = sum(after.requests.values()) - sum(before.requests.values())
        series.requests_per_s.append(round(done / dt, 3))
        series.ttft_p50_s.append(_round(ttft.quantile(0.5)))
        series.ttft_p95_s.append(_round(ttft.quantile(0.95)))
        series.itl_p50_s.append(_round(itl.quantile(0.5)))
        series.itl_p95_s.append(_round(itl.quantile(0.95)))
    return series
