"""The JSON behind /status, which ``celery-memguard status`` and ``report`` render."""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from celery_memguard._version import __version__
from celery_memguard.daemon.view import View


def status_document(view: View) -> dict[str, Any]:
    """The /status document of a view."""
    now = time.monotonic()
    traced = {result["task"]: result for result in view.leak_sites}
    for trace in view.forensics.get("traces", ()):  # a trace under way shows what it has
        if trace["state"] == "tracing" and trace["result"] is not None:
            traced[trace["task"]] = trace["result"]
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
            leak = child.leak
            children.append({
                "index": child.index, "pid": child.pid, "rss_bytes": child.rss,
                "uss_bytes": child.uss, "tasks": child.tasks, "task": child.task,
                "state": state, "agent": child.agent,
                "leak_bytes_per_task": leak.trend.bytes_per_task if leak else None,
                "leak_bytes_per_second": leak.trend.bytes_per_second if leak else None,
                "leaking": leak.trend.leaking if leak else False,
                "plateau": leak.trend.plateau if leak else False,
                "tasks_to_soft": leak.tasks_to_soft if leak else None,
                "seconds_to_soft": leak.seconds_to_soft if leak else None,
                "requested_seconds_ago": (round(now - child.requested_at, 3)
                                          if child.requested_at is not None else None),
            })
        workers.append({
            "name": worker.name, "pid": worker.pid, "pool": worker.pool,
            "concurrency": worker.concurrency, "agent": worker.agent,
            "max_tasks_per_child": worker.max_tasks, "main_rss_bytes": worker.rss,
            "limits": view.worker_limits.get(worker.name, view.limits),
            "recycles": {reason: n for (name, reason), n in view.recycles.items()
                         if name == worker.name},
            "restarts": {reason: n for (name, reason), n in view.restarts.items()
                         if name == worker.name},
            "restartable": worker.restartable,
            "agent_state": worker.agent_state, "missing_hooks": list(worker.missing),
            "max_concurrency": worker.max_concurrency,
            "versions": dict(zip(("celery", "billiard", "python"), worker.versions, strict=True)),
            "socket": worker.socket, "may_signal": worker.may_signal,
            "limit_sources": view.limit_sources.get(worker.name, {}),
            "container_limit_bytes": worker.container.limit if worker.container else None,
            "fresh_child_rss_bytes": worker.fresh_rss,
            "recommended_max_tasks_per_child": worker.recommended_max_tasks,
            "children": children,
        })
    return {
        "version": __version__, "limits": view.limits, "measure": view.measure,
        "dry_run": view.dry_run, "started_at": view.started_at,
        "memory_total_bytes": view.memory[0], "memory_total_source": view.memory[1],
        "last_publish_seconds_ago": round(now - view.published_at, 3), "workers": workers,
        "messages": view.messages, "dropped": view.dropped,
        "agent_connections": view.connections,
        "stall_triggers": view.stall_triggers,
        "daemon": {"pid": os.getpid(), "uid": os.geteuid(), "gid": os.getegid(),
                   "socket": socket_facts(view.socket) | {"source": view.socket_source}},
        "tasks": [{"task": r.task, "calls": r.calls, "median_growth_bytes": r.median_bytes,
                   "mean_growth_bytes": r.mean_bytes, "total_growth_bytes": r.total_bytes,
                   "leaky": r.leaky, **_sites(traced.get(r.task))} for r in view.ranking],
        "leak_sites": list(view.leak_sites),
        "forensics": view.forensics,
    }


def socket_facts(path: str) -> dict[str, Any]:
    """The agents' socket file as this process sees it: whether it is there, and who may use it
    (connecting needs write permission on the file)."""
    facts: dict[str, Any] = {"path": path}
    try:
        info = os.stat(path)
    except OSError as exc:
        return facts | {"exists": False, "error": exc.strerror}
    return facts | {"exists": True, "is_socket": stat.S_ISSOCK(info.st_mode),
                    "mode": f"{stat.S_IMODE(info.st_mode):04o}", "uid": info.st_uid,
                    "gid": info.st_gid}


def _sites(result: dict[str, Any] | None) -> dict[str, Any]:
    """A ranked task's newest trace result (or the one under way): its sites, its untraced
    share, the rest of it."""
    if result is None:
        return {"sites": [], "untraced_share": None, "trace": None}
    return {"sites": result["sites"], "untraced_share": result["untraced_share"],
            "trace": {key: value for key, value in result.items() if key != "sites"}}
