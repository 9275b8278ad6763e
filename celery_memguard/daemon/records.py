"""The daemon's mutable records of a worker and of one pool child, kept by the state."""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from celery_memguard.daemon.leak_trend import History
from celery_memguard.daemon.readings import ProcId
from celery_memguard.protocol.cgroups import ContainerReading


class Rejected(Exception):
    """A well-formed message the state refuses (it names a process that is not what it claims)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ChildRec:
    proc: ProcId
    ppid: int
    index: int | None
    rss: int = 0
    uss: int | None = None
    pss: int | None = None
    tasks: int = 0
    task: str | None = None
    task_id: str | None = None
    task_seq: int = 0  # tasks it had finished when the running task was announced
    born: float | None = None  # when it started, on the daemon's clock (None: as good as old)
    agent: bool = False
    requested_at: float | None = None
    noted: bool = False  # a dry run has counted it already
    leaving: bool = False
    over_hard_since: float | None = None  # first time seen above the hard limit, this spell
    terminated_at: float | None = None  # SIGTERM sent (kill escalation)
    killed_at: float | None = None  # SIGKILL sent
    history: History = field(default_factory=History)  # task-boundary RSS, for the trend
    growth: deque[int] = field(default_factory=lambda: deque(maxlen=8))  # recent per-task growth
    leaking: bool = False  # the trend said so at the last tick (State.assess_trends)
    uss_read_at: float | None = None  # when USS/PSS were last read (smaps_rollup)
    reported_end: bool = False  # the last RSS reading came from a task-end report
    over_soft_since: float | None = None
    rest_rss: int | None = None  # RSS its last task left it at (a hello's at 0 tasks)
    missing: tuple[str, ...] = ()  # hooks its agent could not join (protocol.hooks)


@dataclass
class WorkerRec:
    proc: ProcId
    name: str | None
    pool: str = "prefork"
    concurrency: int = 0
    max_tasks: int | None = None
    max_memory_kib: int | None = None
    agent: bool = False
    recycle_signal: int | None = None
    rss: int = 0
    kid_index: dict[int, int] = field(default_factory=dict)
    children: dict[int, ChildRec] = field(default_factory=dict)
    restartable: bool = False
    restart_sent: int | None = None
    restart_at: float | None = None
    fresh_rss: deque[int] = field(default_factory=lambda: deque(maxlen=16))  # children at 0 tasks
    total_over_since: float | None = None
    container: str | None = None  # its memory cgroup's path, where the daemon sees it
    container_reading: ContainerReading | None = None  # as of the last read
    reported_container: ContainerReading | None = None  # as its agent read it (its hello)
    container_over_since: float | None = None  # past its soft line, or under pressure, since
    announced: bool = False  # its main process said hello (else it is known from its children)
    room_made: bool = False  # its room file (protocol.room) was made for its children
    first_report: float | None = None  # when the first child report named it as a parent
    hello_overdue: bool = False  # known from its children past the grace, and still no hello
    jitter_pool: int = 0  # the pool size its children's jitter is computed for (0: unknown)
    max_concurrency: int | None = None  # --autoscale's maximum
    missing: tuple[str, ...] = ()  # hooks its main process's agent could not join
    versions: tuple[str, str, str] = ("", "", "")  # Celery, billiard, Python
    socket: str = ""  # the agent socket's path as the worker sees it
    may_signal: bool | None = None  # whether the daemon may signal its processes

    @property
    def container_key(self) -> str:
        """Whose OOM kill counter its readings are: the worker's (its agent's readings and the
        daemon's of its cgroup are the same counter; a key that changed when the daemon first
        read the cgroup would lose the baseline)."""
        return f"{self.proc.pid}:{self.proc.start}"

    @property
    def fresh_median(self) -> int | None:
        """The median RSS its children announced at 0 tasks (None until one did)."""
        return int(statistics.median(self.fresh_rss)) if self.fresh_rss else None


class BoundedNames:
    """Task names as metric labels: the first ``limit`` names seen keep theirs, later ones are
    'other', so a flood of generated task names cannot grow the series without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: set[str] = set()

    def label(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) < self.limit:
            self._names.add(name)
            return name
        return "other"
