"""Small builders for the frozen value types, so policy tables read as data."""

from __future__ import annotations

from typing import Any

from celery_memguard import config
from celery_memguard.model import Child, ProcId, Snapshot, Worker

MiB = 1024 * 1024


def child(index: int = 0, rss_mib: float = 50, **kw: Any) -> Child:
    values: dict[str, Any] = {
        "worker": "w@h", "index": index, "proc": ProcId(100 + index, 1000 + index), "ppid": 10,
        "rss": int(rss_mib * MiB), "uss": None, "pss": None, "tasks": 5, "task": None, "agent": True,
        "requested_at": None, "noted": False, "leaving": False,
        "reported_end": True,  # as if its last reading were a task-end report: no grace
        "born": None}  # seen since the daemon started: as good as old
    values.update(kw)
    return Child(**values)


def worker(*children: Child, **kw: Any) -> Worker:
    values: dict[str, Any] = {
        "name": "w@h", "proc": ProcId(10, 900), "pool": "prefork", "concurrency": max(2, len(children)),
        "max_tasks": None, "max_memory_kib": None, "agent": True, "recycle_signal": 38, "rss": 40 * MiB,
        "children": tuple(children),
        "total_over_since": -100.0}  # worker_total exceeded long since, when it is
    values.update(kw)
    return Worker(**values)


def snapshot(*workers: Worker) -> Snapshot:
    return Snapshot(taken_at=0.0, workers=tuple(workers))


def limits(**kw: Any) -> config.LimitsConfig:
    values: dict[str, Any] = {"soft": "100MiB", "hard": "200MiB"}
    values.update(kw)
    return config.LimitsConfig.model_validate(values)


def recycle(**kw: Any) -> config.RecycleConfig:
    values: dict[str, Any] = {"jitter": 0}
    values.update(kw)
    return config.RecycleConfig.model_validate(values)
