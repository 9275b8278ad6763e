"""What the policy decides: a recycle to carry out, or a hold that explains why not."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from celery_memguard.daemon.readings import ProcId


class Reason(str, Enum):
    """Why a child is recycled; the values are the ``reason`` label of recycles_total."""

    SOFT = "soft"  # past the soft limit: leave after the current task
    HARD = "hard"  # past the hard limit during a task: interrupted by the in-child watch
    KILL = "kill"  # still past the hard limit kill_after later: SIGTERM, then SIGKILL
    WORKER_TOTAL = "worker_total"  # the children together are past limits.worker_total
    PREDICTED = "predicted"  # its recent growth per task would take it past soft before next time
    CONTAINER = "container"  # its container is past a line (or under pressure) and it grows most


class Hold(str, Enum):
    """Why a child over its limit is left alone for now."""

    NO_AGENT = "no_agent"  # observe-only: nothing in that worker can recycle safely
    MAX_TASKS_SOON = "max_tasks_soon"  # --max-tasks-per-child will recycle it within a few tasks
    SHARE_CAP = "share_cap"  # too much of the pool is already recycling
    RATE_LIMIT = "rate_limit"  # recycle.max_per_minute reached for this worker
    NOT_OPTED_IN = "not_opted_in"  # a childless pool whose app did not pass restart_worker=True
    HOST_RESTARTING = "host_restarting"  # another worker of this host is restarting now
    GRACE = "grace"  # seen over on the tick, not yet for recycle.grace
    FRESH = "fresh"  # has run no task: a replacement would be as large (the limit is too low)
    FLOOR = "floor"  # recycling it would leave fewer than recycle.min_serving children serving
    MIN_LIFETIME = "min_lifetime"  # younger than recycle.min_lifetime and under the hard limit


@dataclass(frozen=True, slots=True)
class Decision:
    """A recycle to carry out, or a hold to log; policy output, never an effect."""

    worker: str
    worker_pid: int
    index: int
    proc: ProcId
    ppid: int
    measured: int  # the figure compared, in bytes
    threshold: int  # the child's own threshold after jitter
    reason: Reason
    hold: Hold | None = None
    signal: int | None = None
    whole: bool = False  # targets the worker's main process (a pool without children)
    interrupt: bool = False  # interrupts the running task (the container's hard line)

    @property
    def acts(self) -> bool:
        return self.hold is None
