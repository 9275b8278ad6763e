"""Per task name: the memory each execution leaves behind, and which names leak most.

Fed with (RSS after - RSS before) of every task the agents report. Kept as a Prometheus-style
histogram (for ``celery_memguard_task_memory_growth_bytes``) plus a window of recent values
per name, whose median ranks the names: a leaking task leaves memory on (nearly) every call,
while a cache that fills once per process or a task that frees what it took has a median of
about zero, however large its occasional steps. Pure: no I/O, no clock.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from celery_memguard.daemon.units import MiB

# Growth, not change: a call that freed memory is observed as 0, so the buckets start at 0
# (OpenMetrics drops _sum and _count from histograms with negative buckets).
BUCKETS: tuple[float, ...] = (
    0, 64 * 1024, 256 * 1024, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, float("inf"),
)
WINDOW = 256


@dataclass
class TaskGrowth:
    count: int = 0
    total: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, delta: int) -> None:
        self.count += 1
        self.recent.append(delta)
        grown = max(delta, 0)
        self.total += grown
        for i, bound in enumerate(BUCKETS):
            if grown <= bound:
                self.buckets[i] += 1
                break

    @property
    def median(self) -> float:
        return float(statistics.median(self.recent)) if self.recent else 0.0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) pairs in exposition order."""
        out, running = [], 0
        for bound, n in zip(BUCKETS, self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True, slots=True)
class Ranked:
    task: str
    calls: int
    median_bytes: float  # typical growth per call: what ranks a leak
    mean_bytes: float
    total_bytes: int  # growth summed over every call, frees counted as 0
    leaky: bool  # leaves memory behind on most calls


LEAK_MEDIAN = 64 * 1024  # a call that typically leaves 64 KiB or more is leaking


def rank(stats: dict[str, TaskGrowth], top: int = 10, min_calls: int = 5) -> list[Ranked]:
    """Task names ordered by median growth per call, the leakiest first."""
    ranked = [
        Ranked(task=name, calls=s.count, median_bytes=s.median, mean_bytes=s.mean,
               total_bytes=s.total, leaky=s.count >= min_calls and s.median >= LEAK_MEDIAN)
        for name, s in stats.items()
    ]
    ranked.sort(key=lambda r: (r.leaky, r.median_bytes, r.mean_bytes), reverse=True)
    return ranked[:top]
