"""The view: everything a scrape or /status shows, copied out of the state at one moment.

The supervisor publishes a new one after each tick and each decision taken on a report; the
HTTP threads only read the latest, so they never touch the loop's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from celery_memguard.daemon.snapshot import Snapshot
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
