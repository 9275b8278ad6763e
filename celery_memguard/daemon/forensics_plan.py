"""Which task names to trace, and in which pool child. Pure: a snapshot in, a choice out.

One trace per worker at a time, in a child that runs the task name often and, of those, holds
the least memory (it has the longest way to its soft limit, so it is the least likely to be
recycled before its traced calls are done). Not in a child that ran it once or twice: a pool
can hand one task name to the same child again and again, and a child that never gets it
again would trace nothing. A task name is traced automatically when the growth figures call
it leaking, at most once per cooldown.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from celery_memguard.daemon.snapshot import Child, Worker
from celery_memguard.daemon.task_growth import Ranked

OTHER = "other"  # the label of task names past metrics.max_task_names: not one task


@dataclass(frozen=True, slots=True)
class Target:
    worker: str
    worker_pid: int
    worker_start: int
    pid: int
    start: int
    index: int


def choose(workers: Iterable[Worker], task: str, ran: Mapping[int, Mapping[str, int]],
           busy: Collection[int], pattern: str | None = None,
           any_child: bool = False, avoid: Collection[int] = ()) -> Target | str:
    """The child to trace ``task`` in, or why there is none. ``ran``: child pid -> task name
    -> the times it ran it; ``busy``: pids of workers tracing already; ``pattern``: the
    worker names allowed; ``any_child``: a child that has not run the task will do (asked for
    by hand); ``avoid``: child pids not to choose (one that never got the task again)."""
    named = supervised = idle = 0
    most = max((runs.get(task, 0) for runs in ran.values()), default=0)
    best: tuple[tuple[bool, bool, int, str, int], Target] | None = None
    for worker in workers:
        if pattern is not None and not fnmatch.fnmatchcase(worker.name, pattern):
            continue
        named += 1
        if not worker.agent or not worker.has_children:
            continue
        supervised += 1
        if worker.pid in busy:
            continue
        idle += 1
        for child in worker.children:
            if not _free(child) or child.pid in avoid:
                continue
            runs = ran.get(child.pid, {}).get(task)
            ran_it = child.task == task or runs is not None
            if not (ran_it or any_child):
                continue
            seldom = 2 * (runs or 0) < most  # ran it less than half as often as the most
            rank = (not ran_it, seldom, child.rss, worker.name, child.index)
            if best is None or rank < best[0]:
                best = (rank, Target(worker.name, worker.pid, worker.proc.start, child.pid,
                                     child.proc.start, child.index))
    if best is not None:
        return best[1]
    return _why_none(task, pattern, any_child, named, supervised, idle)


def _free(child: Child) -> bool:
    """A child that can take a request: its agent speaks, and it is not on its way out."""
    return (child.agent and not child.leaving and child.requested_at is None
            and child.terminated_at is None and child.killed_at is None)


def _why_none(task: str, pattern: str | None, any_child: bool, named: int, supervised: int,
              idle: int) -> str:
    where = f"named {pattern}" if pattern is not None else "on this host"
    if not named:
        return f"no worker {where} is supervised"
    if not supervised:
        return (f"no worker {where} runs a prefork pool with the agent "
                f"(celery_memguard.install(app))")
    if not idle:
        return "every worker that could trace it is tracing another task (one at a time)"
    if any_child:
        return "no pool child can trace now (each is leaving or being recycled)"
    return f"no pool child that can trace now has run {task}"


def due(ranking: Iterable[Ranked], traced_at: Mapping[str, float], active: Collection[str],
        now: float, cooldown: float) -> list[str]:
    """The task names to trace automatically now: leaking, not traced within the cooldown,
    and not being traced."""
    return [r.task for r in ranking
            if r.leaky and r.task != OTHER and r.task not in active
            and now - traced_at.get(r.task, now - cooldown - 1) > cooldown]
