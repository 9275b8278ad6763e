"""Builders for the values tests pass around: agent messages, the daemon's frozen values and
config sections, so that tables read as data. ``MiB`` is defined here once."""

from __future__ import annotations

from typing import Any

from celery_memguard.daemon import config
from celery_memguard.daemon.inbox import Datagram
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.snapshot import Child, Snapshot, Worker
from celery_memguard.protocol import messages

MiB = 1024 * 1024
MAIN, KID0, KID1 = 10, 11, 12  # a worker's main process and its two pool children


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


# -- agent messages, from the worker MAIN and its children ---------------------------------

def dgram(message: messages.Message, sender: int | None = None) -> Datagram:
    return Datagram(data=messages.encode(message), pid=message.pid if sender is None else sender,
                    uid=0, truncated=False)


def hello(kids: tuple[tuple[int, int], ...] = ((KID0, 0), (KID1, 1)), **kw: Any) -> messages.WorkerHello:
    values: dict[str, Any] = {"pid": MAIN, "node": "w@h", "pool": "prefork", "concurrency": 2,
                                  "max_tasks": None, "max_memory_kib": None, "recycle_signal": 38,
                                  "kids": kids, "agent": "t"}
    values.update(kw)
    return messages.WorkerHello(**values)


def child_hello(pid: int, tasks: int = 0, rss_mib: float = 50, ppid: int = MAIN,
                index: int | None = None, **kw: Any) -> messages.ChildHello:
    """A pool child's hello: by default a fresh child of MAIN at 50 MiB, its index from its
    pid (KID0 is 0)."""
    return messages.ChildHello(pid=pid, ppid=ppid, index=index if index is not None else pid - KID0,
                               tasks=tasks, rss=int(rss_mib * MiB), **kw)


def task_end(pid: int, rss_mib: float, tasks: int = 1, index: int | None = None) -> messages.TaskEnd:
    return messages.TaskEnd(pid=pid, ppid=MAIN, index=index if index is not None else pid - KID0,
                        task="app.leak", id=f"id-{pid}-{tasks}", rss_before=0,
                        rss=int(rss_mib * MiB), tasks=tasks, ok=True)


def batch(pid: int, first: int, *ends: tuple[str, float, float, int], index: int | None = None,
          ) -> messages.TaskBatch:
    """A child's batch of task ends: (task name, RSS before and after in MiB, age in ms)."""
    names = tuple(dict.fromkeys(name for name, *_ in ends))
    return messages.TaskBatch(
        pid=pid, ppid=MAIN, index=index if index is not None else pid - KID0, first=first,
        names=names, ends=tuple((names.index(name), int(before * MiB), int(after * MiB), 1, age)
                                for name, before, after, age in ends))
