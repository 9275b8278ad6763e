"""The view: everything a scrape or /status shows, copied out of the state at one moment.

The supervisor publishes a new one after each tick and each decision taken on a report; the
HTTP threads only read the latest, so they never touch the loop's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_memguard.daemon import container_policy, task_growth
from celery_memguard.daemon.config import Config, LimitsConfig
from celery_memguard.daemon.snapshot import Snapshot, Worker
from celery_memguard.daemon.state import State
from celery_memguard.daemon.task_growth import Ranked


@dataclass(frozen=True)
class View:
    """Everything a scrape or /status shows, copied out of the loop's state at one moment."""

    snapshot: Snapshot
    limits: dict[str, int]  # level -> bytes, the top-level limits
    measure: str
    dry_run: bool
    worker_limits: dict[str, dict[str, int]] = field(default_factory=dict)  # per worker name
    recycles: dict[tuple[str, str], int] = field(default_factory=dict)
    dry_run_recycles: dict[tuple[str, str], int] = field(default_factory=dict)
    interrupted: dict[tuple[str, str, str], int] = field(default_factory=dict)
    oom_kills: dict[tuple[str, str], int] = field(default_factory=dict)
    restarts: dict[tuple[str, str], int] = field(default_factory=dict)
    holds: dict[tuple[str, str], int] = field(default_factory=dict)
    hold_seconds: dict[str, float] = field(default_factory=dict)
    stalls: dict[str, int] = field(default_factory=dict)  # stall triggers fired, by worker
    stall_triggers: dict[str, Any] = field(default_factory=dict)  # armed and unavailable files
    quarantined: int = 0  # task ids no child may run again
    needs: dict[str, int] = field(default_factory=dict)  # task -> its peak rise, as children saw
    growth: dict[str, tuple[list[tuple[float, int]], int]] = field(default_factory=dict)
    ranking: tuple[Ranked, ...] = ()
    messages: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    memory: tuple[int, str] = (0, "host")  # the total percentages resolve against, its source
    connections: int = 0  # agent processes connected to the socket
    socket: str = ""  # the agents' socket as the daemon binds it
    socket_source: str = ""  # where that path came from (environment, file, default)
    limit_sources: dict[str, dict[str, str]] = field(default_factory=dict)  # worker -> level ->
    # where the limit in force comes from
    published_at: float = 0.0  # monotonic
    started_at: float = 0.0  # wall clock
    leak_sites: tuple[dict[str, Any], ...] = ()  # the newest trace result of each task name
    forensics: dict[str, Any] = field(default_factory=dict)  # traces under way and ended


def build(state: State, snapshot: Snapshot, config: Config,
          limits_for: Callable[[str], LimitsConfig],
          sources_for: Callable[[str], dict[str, str]], *, now: float, started_at: float,
          memory: tuple[int, str], connections: int, leak_sites: tuple[dict[str, Any], ...],
          forensics: dict[str, Any], stall_triggers: dict[str, Any]) -> View:
    """The view of the state at ``now``, its counters copied: the loop goes on changing them."""
    return View(
        snapshot=snapshot,
        limits={"soft": config.limits.soft, "hard": config.limits.hard},
        worker_limits={w.name: _limits_shown(w, limits_for(w.name)) for w in snapshot.workers},
        measure=config.limits.measure, dry_run=config.recycle.dry_run,
        recycles=dict(state.recycles), dry_run_recycles=dict(state.dry_run_recycles),
        interrupted=dict(state.interrupted), oom_kills=dict(state.oom_kills),
        restarts=dict(state.restarts), holds=dict(state.holds),
        hold_seconds=dict(state.hold_seconds), stalls=dict(state.stalls),
        stall_triggers=stall_triggers, quarantined=len(state.quarantined),
        needs=dict(state.needs),
        growth={task: (g.cumulative(), g.total) for task, g in state.growth.items()},
        ranking=tuple(task_growth.rank(state.growth)),
        messages=dict(state.messages), dropped=dict(state.dropped),
        published_at=now, started_at=started_at, memory=memory,
        connections=connections, socket=str(config.agent.socket),
        socket_source=config.socket_source,
        limit_sources={w.name: sources_for(w.name) for w in snapshot.workers},
        leak_sites=leak_sites, forensics=forensics,
    )


def _limits_shown(worker: Worker, limits: LimitsConfig) -> dict[str, int]:
    """A worker's limits in bytes by level, with its container's lines where it has one."""
    shown = {"soft": limits.soft, "hard": limits.hard}
    if worker.container is not None:
        soft, hard = container_policy.lines(worker.container, limits)
        shown.update({k: v for k, v in (("container_soft", soft), ("container_hard", hard))
                      if v is not None})
    return shown
