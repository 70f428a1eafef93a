"""Prometheus metrics for a scheduler, with or without the HTTP gateway (needs ``prometheus-client``).

::

    metrics = SchedulerMetrics(scheduler)           # subscribes to the scheduler's task events
    print(metrics.exposition().decode())            # text format; or serve metrics.registry yourself

Counters and histograms are fed by task events (a few microseconds per event); gauges (queue
depth, running tasks, resources in use, executor health) are read from the scheduler when scraped.
Metric names start with ``edgecompute_``; docs/server.md lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import Health, HealthStatus, TaskEvent

if TYPE_CHECKING:
    from ._scheduler import Scheduler

__all__ = ["SchedulerMetrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})


class _SchedulerCollector(Collector):
    def __init__(self, owner: SchedulerMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        stats = self._owner.scheduler.stats()
        yield GaugeMetricFamily("edgecompute_queue_depth", "Tasks waiting for admission", value=stats.queued)
        yield GaugeMetricFamily("edgecompute_running_tasks", "Tasks running now", value=stats.running)
        yield GaugeMetricFamily("edgecompute_retrying_tasks", "Tasks waiting to be retried", value=stats.retrying)
        in_use = GaugeMetricFamily("edgecompute_resources_in_use", "Resources reserved by running tasks",
                                   labels=["resource"])
        capacity = GaugeMetricFamily("edgecompute_resources_capacity", "The scheduler's capacity",
                                     labels=["resource"])
        for name in ("cpu", "memory_mb", "gpus", "gpu_memory_mb"):
            in_use.add_metric([name], float(getattr(stats.in_use, name)))
            capacity.add_metric([name], float(getattr(stats.capacity, name)))
        yield in_use
        yield capacity
        health = GaugeMetricFamily("edgecompute_executor_up",
                                   "1 when the executor's last health check said ok, 0.5 degraded, 0 down",
                                   labels=["executor"])
        for name, status in sorted(self._owner.health.items()):
            health.add_metric([name], {HealthStatus.OK: 1.0, HealthStatus.DEGRADED: 0.5}.get(status.status, 0.0))
        yield health


class SchedulerMetrics:
    """Prometheus collectors for one scheduler, in their own registry (or one you pass)."""

    def __init__(self, scheduler: Scheduler, registry: CollectorRegistry | None = None) -> None:
        self.scheduler = scheduler
        self.registry = registry if registry is not None else CollectorRegistry()
        #: The last health of each executor (see :meth:`check_health`).
        self.health: dict[str, Health] = {}
        self.submitted = Counter("edgecompute_tasks_submitted", "Tasks submitted", ["algorithm"],
                                 registry=self.registry)
        self.finished = Counter("edgecompute_tasks_finished", "Tasks that reached a terminal state",
                                ["algorithm", "state"], registry=self.registry)
        self.errors = Counter("edgecompute_task_errors", "Failed, cancelled and timed-out tasks by error type",
                              ["algorithm", "error"], registry=self.registry)
        self.retries = Counter("edgecompute_task_retries", "Retries scheduled", ["algorithm"], registry=self.registry)
        self.latency = Histogram("edgecompute_task_seconds", "Time from submission to the terminal state",
                                 ["algorithm", "state"], buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_SchedulerCollector(self))
        self._submitted_at: dict[str, float] = {}
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._submitted_children: dict[str, Any] = {}
        self._unsubscribe = scheduler.subscribe(self._observe)

    def close(self) -> None:
        """Stop observing the scheduler."""
        self._unsubscribe()

    def _observe(self, event: TaskEvent) -> None:
        kind = event.kind
        if kind == "submitted":
            self._submitted_at[event.task_id] = event.time
            counter = self._submitted_children.get(event.algorithm)
            if counter is None:
                counter = self._submitted_children[event.algorithm] = self.submitted.labels(event.algorithm)
            counter.inc()
        elif kind in _TERMINAL:
            children = self._children.get((event.algorithm, kind))
            if children is None:  # labels() costs a few microseconds: resolve each pair once
                children = (self.finished.labels(event.algorithm, kind), self.latency.labels(event.algorithm, kind))
                self._children[(event.algorithm, kind)] = children
            children[0].inc()
            started = self._submitted_at.pop(event.task_id, None)
            if started is not None:
                children[1].observe(max(0.0, event.time - started))
            if event.error is not None:
                self.errors.labels(event.algorithm, type(event.error).__name__).inc()
        elif kind == "retrying":
            self.retries.labels(event.algorithm).inc()

    async def check_health(self) -> dict[str, Health]:
        """Ask every executor for its health and keep the answers for ``edgecompute_executor_up``."""
        self.health = dict(await self.scheduler.registry.health())
        return self.health

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
