"""Prometheus metrics of one daemon: operations, paused windows, copies, compression jobs.

Operation metrics are counted as operations end; compression-job metrics are read at
scrape time from the data root (the jobs run in worker processes, not in the daemon).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

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
WAKE_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 30)
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


class _HeldConnections(Collector):
    """Connections the relays hold while their instance wakes, read at scrape time (the
    relays are processes of their own)."""

    def __init__(self, data_root: DataRoot) -> None:
        self._data_root = data_root

    def collect(self) -> Iterable[Metric]:
        from torpor.network.activity import read_activity

        held = sum(read_activity(self._data_root.instance(d.name).publisher_activity).held
                   for d in _instance_dirs(self._data_root))
        yield GaugeMetricFamily("torpor_held_connections",
                                "Connections to published ports held while their instance "
                                "wakes", value=held)


def _instance_dirs(data_root: DataRoot) -> list[Path]:
    try:
        return [d for d in data_root.instances_dir.iterdir() if d.is_dir()]
    except OSError:
        return []


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
        self.wakes = Counter(
            "torpor_wakes", "Wakes on traffic, by result (ok or error)", ["result"],
            registry=self.registry)
        for result in ("ok", "error"):
            self.wakes.labels(result)  # exported from the start, at 0
        self.wake_seconds = Histogram(
            "torpor_wake_seconds", "Wake on traffic: a held connection's accept to its first"
            " byte forwarded to the guest", buckets=WAKE_BUCKETS, registry=self.registry)
        self.auto_standby = Counter(
            "torpor_auto_standby", "Standbys the daemon started on idle instances",
            registry=self.registry)
        self.registry.register(_HeldConnections(data_root))

    def count_waiting_qemus(self, waiting: Callable[[], int]) -> None:
        """The restore pool's QEMUs (api/pool.py), counted at scrape time."""
        Gauge("torpor_restore_pool_qemus", "QEMUs started ahead of a restore, waiting",
              registry=self.registry).set_function(waiting)

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
