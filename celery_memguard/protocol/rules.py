"""Rules both sides of the socket apply: a child's soft threshold, its predicted crossing, and
the holds a single child is subject to.

The daemon's policy and a child's agent must reach the same verdict on the same figures: the
agent recycles its own child under a grant the daemon published in advance (protocol.grants), and the
daemon decides for the children that could not. Pure and dependency-free, so the agent can
import it without pydantic or psutil.
"""

from __future__ import annotations

import functools
import math
import statistics
import zlib
from collections.abc import Sequence

GROWTH_SAMPLES = 4  # recent tasks needed before their growth predicts anything


def jitter_fraction(pid: int, start: int) -> float:
    """A stable number in [0, 1) per process (pid and start time in clock ticks)."""
    return zlib.crc32(f"{pid}:{start}".encode()) / 2**32


@functools.lru_cache(maxsize=8192)
def jittered(soft: int, jitter: float, pid: int, start: int) -> int:
    """The soft limit lowered by this process's share of the jitter, never raised above it.
    Cached: a tick asks it several times for every child."""
    return int(soft * (1.0 - jitter * jitter_fraction(pid, start)))


def at_once(max_share: float, pool: int) -> int:
    """How many children of a pool of ``pool`` may be recycling at once: ``max_share`` of it,
    at least one."""
    return max(1, math.floor(max_share * pool))


def pool_jitter(jitter: float, max_share: float | None, pool: int) -> float:
    """The jitter a pool's children get: 0 where only one child of the pool may recycle at a
    time, since its children cannot recycle together there and lower thresholds would only
    mean more recycles (workload W in BENCHMARKS.md: 3.3 against 2.7 a run at concurrency 2).
    The full jitter where the pool size (0) or the share (None) is not known."""
    if max_share is None or pool <= 0 or at_once(max_share, pool) >= 2:
        return jitter
    return 0.0


def child_threshold(soft: int, jitter: float, max_share: float | None, pool: int, pid: int,
                    start: int) -> int:
    """A pool child's own soft threshold: the soft limit lowered by its share of its pool's
    jitter. The one figure the daemon and the child's agent must agree on."""
    return jittered(soft, pool_jitter(jitter, max_share, pool), pid, start)


def growth_per_task(recent: Sequence[int]) -> float:
    """The median RSS growth of a child's recent tasks; 0 until there are enough of them."""
    return float(statistics.median(recent)) if len(recent) >= GROWTH_SAMPLES else 0.0


def predicts_crossing(value: int, growth: float, ahead: int, threshold: int) -> bool:
    """Whether ``ahead`` more tasks growing by ``growth`` each take ``value`` past ``threshold``
    (predictive recycling: the next task, and one that may already be on its way)."""
    return ahead > 0 and growth > 0 and value + ahead * growth >= threshold


def max_tasks_soon(tasks: int, max_tasks: int | None, within: int) -> bool:
    """--max-tasks-per-child will recycle this child within ``within`` tasks anyway."""
    return bool(max_tasks) and tasks >= (max_tasks or 0) - within


def too_young(age: float, min_lifetime: float, value: int, hard: int) -> bool:
    """A child younger than ``min_lifetime`` is left alone unless it is past the hard limit, so
    a limit set below what a fresh child needs cannot recycle a pool in a tight loop."""
    return age < min_lifetime and not (0 < hard <= value)


GROWN_TASKS = 20  # tasks a child runs before its growth can count as a leak's, not a storm's


def grown(tasks: int, rss: int, fresh: int | None, soft: int) -> bool:
    """A child that reached its limit by growing over many tasks (a leak): it ran
    ``GROWN_TASKS`` tasks and covered at least half the way from a fresh child's size to the
    soft limit. Recycling it frees what it grew, so the rate limit, which is there for storms
    (a soft limit below what a child needs: fresh children cross it at once), does not hold
    it. Unknown fresh size, or a limit a fresh child is already over: not grown."""
    if fresh is None or soft <= fresh or tasks < GROWN_TASKS:
        return False
    return 2 * (rss - fresh) >= soft - fresh
