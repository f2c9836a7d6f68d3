"""Prometheus metrics of one daemon: operations, paused windows, copies, compression jobs.

Operation metrics are counted as operations end; compression-job metrics are read at
scrape time from the data root (the jobs run in worker processes, not in the daemon).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from torpor.instances.info import CompressionState
from torpor.instances.observe import ProgressObserver
from torpor.jobs.compression import load_stats
from torpor.paths import DataRoot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
PAUSE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _CompressionJobs(Collector):
    def __init__(self, data_root: DataRoot,
                 states: Callable[[], Iterable[CompressionState]]) -> None:
        self._data_root = data_root
        self._states = states

    def collect(self) -> Iterable[Metric]:
        stats = load_stats(self._data_root)
        outcomes = CounterMetricFamily("torpor_compression_jobs",
                                       "Background compression jobs ended, by outcome",
                                       labels=["outcome"])
        for outcome in ("completed", "failed", "preempted", "skipped"):
            outcomes.add_metric([outcome], getattr(stats, outcome))
        yield outcomes
        yield CounterMetricFamily("torpor_compression_bytes_saved",
                                  "Bytes background compression saved on disk",
                                  value=stats.bytes_saved)
        yield SummaryMetricFamily("torpor_compression_job_duration_seconds",
                                  "Time background compression jobs spent working",
                                  count_value=stats.completed, sum_value=stats.seconds_total)
        states = list(self._states())
        yield GaugeMetricFamily("torpor_compression_jobs_active",
                                "Background compression jobs compressing now",
                                value=states.count(CompressionState.COMPRESSING))
        yield GaugeMetricFamily("torpor_compression_jobs_pending",
                                "Background compression jobs waiting (delay or a free slot)",
                                value=states.count(CompressionState.PENDING))


class Metrics:
    def __init__(self, data_root: DataRoot,
                 compression_states: Callable[[], Iterable[CompressionState]]) -> None:
        self.registry = CollectorRegistry()
        self.operations = Counter(
            "torpor_operations", "Operations ended, by kind and result (ok or error code)",
            ["kind", "result"], registry=self.registry)
        self.durations = Histogram(
            "torpor_operation_duration_seconds", "How long operations took",
            ["kind"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.in_progress = Gauge(
            "torpor_operations_in_progress", "Operations running now", ["kind"],
            registry=self.registry)
        self.paused = Histogram(
            "torpor_paused_window_seconds", "How long a running VM was paused (standby: "
            "pause to QEMU stopped; snapshot: pause to resume)", ["kind"],
            buckets=PAUSE_BUCKETS, registry=self.registry)
        self.copied = Counter(
            "torpor_copy_bytes", "Bytes copied, by method (reflink clones or sparse copies)",
            ["method"], registry=self.registry)
        self.registry.register(_CompressionJobs(data_root, compression_states))

    def operation_ended(self, kind: str, result: str, seconds: float,
                        observer: ProgressObserver) -> None:
        self.operations.labels(kind, result).inc()
        self.durations.labels(kind).observe(seconds)
        paused = observer.phases.get("paused_window")
        if paused is not None:
            self.paused.labels(kind).observe(paused)
        for report in observer.copies:
            self.copied.labels("reflink").inc(report.bytes_cloned)
            self.copied.labels("sparse").inc(report.bytes_written)

    def render(self) -> bytes:
        return generate_latest(self.registry)
