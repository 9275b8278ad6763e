"""The settings file: what the daemon tells every child before any task.

Messages flow only from agents to the daemon; what a child needs before any task (the hard
limit its own watch enforces, the rules under which it may recycle itself) is published as
``<socket>.settings.json`` (paths.settings_path). A file the agent cannot read or understand
is ignored: the child keeps what it had.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import TypeGuard

VERSION = 1
MEASURES = ("rss", "uss", "pss")


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """A worker's limits as its children see them."""

    hard: int  # bytes; 0 disables the in-child watch
    soft: int  # bytes, before each child's jitter (0: unknown)
    measure: str = "rss"  # what the soft limit compares; a child reads only its RSS cheaply
    container_soft: float | None = None  # share of the container's limit: hold the next task


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The published settings: the top-level limits, per-worker overrides and recycle rules."""

    hard: int  # bytes; 0 disables the in-child watch
    watch_interval: float  # seconds between two RSS reads while a task runs
    soft: int = 0  # bytes, before each child's jitter (0: unknown)
    jitter: float = 0.0
    max_share: float | None = None  # with the pool size, whether the jitter applies (rules)
    workers: tuple[tuple[str, int, int, str, float | None], ...] = ()  # (nodename pattern,
    # hard, soft, measure, container_soft)
    ahead: int = 0  # predictive recycling looks this many tasks ahead (0: off)
    measure: str = "rss"
    dry_run: bool = False  # a child never recycles itself in a dry run
    min_lifetime: float = 0.0  # seconds a child lives before a soft recycle
    skip_within_tasks: int = 0  # left to --max-tasks-per-child within this many tasks
    container_soft: float | None = None  # share of the container's limit (None: no line)
    container_hold: float = 0.0  # seconds a child waits at most for headroom

    def for_worker(self, node: str) -> ChildLimits:
        """The limits for a worker's nodename: its workers entry, else the top level."""
        for pattern, hard, soft, measure, container_soft in self.workers:
            if fnmatch.fnmatchcase(node, pattern):
                return ChildLimits(hard, soft, measure, container_soft)
        return ChildLimits(self.hard, self.soft, self.measure, self.container_soft)


def encode(settings: AgentSettings) -> bytes:
    return json.dumps({"v": VERSION, "hard": settings.hard,
                       "watch_interval": settings.watch_interval, "soft": settings.soft,
                       "jitter": settings.jitter, "max_share": settings.max_share,
                       "ahead": settings.ahead,
                       "measure": settings.measure, "dry_run": settings.dry_run,
                       "min_lifetime": settings.min_lifetime,
                       "skip_within_tasks": settings.skip_within_tasks,
                       "container_soft": settings.container_soft,
                       "container_hold": settings.container_hold,
                       "workers": [list(entry) for entry in settings.workers]}).encode()


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _share(value: object) -> bool:
    return value is None or (_number(value) and 0 < value <= 1)


def _worker_entry(w: object) -> bool:
    """(pattern, hard, soft), with the measure, and with the container's share, as daemons
    of successive releases wrote it."""
    return (isinstance(w, list) and len(w) in (3, 4, 5) and isinstance(w[0], str)
            and type(w[1]) is int and type(w[2]) is int and w[1] >= 0 and w[2] >= 0
            and (len(w) < 4 or w[3] in MEASURES) and (len(w) < 5 or _share(w[4])))


def decode(data: bytes) -> AgentSettings | None:
    """The settings, or None for anything malformed (the agent then keeps what it had)."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(body, dict) or type(body.get("v")) is not int or body["v"] != VERSION:
        return None
    hard, interval = body.get("hard"), body.get("watch_interval")
    soft, jitter = body.get("soft", 0), body.get("jitter", 0.0)
    max_share = body.get("max_share")
    workers, ahead = body.get("workers", []), body.get("ahead", 0)
    measure, dry_run = body.get("measure", "rss"), body.get("dry_run", False)
    min_lifetime, skip = body.get("min_lifetime", 0.0), body.get("skip_within_tasks", 0)
    container_soft, hold = body.get("container_soft"), body.get("container_hold", 0.0)
    if not _share(container_soft) or not _number(hold) or not 0 <= hold <= 3600:
        return None
    if (type(hard) is not int or type(soft) is not int or type(ahead) is not int
            or type(skip) is not int or not _number(interval) or not _number(jitter)
            or not _number(min_lifetime) or not isinstance(dry_run, bool)
            or not (max_share is None or (_number(max_share) and 0 <= max_share <= 1))
            or measure not in MEASURES):
        return None
    if (hard < 0 or soft < 0 or not 0 <= ahead <= 1000 or not 0 <= skip <= 10**6
            or not 0.001 <= interval <= 10 or not 0 <= jitter <= 1
            or not 0 <= min_lifetime <= 86400
            or not isinstance(workers, list) or not all(_worker_entry(w) for w in workers)):
        return None
    return AgentSettings(
        hard=hard, watch_interval=float(interval), soft=soft, jitter=float(jitter),
        max_share=None if max_share is None else float(max_share), ahead=ahead,
        measure=measure, dry_run=dry_run, min_lifetime=float(min_lifetime), skip_within_tasks=skip,
        container_soft=None if container_soft is None else float(container_soft),
        container_hold=float(hold),
        workers=tuple((w[0], w[1], w[2], w[3] if len(w) >= 4 else "rss",
                       (None if w[4] is None else float(w[4])) if len(w) >= 5 else None)
                      for w in workers))
