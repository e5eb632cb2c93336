"""The pure helpers of `make bench-operator` (bench/bench_stats.py): quantiles of measured latencies, and the API
server's request latency over a window from two scrapes of its /metrics."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_stats", Path(__file__).parents[1] / "bench" / "bench_stats.py")
bench_stats = sys.modules.setdefault("bench_stats", importlib.util.module_from_spec(_spec))  # dataclasses look it up
_spec.loader.exec_module(bench_stats)

INF = math.inf
LE = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # a few of the API server's bounds
METRIC = "apiserver_request_duration_seconds"


def exposition(series: list[tuple[dict[str, str], list[float]]]) -> str:
    """A Prometheus text exposition of the request-duration histogram: (labels, cumulative counts per LE and +Inf)."""
    lines = [f"# HELP {METRIC} Response latency distribution in seconds.", f"# TYPE {METRIC} histogram"]
    for labels, counts in series:
        base = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for le, count in zip([*map(str, LE), "+Inf"], counts, strict=True):
            lines.append(f'{METRIC}_bucket{{{base},le="{le}"}} {count}')
        lines += [f"{METRIC}_sum{{{base}}} 1.0", f"{METRIC}_count{{{base}}} {counts[-1]}"]
    lines += ["# HELP other_total Something else.", "# TYPE other_total counter", "other_total 3"]
    return "\n".join(lines) + "\n"


def labels(verb: str, resource: str, subresource: str = "", scope: str = "namespace") -> dict[str, str]:
    return {"component": "apiserver", "dry_run": "", "group": "", "resource": resource, "scope": scope,
            "subresource": subresource, "verb": verb, "version": "v1"}


def test_quantile_matches_numpys_linear_interpolation():
    values = [random.Random(7).expovariate(2) for _ in range(257)]
    for q in (0.5, 0.9, 0.99):
        assert bench_stats.quantile(values, q) == pytest.approx(np.percentile(values, 100 * q))
    assert bench_stats.quantile(list(range(1, 101)), 0.99) == pytest.approx(99.01)


def test_quantile_of_one_value_and_of_none():
    assert bench_stats.quantile([0.3], 0.99) == 0.3
    assert bench_stats.quantile([], 0.5) is None


def test_histogram_quantile_interpolates_inside_the_bucket_as_promql_does():
    buckets = {0.1: 10, 0.2: 30, 0.4: 40, INF: 40}
    assert bench_stats.histogram_quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: half-way through (0.1, 0.2]
    assert bench_stats.histogram_quantile(0.99, buckets) == pytest.approx(0.392)
    assert bench_stats.histogram_quantile(0.1, buckets) == pytest.approx(0.04)  # the first bucket starts at 0


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_finite_bound():
    assert bench_stats.histogram_quantile(0.5, {0.1: 1, 0.2: 1, INF: 10}) == 0.2


def test_histogram_quantile_without_observations_is_none():
    assert bench_stats.histogram_quantile(0.5, {0.1: 0, INF: 0}) is None
    assert bench_stats.histogram_quantile(0.5, {}) is None


def test_histograms_sum_the_other_labels():
    text = exposition([(labels("GET", "pods", scope="namespace"), [1, 2, 2, 2, 2, 2, 2]),
                       (labels("GET", "pods", scope="cluster"), [0, 1, 3, 3, 3, 3, 3])])
    found = bench_stats.histograms(text, METRIC, ("verb", "resource"))
    assert found == {("GET", "pods"): {0.05: 1, 0.1: 3, 0.2: 5, 0.4: 5, 0.8: 5, 1.6: 5, INF: 5}}


def test_diff_keeps_what_was_observed_in_between():
    before = {("POST", "jobs"): {0.1: 5, INF: 5}, ("GET", "pods"): {0.1: 2, INF: 3}}
    after = {("POST", "jobs"): {0.1: 7, INF: 9}, ("GET", "pods"): {0.1: 2, INF: 3}, ("LIST", "pods"): {0.1: 1, INF: 1}}
    assert bench_stats.diff(after, before) == {("POST", "jobs"): {0.1: 2, INF: 4}, ("LIST", "pods"): {0.1: 1, INF: 1}}


def test_request_latencies_over_a_window_by_verb_and_resource():
    before = exposition([(labels("POST", "jobs"), [0, 0, 0, 0, 0, 0, 0]),
                         (labels("WATCH", "jobs"), [0, 0, 0, 0, 0, 0, 1]),
                         (labels("GET", "configmaps"), [4, 4, 4, 4, 4, 4, 4])])
    after = exposition([(labels("POST", "jobs"), [0, 10, 20, 20, 20, 20, 20]),  # 20 in the window
                        (labels("WATCH", "jobs"), [0, 0, 0, 0, 0, 0, 3]),  # long-running: left out
                        (labels("GET", "configmaps"), [4, 4, 4, 4, 4, 4, 4]),  # none in the window
                        (labels("PATCH", "finetunejobs", "status"), [0, 0, 0, 0, 2, 4, 4])])  # new since
    rows = bench_stats.request_latencies(before, after)
    assert [(r.verb, r.resource, r.requests) for r in rows] == [("POST", "jobs", 20),
                                                                ("PATCH", "finetunejobs/status", 4)]
    assert rows[0].p50 == pytest.approx(0.1) and rows[0].p99 == pytest.approx(0.198)
    assert rows[1].p50 == pytest.approx(0.8) and rows[1].p99 == pytest.approx(1.584)
    assert len(bench_stats.request_latencies(before, after, top=1)) == 1
