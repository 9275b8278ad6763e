"""The container's lines: which child to recycle, and which task to interrupt. Pure.

A worker's children can each be under their own limits and still, together, be more than
their container holds. Past the container's soft line (or under memory pressure for
recycle.grace) the child whose memory grows fastest is recycled after its task, one at a
time, with the same holds as any recycle; each child also waits before its next task while
the container is past the line (the agent does that itself, between two tasks). Past the hard
line, the running task that grows most is interrupted, before the kernel must pick a victim:
that is outside the rate limit, like the kill escalation, but one at a time.
"""

from __future__ import annotations

from celery_memguard.daemon.config import LimitsConfig, RecycleConfig
from celery_memguard.daemon.decision import Decision, Reason
from celery_memguard.daemon.snapshot import Child, Worker
from celery_memguard.daemon.units import MiB
from celery_memguard.protocol.cgroups import ContainerReading
from celery_memguard.protocol.signals import CONTAINER_SIGNAL

GROWING = 8 * MiB  # what a task must have added to count as the one growing
FREEABLE = 16 * MiB  # what a child must hold over a fresh one for its recycle to free anything


def lines(container: ContainerReading, limits: LimitsConfig) -> tuple[int | None, int | None]:
    """(soft, hard) in bytes of the container's working set; None where off or unlimited."""
    if container.limit is None:
        return None, None
    return (None if limits.container_soft is None else int(container.limit * limits.container_soft),
            None if limits.container_hard is None else int(container.limit * limits.container_hard))


def pressured(container: ContainerReading, limits: LimitsConfig) -> bool:
    return (limits.container_pressure is not None and container.pressure is not None
            and container.pressure.some_avg10 >= limits.container_pressure)


def over_soft(container: ContainerReading, limits: LimitsConfig) -> bool:
    """Past the soft line, or under pressure: the clock that recycle.grace measures."""
    soft, _ = lines(container, limits)
    return (soft is not None and container.working_set >= soft) or pressured(container, limits)


def over_hard(container: ContainerReading, limits: LimitsConfig) -> bool:
    _, hard = lines(container, limits)
    return hard is not None and container.working_set >= hard


def task_growth(child: Child) -> int:
    """What the child's running task has added since its last task ended (0 when idle)."""
    if child.rest_rss is None:
        return 0
    return max(0, child.rss - child.rest_rss)


def interrupt(worker: Worker, limits: LimitsConfig, available: list[Child]) -> list[Decision]:
    """Past the hard line: the task that grows most is interrupted, if one grows at all.
    One at a time: none while an earlier container interrupt is still on its way."""
    container = worker.container
    if container is None or not over_hard(container, limits):
        return []
    if not (worker.agent and worker.has_children) or any(
            c.requested_at is not None and not c.leaving for c in worker.children):
        return []
    growing = [c for c in available if c.agent and task_growth(c) >= GROWING]
    if not growing:
        return []
    victim = max(growing, key=lambda c: (task_growth(c), c.rss))
    _, hard = lines(container, limits)
    assert hard is not None
    return [Decision(worker=worker.name, worker_pid=worker.pid, index=victim.index,
                     proc=victim.proc, ppid=victim.ppid, measured=container.working_set,
                     threshold=hard, reason=Reason.CONTAINER, signal=CONTAINER_SIGNAL,
                     interrupt=True)]


def candidates(worker: Worker, limits: LimitsConfig, recycle: RecycleConfig, now: float,
               available: list[Child]) -> list[tuple[Child, int, int, Reason]]:
    """Past the soft line (or under pressure) for recycle.grace: the child that grows fastest
    (its leak rate, else what it gained over a fresh child per second of its life; ties: the
    largest), if recycling it frees anything. One at a time, like worker_total."""
    container = worker.container
    if container is None or worker.container_over_since is None:
        return []
    if now - worker.container_over_since < recycle.grace or not over_soft(container, limits):
        return []
    if any(c.requested_at is not None and not c.leaving for c in worker.children):
        return []
    fresh = worker.fresh_rss or min((c.rss for c in worker.children), default=0)
    freeable = [c for c in available if c.rss - fresh >= FREEABLE]
    if not freeable:
        return []

    def rate(child: Child) -> float:
        if child.leak is not None and child.leak.trend.leaking:
            return child.leak.trend.bytes_per_second
        age = now - child.born if child.born is not None else None
        return (child.rss - fresh) / age if age else 0.0

    chosen = max(freeable, key=lambda c: (rate(c), c.rss))
    soft, _ = lines(container, limits)
    return [(chosen, container.working_set, soft or 0, Reason.CONTAINER)]
