"""``GET /metrics`` in the Prometheus text format, in base units with the standard suffixes.

Two kinds of series: what is counted as it happens (HTTP requests by route and status, and the
latency of each answered image, in seconds) lives in this replica's registry; the service's state
(answers and exit ratio per stage, thresholds in use, the audit's state and bound, batch sizes) is
read at each scrape from the same figures ``/metrics.json`` gives, so the two never disagree.
Each ingress replica answers for itself: with several, scrape each (or Ray's own metrics port,
where the ``ray.serve.metrics`` counters of every replica meet).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from .audit import STATES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

REGISTRY = CollectorRegistry()
HTTP_REQUESTS = Counter("tinysaver_http_requests", "HTTP requests answered, by route and status code",
                        ["route", "status"], registry=REGISTRY)
LATENCY = Histogram("tinysaver_request_duration_seconds", "server-side time from arrival to answer, per image",
                    buckets=LATENCY_BUCKETS_S, registry=REGISTRY)


def state_families(stats: dict) -> Iterator[Metric]:
    """The service's state as metric families, from the dict ``/metrics.json`` gives."""
    answers = CounterMetricFamily("tinysaver_answers", "images answered, by the stage that answered", labels=["stage"])
    ratio = GaugeMetricFamily("tinysaver_exit_ratio", "share of the answered images that each stage answered",
                              labels=["stage"])
    for stage, n in stats["exits"].items():
        answers.add_metric([stage], n)
        ratio.add_metric([stage], stats["exit_ratio"][stage])
    yield answers
    yield ratio
    thresholds = GaugeMetricFamily("tinysaver_threshold", "confidence at which a saver stage answers (a stage that "
                                   "never answers has no series)", labels=["stage"])
    for stage, t in zip(stats["stages"], stats["thresholds"]):
        if t is not None:
            thresholds.add_metric([stage], t)
    yield thresholds
    audit = stats["audit"]
    state = GaugeMetricFamily("tinysaver_audit_state", "1 for the audit's current state, 0 for the others",
                              labels=["state"])
    for s in STATES:
        state.add_metric([s], 1.0 if audit["state"] == s else 0.0)
    yield state
    audited = CounterMetricFamily("tinysaver_audited", "early answers also sent to the base")
    audited.add_metric([], audit["audited"])
    yield audited
    if audit["loss_points"]:
        bound = GaugeMetricFamily("tinysaver_audit_loss_upper_bound_ratio", "anytime-valid upper bound on the "
                                  "accuracy given up against the base, as a fraction")
        bound.add_metric([], audit["loss_points"]["upper"] / 100.0)
        yield bound
    gears = stats.get("gears")
    gear = GaugeMetricFamily("tinysaver_gear", "the gear in use (0: the zero-loss policy; always 0 without --gears)")
    gear.add_metric([], gears["in_use"] if gears else 0)
    yield gear
    if gears:
        per_gear = CounterMetricFamily("tinysaver_gear_answers", "images answered, by the gear in use",
                                       labels=["gear"])
        for g, n in enumerate(gears["answers"]):
            per_gear.add_metric([str(g)], n)
        yield per_gear
    batches = HistogramMetricFamily("tinysaver_batch_size", "images per model batch, per stage (fused replicas: "
                                    "'requests' is the requests per engine call)", labels=["stage"])
    for key, sizes in (stats.get("batch_sizes") or {}).items():
        if not sizes:
            continue
        stage = "requests" if key == "fused" else key.removeprefix("fused:")
        edges = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, *map(int, sizes)})
        counts = {int(k): v for k, v in sizes.items()}
        buckets = [(str(float(e)), sum(v for k, v in counts.items() if k <= e)) for e in edges] + \
            [("+Inf", sum(counts.values()))]
        batches.add_metric([stage], buckets, sum_value=sum(k * v for k, v in counts.items()))
    yield batches


class _Now:
    def __init__(self, stats: dict):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return state_families(self.stats)


def render(stats: dict) -> bytes:
    """This replica's counters and the service's state at this moment, as Prometheus text."""
    now = CollectorRegistry()
    now.register(_Now(stats))
    return generate_latest(REGISTRY) + generate_latest(now)


__all__ = ["CONTENT_TYPE", "HTTP_REQUESTS", "LATENCY", "REGISTRY", "render", "state_families"]
