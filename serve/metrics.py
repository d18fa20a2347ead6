"""Prometheus metrics of the app (`GET /metrics`): requests by route and status, their latency,
and per model the batch sizes run and the requests in the replica not yet answered.

Each replica counts its own; labels name the replica, so a scrape through the load balancer says
which one answered."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
disable_created_metrics()  # `_created` series double every metric for nothing a scraper here uses


class _ModelStats:
    """Batch sizes and queue depth per model, from the models' own `stats()` at scrape time."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.snapshot: dict[str, dict[str, Any]] = {}

    def collect(self) -> Iterator[Metric]:
        batches = HistogramMetricFamily(
            "surgery_batch_size", "Rows per forward the model ran.", labels=["model", "replica"]
        )
        depth = GaugeMetricFamily(
            "surgery_queue_depth",
            "Requests in the model's replica not answered yet (decoding, queued or running).",
            labels=["model", "replica"],
        )
        for model, stats in sorted(self.snapshot.items()):
            sizes = {int(k): int(v) for k, v in (stats.get("batch_sizes") or {}).items()}
            buckets = [(str(b), sum(n for size, n in sizes.items() if size <= b)) for b in BATCH_BUCKETS]
            buckets.append(("+Inf", sum(sizes.values())))
            total = float(sum(size * n for size, n in sizes.items()))
            batches.add_metric([model, self.replica], buckets, total)
            depth.add_metric([model, self.replica], float(stats.get("queue_depth", 0)))
        yield batches
        yield depth


class AppMetrics:
    """The metrics one ingress replica exposes."""

    def __init__(self, replica: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "surgery_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status", "replica"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "surgery_request_duration_seconds",
            "Time from the request reaching the app to its response, by route.",
            ["route", "replica"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._replica = replica
        self._models = _ModelStats("")
        self.registry.register(self._models)

    @property
    def replica(self) -> str:
        """The Ray Serve replica this runs in ("" outside one), asked once."""
        if self._replica is None:
            try:
                from ray import serve

                self._replica = serve.get_replica_context().replica_id.unique_id
            except Exception:  # not in a replica
                self._replica = ""
        return self._replica

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status), self.replica).inc()
        self.latency.labels(route, self.replica).observe(seconds)

    def render(self, model_stats: dict[str, dict[str, Any]]) -> bytes:
        """The exposition text, with the models' stats as given."""
        self._models.replica = self.replica
        self._models.snapshot = model_stats
        return generate_latest(self.registry)
