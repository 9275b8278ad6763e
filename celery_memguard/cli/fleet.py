"""``report --prometheus``: the leak report of every sidecar a Prometheus scrapes.

``collect`` asks Prometheus the queries of fleet_queries at one instant; ``fold`` turns the
answers into a FleetReport (pure, so that it is tested with tables); ``document`` is its JSON.

The task ranking is the daemon's (daemon/task_growth.py): by median growth per call, leaky at
5 calls or more and a median of 64 KiB or more. Across sidecars only the histogram
``celery_memguard_task_memory_growth_bytes`` exists, so the median is
``histogram_quantile(0.5, ...)`` over the fleet's buckets: an estimate interpolated inside the
bucket it falls in (bounds 0, 64 KiB, 256 KiB, 1, 4, 16, 64, 256 MiB). The leak verdict is exact
about 64 KiB, a bucket bound; the mean and the total are exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_memguard.cli.fleet_queries import GROUP_LABEL, BadArgument, Selector, check_window, queries
from celery_memguard.cli.prometheus_api import NotPrometheus, PrometheusAPI, QueryError, Sample, Unreachable
from celery_memguard.daemon.task_growth import LEAK_MEDIAN

MIN_CALLS = 5  # as the daemon's ranking: fewer calls make no verdict


class FleetError(Exception):
    """The report cannot be made; the message says why and what to do."""


class Unavailable(FleetError):
    """Prometheus is not there, not Prometheus, failed the query, or holds no sidecar."""


class Refused(FleetError):
    """The selector or the window is not valid (Prometheus's words, or ours)."""


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """A worker group: the name part of the nodenames, in a cluster and namespace where the
    series carry those labels."""

    cluster: str
    namespace: str
    name: str

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> Group:
        return cls(labels.get("cluster", ""), labels.get("namespace", ""), labels.get(GROUP_LABEL, ""))

    def __str__(self) -> str:
        return "/".join(part for part in (self.cluster, self.namespace, self.name) if part)


@dataclass(frozen=True, slots=True)
class FleetTask:
    task: str
    calls: int
    median_bytes: float  # estimated from the buckets
    mean_bytes: float
    total_bytes: float
    leaky: bool
    groups: tuple[Group, ...]  # the groups of the sidecars that saw it run


@dataclass(frozen=True, slots=True)
class FleetGroup:
    group: Group
    workers: tuple[str, ...]
    children: int  # pool slots seen in the window
    leaking_children: int  # of which leaking at some point in it
    fastest_leak_bytes_per_task: float | None
    recommended_max_tasks_per_child: int | None  # the lowest advice of any of its workers
    recycles: Mapping[str, int] = field(default_factory=dict)
    interrupted: tuple[tuple[str, str, int], ...] = ()  # (task, reason, count)
    oom_kills: tuple[tuple[str, int], ...] = ()  # (task, count)


@dataclass(frozen=True, slots=True)
class FleetReport:
    prometheus: str
    selector: str
    window: str
    at: float
    sidecars: int
    tasks: tuple[FleetTask, ...]
    groups: tuple[FleetGroup, ...]
    observe_only: tuple[str, ...]  # workers no sidecar's agent reports for


def rank(tasks: Iterable[FleetTask]) -> list[FleetTask]:
    """The leaky first, then by median and mean growth per call, as the daemon ranks."""
    return sorted(tasks, key=lambda t: (t.leaky, t.median_bytes, t.mean_bytes), reverse=True)


def collect(url: str, selector: str | None, window: str, at: float | None = None) -> FleetReport:
    """Ask Prometheus at ``url`` every query at one instant (now unless ``at``) and fold."""
    try:
        sel = Selector.parse(selector)
        check_window(window)
        api = PrometheusAPI(url)
    except (BadArgument, ValueError) as exc:
        raise Refused(str(exc)) from exc
    when = time.time() if at is None else at
    answers: dict[str, list[Sample]] = {}
    for name, expr in queries(sel, window).items():
        try:
            answers[name] = api.query(expr, when)
        except Unreachable as exc:
            raise Unavailable(f"no Prometheus answers at {url} ({exc}). Pass the URL of the "
                              f"Prometheus that scrapes the sidecars, e.g. http://prometheus:9090.") from exc
        except NotPrometheus as exc:
            raise Unavailable(f"{url} does not serve Prometheus's HTTP API ({exc}). Pass the base "
                              f"URL, the one /api/v1/query is under.") from exc
        except QueryError as exc:
            if exc.error_type == "bad_data":
                raise Refused(f"Prometheus refused the query for --selector {sel} and --window "
                              f"{window}: {exc.message}") from exc
            raise Unavailable(f"Prometheus at {url} could not run the report's queries "
                              f"({exc}); try a shorter --window") from exc
        if name == "sidecars" and not answers[name]:
            raise Unavailable(
                f"Prometheus at {url} has no celery-memguard series matching {sel} in the last "
                f"{window}: does it scrape the sidecars (deploy/prometheus/scrape.yaml), and does "
                f"--selector match their labels?")
    return fold(answers, prometheus=url, selector=str(sel), window=window, at=when)


def _count(value: float) -> int:
    """A count from increase(), which extrapolates: the nearest whole number."""
    return round(value) if math.isfinite(value) else 0


def fold(answers: Mapping[str, list[Sample]], *, prometheus: str, selector: str, window: str,
         at: float) -> FleetReport:
    """The report from the answers to fleet_queries.queries, by query name."""

    def sidecar(labels: Mapping[str, str]) -> tuple[str, str, str]:
        return labels.get("cluster", ""), labels.get("job", ""), labels.get("instance", "")

    groups_of: dict[tuple[str, str, str], set[Group]] = {}
    workers: dict[Group, set[str]] = {}
    for sample in answers["workers"]:
        group = Group.of(sample.labels)
        groups_of.setdefault(sidecar(sample.labels), set()).add(group)
        workers.setdefault(group, set()).add(sample.labels.get("worker", ""))

    calls: dict[str, float] = {}
    task_groups: dict[str, set[Group]] = {}
    for sample in answers["task_calls"]:
        task = sample.labels.get("task", "")
        calls[task] = calls.get(task, 0.0) + sample.value
        task_groups.setdefault(task, set()).update(groups_of.get(sidecar(sample.labels), ()))
    growth = {s.labels.get("task", ""): s.value for s in answers["task_growth"]}
    median = {s.labels.get("task", ""): s.value for s in answers["task_median"]}
    tasks = []
    for task, n in calls.items():
        if _count(n) == 0:
            continue  # ran before the window only
        middle = median.get(task, math.nan)
        middle = middle if math.isfinite(middle) else 0.0
        total = growth.get(task, 0.0)
        tasks.append(FleetTask(
            task=task, calls=_count(n), median_bytes=middle, mean_bytes=total / n,
            total_bytes=total, leaky=_count(n) >= MIN_CALLS and middle >= LEAK_MEDIAN,
            groups=tuple(sorted(task_groups.get(task, ())))))

    def by_group(name: str) -> dict[Group, float]:
        return {Group.of(s.labels): s.value for s in answers[name]}

    children, leaking = by_group("children"), by_group("leaking")
    fastest, advice = by_group("fastest_leak"), by_group("recommended")
    recycles: dict[Group, dict[str, int]] = {}
    for sample in answers["recycles"]:
        reason = sample.labels.get("reason", "")
        recycles.setdefault(Group.of(sample.labels), {})[reason] = _count(sample.value)
    interrupted: dict[Group, list[tuple[str, str, int]]] = {}
    for sample in answers["interrupted"]:
        interrupted.setdefault(Group.of(sample.labels), []).append(
            (sample.labels.get("task", ""), sample.labels.get("reason", ""), _count(sample.value)))
    oom: dict[Group, list[tuple[str, int]]] = {}
    for sample in answers["oom_kills"]:
        oom.setdefault(Group.of(sample.labels), []).append(
            (sample.labels.get("task", ""), _count(sample.value)))
    names = {*workers, *children, *leaking, *advice, *recycles, *interrupted, *oom}
    groups = tuple(
        FleetGroup(
            group=group, workers=tuple(sorted(workers.get(group, ()))),
            children=_count(children.get(group, 0.0)), leaking_children=_count(leaking.get(group, 0.0)),
            fastest_leak_bytes_per_task=fastest.get(group),
            recommended_max_tasks_per_child=_count(advice[group]) if group in advice else None,
            recycles=dict(sorted(recycles.get(group, {}).items())),
            interrupted=tuple(sorted(interrupted.get(group, []), key=lambda row: (-row[2], row[:2]))),
            oom_kills=tuple(sorted(oom.get(group, []), key=lambda row: (-row[1], row[0]))))
        for group in sorted(names))
    observe_only = tuple(sorted(s.labels.get("worker", "") for s in answers["observe_only"]))
    return FleetReport(prometheus=prometheus, selector=selector, window=window, at=at,
                       sidecars=len(answers["sidecars"]), tasks=tuple(rank(tasks)), groups=groups,
                       observe_only=observe_only)


def _group(group: Group) -> dict[str, str]:
    return {"worker_group": str(group), "name": group.name, "namespace": group.namespace,
            "cluster": group.cluster}


def document(report: FleetReport) -> dict[str, Any]:
    """The report as JSON: the ``tasks`` entries carry the keys of the daemon's report."""
    return {
        "prometheus": report.prometheus, "selector": report.selector, "window": report.window,
        "time": report.at, "sidecars": report.sidecars,
        "median": "estimated: histogram_quantile(0.5) over the fleet's growth buckets",
        "tasks": [{"task": t.task, "calls": t.calls, "median_growth_bytes": t.median_bytes,
                   "mean_growth_bytes": t.mean_bytes, "total_growth_bytes": t.total_bytes,
                   "leaky": t.leaky, "worker_groups": [str(g) for g in t.groups]}
                  for t in report.tasks],
        "worker_groups": [{
            **_group(g.group), "workers": list(g.workers), "children": g.children,
            "leaking_children": g.leaking_children,
            "fastest_leak_bytes_per_task": g.fastest_leak_bytes_per_task,
            "recommended_max_tasks_per_child": g.recommended_max_tasks_per_child,
            "recycles": dict(g.recycles),
            "interrupted_tasks": [{"task": t, "reason": r, "count": n} for t, r, n in g.interrupted],
            "oom_kills": [{"task": t, "count": n} for t, n in g.oom_kills],
        } for g in report.groups],
        "observe_only_workers": list(report.observe_only),
    }
