"""USS and PSS, read only where they decide something.

Reading /proc/PID/smaps_rollup costs about 30 times the RSS read of every tick. RSS bounds
both from above: a child under its soft limit by RSS is under by USS, and a worker whose
children's RSS sum is under worker_total is under by USS too. So the dear figure is read for
the children near a limit, and now and then for a leaking child, whose USS is what recycling
it would free.
"""

from __future__ import annotations

from celery_memguard.daemon.config import LimitsConfig, RecycleConfig
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.records import WorkerRec

LEAKING_USS_EVERY = 10.0  # seconds between USS reads of a leaking child far from any limit


class UssSampler:
    def __init__(self, procs: Procs) -> None:
        self.procs = procs

    def sample(self, rec: WorkerRec, limits: LimitsConfig, recycle: RecycleConfig,
               now: float) -> None:
        """Read USS/PSS of the children of ``rec`` that are near a limit, and of leaking ones
        every ``LEAKING_USS_EVERY``: on every tick, 200 leaking children cost 12-14 ms of the
        daemon's second."""
        whole = over_worker_total(rec, limits)
        floor = (limits.soft * (1.0 - recycle.jitter) if limits.measure != "rss"
                 else float("inf"))
        for child in rec.children.values():
            shown_due = child.leaking and (child.uss_read_at is None
                                           or now - child.uss_read_at >= LEAKING_USS_EVERY)
            if whole or child.rss >= floor or shown_due:
                figures = self.procs.uss_pss(child.proc.pid)
                if figures is not None:
                    child.uss, child.pss = figures
                    child.uss_read_at = now
            elif not child.leaking:  # a leaking child keeps its last figure until the next read
                child.uss = child.pss = child.uss_read_at = None


def over_worker_total(rec: WorkerRec, limits: LimitsConfig) -> bool:
    """The RSS sum of a worker's children is at least worker_total (when set)."""
    return (limits.worker_total is not None
            and sum(c.rss for c in rec.children.values()) >= limits.worker_total)


def near_a_limit(rec: WorkerRec, pid: int, limits: LimitsConfig, recycle: RecycleConfig) -> bool:
    """Whether the report of child ``pid`` can lead to a decision: most cannot, and this is the
    hot path, so only that child is looked at (the others changed on the tick, which decides
    for all). A child under the lowest soft threshold by RSS needs no snapshot; worker_total,
    when set, sums the pool."""
    child = rec.children.get(pid)
    if child is not None:
        floor = limits.soft * (1.0 - recycle.jitter)
        ahead = (recycle.predictive_tasks * max(child.growth, default=0)
                 if recycle.predictive else 0)
        if child.rss + ahead >= floor:
            return True
    return over_worker_total(rec, limits)


def total_clock(rec: WorkerRec, limits: LimitsConfig, now: float) -> None:
    """Since when the children's sum (USS where sampled) has been over worker_total."""
    total = sum(c.uss if c.uss is not None else c.rss for c in rec.children.values())
    if limits.worker_total is not None and total >= limits.worker_total:
        if rec.total_over_since is None:
            rec.total_over_since = now
    else:
        rec.total_over_since = None
