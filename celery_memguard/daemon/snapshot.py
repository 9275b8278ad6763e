"""What the policy and the metrics see: frozen values copied out of the state at one moment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from celery_memguard.daemon.leak_trend import Trend
from celery_memguard.daemon.readings import ProcId
from celery_memguard.protocol.cgroups import ContainerReading


@dataclass(frozen=True, slots=True)
class Leak:
    """A child's leak trend (see leak_trend.py) and when it reaches the soft limit at that rate."""

    trend: Trend
    tasks_to_soft: float | None  # None when not leaking
    seconds_to_soft: float | None


class Child(NamedTuple):
    """One pool child as the policy and the metrics see it. A NamedTuple rather than a frozen
    dataclass: a tick builds one per child, and a frozen dataclass's __init__ cost three times
    as much (3.1 against 1.2 µs), a fifth of a tick over 1,000 children."""

    worker: str
    index: int  # type: ignore[assignment]  # the pool slot; shadows tuple.index, unused here
    proc: ProcId
    ppid: int
    rss: int
    uss: int | None
    pss: int | None
    tasks: int
    task: str | None  # the task name it runs now, None when idle
    agent: bool  # its agent has spoken, so it can carry out a recycle request
    requested_at: float | None  # when we asked it to recycle (monotonic)
    noted: bool  # a dry run already counted it as a would-be recycle
    leaving: bool  # it said it is leaving through the recycle path
    over_hard_since: float | None = None  # when it was first seen above the hard limit
    terminated_at: float | None = None  # when kill escalation sent SIGTERM
    killed_at: float | None = None  # when kill escalation sent SIGKILL
    growth_per_task: float = 0.0  # median RSS growth of its recent tasks (predictive recycling)
    reported_end: bool = False  # its last RSS reading is a task-end report (else a tick sample)
    over_soft_since: float | None = None  # first reading over its soft threshold, this spell
    born: float | None = None  # when it started, on the daemon's clock (None: as good as old)
    leak: Leak | None = None  # computed on the tick, once the child has enough samples
    rest_rss: int | None = None  # its RSS after its last task (what a running task adds to)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(frozen=True, slots=True)
class Worker:
    name: str
    proc: ProcId
    pool: str
    concurrency: int
    max_tasks: int | None
    max_memory_kib: int | None
    agent: bool
    recycle_signal: int | None
    rss: int
    children: tuple[Child, ...] = ()
    restartable: bool = False  # opted in to whole-worker restarts
    recommended_max_tasks: int | None = None  # --max-tasks-per-child the observed leak calls for
    fresh_rss: int | None = None  # median RSS of its children at 0 tasks
    total_over_since: float | None = None  # first tick its children's sum was over worker_total
    restart_sent: int | None = None  # SIGTERM (warm) or SIGQUIT (cold) already sent
    restart_at: float | None = None
    container: ContainerReading | None = None  # its memory cgroup, where the daemon sees it
    container_over_since: float | None = None  # past the container's soft line since
    jitter_pool: int = 0  # the pool size its children's jitter is computed for (0: its size)
    max_concurrency: int | None = None  # --autoscale's maximum
    missing: tuple[str, ...] = ()  # hooks its agents could not join, main process and children
    versions: tuple[str, str, str] = ("", "", "")  # Celery, billiard, Python, as its hello says
    socket: str = ""  # the agent socket's path as the worker sees it
    may_signal: bool | None = None  # whether the daemon may signal its processes

    @property
    def agent_state(self) -> str:
        """full: every hook joined; degraded: the agent runs with some missing; none."""
        if not self.agent:
            return "none"
        return "degraded" if self.missing else "full"

    @property
    def threshold_pool(self) -> int:
        """The pool size both sides compute each child's jitter for (rules.child_threshold)."""
        return self.jitter_pool or self.concurrency

    @property
    def has_children(self) -> bool:
        """Pools whose tasks run in child processes; the others are supervised as a whole."""
        return self.pool == "prefork"

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float  # monotonic
    workers: tuple[Worker, ...] = ()
