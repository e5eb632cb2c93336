"""Pure helpers of bench/bench_operator.py: quantiles of measured latencies, and the API server's request
latency over a window from two scrapes of its Prometheus `/metrics` (histogram buckets diffed, then the
quantile the way PromQL's `histogram_quantile` computes it). Tested in tests/test_bench_operator.py.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUEST_DURATION = "apiserver_request_duration_seconds"
LONG_RUNNING = {"WATCH", "CONNECT"}  # their durations are how long a stream stayed open, not a latency

Buckets = dict[float, float]  # upper bound (le) -> cumulative count
Series = dict[tuple[str, ...], Buckets]  # label values -> buckets


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (0 < q < 1) of measured values, interpolated between the closest ranks (statistics'
    "inclusive" method, numpy's default); None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def histograms(text: str, metric: str, by: tuple[str, ...]) -> Series:
    """The histogram `metric` in a Prometheus text exposition, its buckets summed over every label but `by`."""
    out: dict[tuple[str, ...], Buckets] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name == f"{metric}_bucket":
                key = tuple(sample.labels.get(label, "") for label in by)
                out[key][float(sample.labels["le"])] += sample.value
    return {key: dict(buckets) for key, buckets in out.items()}


def diff(after: Series, before: Series) -> Series:
    """What was observed between two scrapes: the later buckets minus the earlier ones (a series new in the later
    scrape counts from zero); series with no observation in between are left out."""
    out = {}
    for key, buckets in after.items():
        earlier = before.get(key, {})
        d = {le: count - earlier.get(le, 0.0) for le, count in buckets.items()}
        if d.get(math.inf, 0) > 0:
            out[key] = d
    return out


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """PromQL's histogram_quantile: the bucket where the rank q * total falls, interpolated linearly inside it
    (from 0 for the first bucket); in the +Inf bucket, the highest finite bound. None without observations."""
    bounds = sorted(buckets)
    total = buckets.get(math.inf, 0.0)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == math.inf:
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass(frozen=True)
class Latency:
    verb: str
    resource: str  # with its subresource: "finetunejobs/status"
    requests: int
    p50: float | None
    p99: float | None


def request_latencies(before: str, after: str, top: int = 12) -> list[Latency]:
    """The API server's request latency by verb and resource between two scrapes of its /metrics, the `top`
    most frequent first; long-running requests (WATCH, CONNECT) are left out."""
    by = ("verb", "resource", "subresource")
    window = diff(histograms(after, REQUEST_DURATION, by), histograms(before, REQUEST_DURATION, by))
    rows = [Latency(verb, f"{resource}/{sub}" if sub else resource, round(buckets[math.inf]),
                    histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets))
            for (verb, resource, sub), buckets in window.items() if verb not in LONG_RUNNING]
    return sorted(rows, key=lambda r: (-r.requests, r.verb, r.resource))[:top]
