"""Prometheus metrics as a view of the last published state, and the HTTP server.

A custom collector builds fresh metric families on every scrape from an immutable View, so a
child that is gone simply has no series: there is no purge code and no label leak. The loop
publishes a new View after each tick and each message-driven decision.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import utils as _prometheus_utils
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from celery_memguard import __version__
from celery_memguard.growth import Ranked
from celery_memguard.model import Snapshot

PREFIX = "celery_memguard_"
_le: Callable[[float], str] = _prometheus_utils.floatToGoString  # bucket bounds as clients print them


@dataclass(frozen=True)
class View:
    """Everything a scrape or /status shows, copied out of the loop's state at one moment."""

    snapshot: Snapshot
    limits: dict[str, int]  # level -> bytes
    measure: str
    dry_run: bool
    recycles: dict[tuple[str, str], int] = field(default_factory=dict)
    dry_run_recycles: dict[tuple[str, str], int] = field(default_factory=dict)
    interrupted: dict[tuple[str, str, str], int] = field(default_factory=dict)
    oom_kills: dict[str, int] = field(default_factory=dict)
    restarts: dict[tuple[str, str], int] = field(default_factory=dict)
    growth: dict[str, tuple[list[tuple[float, int]], int]] = field(default_factory=dict)
    ranking: tuple[Ranked, ...] = ()
    messages: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    memory: tuple[int, str] = (0, "host")  # the total percentages resolve against, its source
    published_at: float = 0.0  # monotonic
    started_at: float = 0.0  # wall clock


class StateCollector(Collector):
    """Yields the per-worker and per-child families from the current View."""

    def __init__(self, view: Callable[[], View]) -> None:
        self._view = view

    def collect(self) -> Iterator[Any]:
        view = self._view()
        child_rss = GaugeMetricFamily(
            PREFIX + "child_rss_bytes", "Resident set size of each live pool child.",
            labels=["worker", "index"])
        child_uss = GaugeMetricFamily(
            PREFIX + "child_uss_bytes",
            "Unique set size (what recycling frees), where it was sampled to decide.",
            labels=["worker", "index"])
        child_tasks = GaugeMetricFamily(
            PREFIX + "child_tasks", "Tasks run by the current process of each pool slot.",
            labels=["worker", "index"])
        child_busy = GaugeMetricFamily(
            PREFIX + "child_busy", "1 while the child runs a task, 0 when idle.",
            labels=["worker", "index"])
        worker_rss = GaugeMetricFamily(
            PREFIX + "worker_rss_bytes",
            "Resident set size of a worker: its main process plus its pool children "
            "(pages shared copy-on-write are counted in each).",
            labels=["worker"])
        worker_children = GaugeMetricFamily(
            PREFIX + "worker_children", "Live pool children of a worker.", labels=["worker"])
        info = InfoMetricFamily(
            PREFIX + "worker", "A supervised worker: its pool and whether its agent reports.",
            labels=["worker"])
        limit = GaugeMetricFamily(
            PREFIX + "limit_bytes", "The limits in force, in bytes, per worker and level.",
            labels=["worker", "level"])
        for worker in view.snapshot.workers:
            total = worker.rss
            for child in worker.children:
                labels = [worker.name, str(child.index)]
                child_rss.add_metric(labels, child.rss)
                if child.uss is not None:
                    child_uss.add_metric(labels, child.uss)
                child_tasks.add_metric(labels, child.tasks)
                child_busy.add_metric(labels, 1 if child.task else 0)
                total += child.rss
            worker_rss.add_metric([worker.name], total)
            worker_children.add_metric([worker.name], len(worker.children))
            info.add_metric([worker.name], {
                "pool": worker.pool, "agent": "true" if worker.agent else "false",
                "concurrency": str(worker.concurrency),
                "max_tasks_per_child": str(worker.max_tasks or 0),
            })
            for level, size in view.limits.items():
                limit.add_metric([worker.name, level], size)
        yield from (child_rss, child_uss, child_tasks, child_busy, worker_rss, worker_children,
                    info, limit)

        recycles = CounterMetricFamily(
            PREFIX + "recycles", "Recycle requests delivered to pool children, by reason.",
            labels=["worker", "reason"])
        for (worker_name, reason), count in sorted(view.recycles.items()):
            recycles.add_metric([worker_name, reason], count)
        would = CounterMetricFamily(
            PREFIX + "dry_run_recycles",
            "Recycles that dry_run logged instead of requesting, by reason.",
            labels=["worker", "reason"])
        for (worker_name, reason), count in sorted(view.dry_run_recycles.items()):
            would.add_metric([worker_name, reason], count)
        interrupted = CounterMetricFamily(
            PREFIX + "interrupted_tasks",
            "Tasks interrupted or killed for memory, by task name (bounded) and reason.",
            labels=["worker", "task", "reason"])
        for (worker_name, task, reason), count in sorted(view.interrupted.items()):
            interrupted.add_metric([worker_name, task, reason], count)
        oom = CounterMetricFamily(
            PREFIX + "oom_kills",
            "Pool children killed by a SIGKILL celery-memguard did not send (the OOM killer).",
            labels=["worker"])
        for worker_name, count in sorted(view.oom_kills.items()):
            oom.add_metric([worker_name], count)
        growth = HistogramMetricFamily(
            PREFIX + "task_memory_growth_bytes",
            "RSS a task execution left behind (after minus before), by task name (bounded).",
            labels=["task"])
        for task, (buckets, total) in sorted(view.growth.items()):
            growth.add_metric([task], [(_le(le), n) for le, n in buckets], total)
        restarts = CounterMetricFamily(
            PREFIX + "worker_restarts",
            "Whole-worker restarts of pools without children: reason soft (warm shutdown) or "
            "hard (cold shutdown).", labels=["worker", "reason"])
        for (worker_name, reason), count in sorted(view.restarts.items()):
            restarts.add_metric([worker_name, reason], count)
        messages = CounterMetricFamily(
            PREFIX + "messages", "Agent messages accepted, by type.", labels=["type"])
        for kind, count in sorted(view.messages.items()):
            messages.add_metric([kind], count)
        dropped = CounterMetricFamily(
            PREFIX + "messages_dropped", "Agent datagrams refused, by reason.", labels=["reason"])
        for reason, count in sorted(view.dropped.items()):
            dropped.add_metric([reason], count)
        memory = GaugeMetricFamily(
            PREFIX + "memory_total_bytes",
            "The memory that percentage limits resolve against: the cgroup limit, else the host's.",
            labels=["source"])
        memory.add_metric([view.memory[1]], view.memory[0])
        build = InfoMetricFamily(PREFIX + "build", "celery-memguard version.")
        build.add_metric([], {"version": __version__})
        yield from (recycles, would, interrupted, oom, growth, restarts, messages, dropped,
                    memory, build)


class Metrics:
    """Our own registry: the state collector plus the daemon's self-metrics."""

    def __init__(self, view: Callable[[], View]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StateCollector(view))
        self.tick_seconds = Histogram(
            PREFIX + "tick_seconds", "Time one sampling tick takes (scan, sample, decide, act).",
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpServer:
    """Serves /metrics, /healthz and /status from a daemon thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, view: Callable[[], View],
                 healthy: Callable[[], bool], status: Callable[[View], dict[str, Any]]) -> None:
        handler = _make_handler(metrics, view, healthy, status)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="memguard-http",
                                        kwargs={"poll_interval": 0.25}, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(metrics: Metrics, view: Callable[[], View], healthy: Callable[[], bool],
                  status: Callable[[View], dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"celery-memguard/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.render())
            elif path == "/healthz":
                ok = healthy()
                self._send(200 if ok else 503, "text/plain; charset=utf-8",
                           b"ok\n" if ok else b"sampling loop stalled\n")
            elif path == "/status":
                body = json.dumps(status(view()), indent=1).encode()
                self._send(200, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


def status_document(view: View) -> dict[str, Any]:
    """The JSON behind /status and ``celery-memguard status``."""
    now = time.monotonic()
    workers = []
    for worker in view.snapshot.workers:
        children = []
        for child in worker.children:
            if child.leaving:
                state = "leaving"
            elif child.requested_at is not None:
                state = "recycling"
            elif child.task:
                state = "busy"
            else:
                state = "idle"
            children.append({
                "index": child.index, "pid": child.pid, "rss_bytes": child.rss,
                "uss_bytes": child.uss, "tasks": child.tasks, "task": child.task,
                "state": state, "agent": child.agent,
                "requested_seconds_ago": (round(now - child.requested_at, 3)
                                          if child.requested_at is not None else None),
            })
        workers.append({
            "name": worker.name, "pid": worker.pid, "pool": worker.pool,
            "concurrency": worker.concurrency, "agent": worker.agent,
            "max_tasks_per_child": worker.max_tasks, "main_rss_bytes": worker.rss,
            "recycles": {reason: n for (name, reason), n in view.recycles.items()
                         if name == worker.name},
            "restarts": {reason: n for (name, reason), n in view.restarts.items()
                         if name == worker.name},
            "restartable": worker.restartable,
            "children": children,
        })
    return {
        "version": __version__, "limits": view.limits, "measure": view.measure,
        "dry_run": view.dry_run, "started_at": view.started_at,
        "memory_total_bytes": view.memory[0], "memory_total_source": view.memory[1],
        "last_publish_seconds_ago": round(now - view.published_at, 3), "workers": workers,
        "messages": view.messages, "dropped": view.dropped,
        "tasks": [{"task": r.task, "calls": r.calls, "median_growth_bytes": r.median_bytes,
                   "mean_growth_bytes": r.mean_bytes, "total_growth_bytes": r.total_bytes,
                   "leaky": r.leaky} for r in view.ranking],
    }
