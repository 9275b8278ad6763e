"""Prometheus metrics as a view of the last published state.

A custom collector builds fresh metric families on every scrape from an immutable View, so a
child that is gone simply has no series: there is no purge code and no label leak.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import utils as _prometheus_utils
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from celery_memguard._version import __version__
from celery_memguard.daemon.snapshot import Child, Leak, Worker
from celery_memguard.daemon.view import View
from celery_memguard.protocol.cgroups import ContainerReading

PREFIX = "celery_memguard_"
_le: Callable[[float], str] = _prometheus_utils.floatToGoString  # bucket bounds as clients print them


def _leak(get: Callable[[Leak], float | None]) -> Callable[[Child], float | None]:
    return lambda c: get(c.leak) if c.leak is not None else None


_CHILD_GAUGES: tuple[tuple[str, str, Callable[[Child], float | None]], ...] = (
    ("child_rss_bytes", "Resident set size of each live pool child.", lambda c: c.rss),
    ("child_uss_bytes", "Unique set size (what recycling frees): near a limit, or of a leaking child.",
     lambda c: c.uss),
    ("child_tasks", "Tasks run by the current process of each pool slot.", lambda c: c.tasks),
    ("child_busy", "1 while the child runs a task, 0 when idle.", lambda c: 1 if c.task else 0),
    ("child_leak_bytes_per_task",
     "Robust slope of a child's RSS over its recent tasks (once it has 8 samples).",
     _leak(lambda leak: leak.trend.bytes_per_task)),
    ("child_leak_bytes_per_second", "The same growth per second, at the child's recent task rate.",
     _leak(lambda leak: leak.trend.bytes_per_second)),
    ("child_leaking", "1 when the trend is a steady leak (not a warm-up plateau, a step or spikes).",
     _leak(lambda leak: 1 if leak.trend.leaking else 0)),
    ("child_seconds_to_limit", "Seconds until a leaking child reaches its soft limit at its current rate.",
     _leak(lambda leak: leak.seconds_to_soft)),
    ("child_tasks_to_limit", "Tasks until a leaking child reaches its soft limit at its current rate.",
     _leak(lambda leak: leak.tasks_to_soft)),
)

_WORKER_GAUGES: tuple[tuple[str, str, Callable[[Worker], float | None]], ...] = (
    ("worker_rss_bytes",
     "Resident set size of a worker: its main process plus its pool children (pages shared "
     "copy-on-write are counted in each).", lambda w: w.rss + sum(c.rss for c in w.children)),
    ("worker_children", "Live pool children of a worker.", lambda w: len(w.children)),
    ("recommended_max_tasks_per_child",
     "The --max-tasks-per-child that the fastest observed leak calls for to stay under the soft "
     "limit (absent while no child leaks).", lambda w: w.recommended_max_tasks or None),
)


_CONTAINER_GAUGES: tuple[tuple[str, str, Callable[[ContainerReading], float | None]], ...] = (
    ("container_memory_usage_bytes",
     "Memory charged to the worker's container (its memory cgroup), page cache included.",
     lambda c: c.usage),
    ("container_memory_working_set_bytes",
     "The container's usage less its inactive page cache: what the kernel cannot drop before "
     "it kills, and what Kubernetes judges.", lambda c: c.working_set),
    ("container_memory_limit_bytes", "The memory limit that binds the worker's container.",
     lambda c: c.limit),
    ("container_memory_high_bytes", "The container's memory.high throttling line (cgroup v2).",
     lambda c: c.high),
)


def _containers(workers: tuple[Worker, ...]) -> Iterator[Any]:
    """Each worker's container as the kernel judges it, where the daemon can read it."""
    seen = [w for w in workers if w.container is not None]
    for name, doc, get in _CONTAINER_GAUGES:
        family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
        for worker in seen:
            assert worker.container is not None
            value = get(worker.container)
            if value is not None:
                family.add_metric([worker.name], value)
        yield family
    events = CounterMetricFamily(
        PREFIX + "container_memory_events", "The kernel's memory event counters of the worker's "
        "container: oom, oom_kill, high (throttled over memory.high), max (at the limit; "
        "cgroup v1: memory.failcnt).", labels=["worker", "event"])
    pressure = GaugeMetricFamily(
        PREFIX + "container_memory_pressure", "Share of the last 10 s in which some (or all) "
        "of the container's tasks stalled on memory (PSI avg10; the system's where the "
        "container has none).", labels=["worker", "kind"])
    stalled = CounterMetricFamily(
        PREFIX + "container_memory_pressure_seconds", "Time the container's tasks stalled on "
        "memory (PSI total).", labels=["worker", "kind"])
    for worker in seen:
        assert worker.container is not None
        for event, count in sorted(worker.container.events.items()):
            events.add_metric([worker.name, event], count)
        psi = worker.container.pressure
        if psi is not None:
            for kind, ratio, total in (("some", psi.some_avg10, psi.some_total),
                                       ("full", psi.full_avg10, psi.full_total)):
                pressure.add_metric([worker.name, kind], ratio)
                stalled.add_metric([worker.name, kind], total)
    yield from (events, pressure, stalled)


class StateCollector(Collector):
    """Yields fresh families from the current View on every scrape."""

    def __init__(self, view: Callable[[], View]) -> None:
        self._view = view

    def collect(self) -> Iterator[Any]:
        view = self._view()
        workers = view.snapshot.workers
        for name, doc, get in _CHILD_GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker", "index"])
            for worker in workers:
                for child in worker.children:
                    value = get(child)
                    if value is not None:
                        family.add_metric([worker.name, str(child.index)], value)
            yield family
        for name, doc, get_worker in _WORKER_GAUGES:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
            for worker in workers:
                value = get_worker(worker)
                if value is not None:
                    family.add_metric([worker.name], value)
            yield family
        info = InfoMetricFamily(
            PREFIX + "worker", "A supervised worker: its pool; agent, true where an agent "
            "reports for it (false: observe-only); agent_state, full (every hook joined), "
            "degraded (running with hooks missing: agent_hook_missing names them) or none.",
            labels=["worker"])
        missing = GaugeMetricFamily(
            PREFIX + "agent_hook_missing", "1 for each Celery or billiard internal a worker's "
            "agent could not join (celery-memguard doctor says what is lost and what to do).",
            labels=["worker", "hook"])
        limit = GaugeMetricFamily(
            PREFIX + "limit_bytes", "The limits in force, in bytes, per worker and level: soft "
            "and hard (each child), container_soft and container_hard (its container's lines, "
            "where it has a memory limit).",
            labels=["worker", "level"])
        for worker in workers:
            info.add_metric([worker.name], {
                "pool": worker.pool, "agent": str(worker.agent_state != "none").lower(),
                "agent_state": worker.agent_state,
                "concurrency": str(worker.concurrency),
                "max_tasks_per_child": str(worker.max_tasks or 0),
            })
            for level, size in view.worker_limits.get(worker.name, view.limits).items():
                limit.add_metric([worker.name, level], size)
            for hook in worker.missing:
                missing.add_metric([worker.name, hook], 1)
        yield from (info, missing, limit)
        yield from _containers(workers)
        yield from self._counters(view)

    def _counters(self, view: View) -> Iterator[Any]:
        counters: tuple[tuple[str, str, list[str], Mapping[Any, float]], ...] = (
            ("recycles", "Recycle requests delivered to pool children, by reason.",
             ["worker", "reason"], view.recycles),
            ("dry_run_recycles", "Recycles that dry_run logged instead of requesting, by reason.",
             ["worker", "reason"], view.dry_run_recycles),
            ("interrupted_tasks",
             "Tasks stopped for memory, by task name (bounded) and reason: hard (interrupted "
             "at the hard limit), kill (its child killed by kill escalation), oom (its child "
             "killed by the OOM killer), killed (its child killed by a SIGKILL neither the "
             "kernel's OOM killer nor celery-memguard sent), sigkill (a SIGKILL where no OOM "
             "counter could be read).",
             ["worker", "task", "reason"], view.interrupted),
            ("oom_kills",
             "Pool children the kernel's OOM killer killed (its counter moved), by the task they "
             "ran (\"\" when none or unknown).",
             ["worker", "task"], view.oom_kills),
            ("worker_restarts",
             "Whole-worker restarts of pools without children: reason soft (warm shutdown) or "
             "hard (cold shutdown).", ["worker", "reason"], view.restarts),
            ("task_holds",
             "Tasks a child waited to start until its container had room (outcome room), or "
             "started anyway after limits.container_hold (outcome gave_up).",
             ["worker", "outcome"], view.holds),
            ("task_hold_seconds", "Time children waited for their container to have room.",
             ["worker"], view.hold_seconds),
            ("container_memory_stalls",
             "Memory stall triggers (PSI) of the worker's container that woke the daemon between "
             "ticks: its container was read and decided on at once.",
             ["worker"], view.stalls),
            ("messages", "Agent messages accepted, by type.", ["type"], view.messages),
            ("messages_dropped", "Agent datagrams refused, by reason.", ["reason"], view.dropped),
        )
        for name, doc, labels, values in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for key, count in sorted(values.items()):
                family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
            yield family
        growth = HistogramMetricFamily(
            PREFIX + "task_memory_growth_bytes",
            "RSS a task execution left behind (after minus before), by task name (bounded).",
            labels=["task"])
        for task, (buckets, total) in sorted(view.growth.items()):
            growth.add_metric([task], [(_le(le), n) for le, n in buckets], total)
        memory = GaugeMetricFamily(
            PREFIX + "memory_total_bytes",
            "The memory that percentage limits resolve against: the cgroup limit, else the host's.",
            labels=["source"])
        memory.add_metric([view.memory[1]], view.memory[0])
        needs = GaugeMetricFamily(
            PREFIX + "task_peak_growth_bytes",
            "The most one run of a task raised its child's RSS at its peak (what it needs to "
            "start: the children's container headroom check uses it), by task name (bounded).",
            labels=["task"])
        for task, need in sorted(view.needs.items()):
            needs.add_metric([task], need)
        quarantined = GaugeMetricFamily(
            PREFIX + "quarantined_task_ids",
            "Task ids no child may run again (quarantine.after incidents each); refusals are "
            "interrupted_tasks_total{reason=\"quarantined\"}.")
        quarantined.add_metric([], view.quarantined)
        connections = GaugeMetricFamily(
            PREFIX + "agent_connections",
            "Agent processes (worker main processes and pool children) connected to the socket.")
        connections.add_metric([], view.connections)
        build = InfoMetricFamily(PREFIX + "build", "celery-memguard version.")
        build.add_metric([], {"version": __version__})
        yield from (growth, needs, memory, quarantined, connections, build)


class Metrics:
    """Our own registry: the state collector plus the daemon's self-metrics."""

    def __init__(self, view: Callable[[], View]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(view))
        self.tick_seconds = Histogram(
            PREFIX + "tick_seconds", "Time one sampling tick takes (scan, sample, decide, act).",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
