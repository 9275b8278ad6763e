"""Leak trends from task-boundary RSS samples: how fast a child grows, and whether it is a leak.

Pure: the daemon adds each child's samples (task count, RSS, monotonic time) to that child's
History and reads a Trend; nothing here reads a clock or a process.

The slope, in two steps. First a robust line: over a span of m samples, the median of the m/2
slopes of the pairs half a span apart, (i, i + m/2). Each sample enters one pair only, so with
fewer than a quarter of the samples arbitrarily wrong (outliers, spikes) the median still lies
among clean pairs; every pair has the longest baseline the span allows; and it costs m/2
subtractions and a sort, where Theil-Sen takes all m(m-1)/2 pairs (2016 at m = 64). Its price is
efficiency: under gaussian noise its variance is about twice that of least squares. So, second,
least squares over the samples within CUT sigmas of the robust line (sigma from the residuals'
interquartile range): the outliers are gone, the rest count at full efficiency, and the residuals
give a standard error that grows when the span is no line at all (a step, a bend).

A leak, not a plateau, a step or spikes. A span of samples leaks when
1. each half of the span, measured alone by its pair median, grows between ``rho`` (1/2) and
   1/rho times as fast as the whole span. A single step lies in one half at most and leaves the
   other flat (or, on the boundary, both); a warm-up that has ended leaves the newer half flat;
   spikes cancel in the medians; a steady leak grows alike in both halves;
2. its least-squares slope is at least ``z`` (10) standard errors: real, and known to about
   +-10 %, which noise and spikes (they are cut, or widen the residuals) do not reach.
Nothing is flagged before ``min_samples`` (5/8 of the window, 40 of 64): by then even a 256 KiB
leak in 1 MiB of noise has a standard error near 5 %, so a slope flagged at once is already within
20 %. The whole window is tried, then its newer 3/4 when that holds min_samples, so a leak that
starts late is flagged once it fills most of the newer 3/4, without waiting for the whole window.
The slopes reported are those of the longest span that leaks, else the whole window's pair median.
The cheap median tests run first: most children do not leak, and most that grew did not leak.

The plateau flag is for the log, not for action: RSS rose (median levels, so spikes do not count)
from the window's oldest quarter to its newer half, and the newer half no longer grows: a warm-up
that ended, or a one-off step. bytes_per_second is bytes_per_task times the task rate over the
same span: RSS is sampled only at task boundaries, so a second, noisier fit over time adds nothing.

Known limits, measured with the tests' synthetic series (a 256 KiB leak in 1 MiB noise is the
hardest). A step of a few noise sigmas looks much like a slow leak: one of 4 sigmas was flagged
for a few samples in 3 to 8 % of the series, one of 8 sigmas or more never (in 100 seeds; the
tests' steps are 16 sigmas and more). A leak is flagged while the window still holds what came
before it, and its slope is then off: a flat stretch before a late leak lowers it (by up to a
quarter when the noise per sample is as large as the leak per task, about half when the noise is
four times the leak), a warm-up before it raises it (up to 40 %); both are back to about 20 % once
the leak has run for 50 tasks. Two steps, one in each half, do look like a leak: repeated growth
is one, a slow one.

A child's task counter starts at 0 again when the pool slot is refilled by a new process. History
refuses a task count that goes back: the caller keeps one History per process (keyed by its
ProcId) and starts a new one for the new process, never feeding two processes into one window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from operator import mul, sub

Z = 10.0  # a leak's least-squares slope is at least this many standard errors
RHO = 0.5  # each half of a leaking span grows between RHO and 1/RHO times the span's rate
PRE_Z = 3.0  # the pair median's own bar, before the dearer tests run
CUT = 3.5  # samples further than this many sigmas from the robust line are outliers
PAGE = 4096  # RSS moves in pages: a residual within a page is never an outlier
_IQR_SIGMA = 1.349  # interquartile range of a gaussian, in sigmas
_SE_OF_MEDIAN = math.sqrt(math.pi / 2) / _IQR_SIGMA  # IQR -> standard error of a median, times sqrt(n)


@dataclass(frozen=True, slots=True)
class Trend:
    """The growth of one child over its recent task boundaries."""

    bytes_per_task: float  # robust slope of RSS over task count (0.0 if unknown)
    bytes_per_second: float  # bytes_per_task times the task rate over the same span (0.0 if unknown)
    leaking: bool  # a steady leak, not a plateau, not spikes, not a single step
    samples: int  # samples in the window
    span: int = 0  # the newest samples the slopes were measured over
    error: float = math.inf  # standard error of bytes_per_task
    plateau: bool = False  # rose since the window's oldest quarter, no longer grows: warm-up or a step


class _Window:
    """One trend computation's samples, with each span's pair-median fit computed once."""

    __slots__ = ("_fits", "x", "y")

    def __init__(self, x: list[int], y: list[int]) -> None:
        self.x = x
        self.y = y
        self._fits: dict[tuple[int, int], tuple[float, float]] = {}

    def fit(self, lo: int, m: int) -> tuple[float, float]:
        """Median slope of the pairs half a span apart in samples [lo, lo + m), and its standard error.

        Tasks increase strictly (History keeps one sample per task count): no pair divides by 0.
        """
        known = self._fits.get((lo, m))
        if known is not None:
            return known
        x, y = self.x, self.y
        h = (m + 1) // 2
        k = m - h
        if k < 4:
            found = (self._median(lo, h, k), math.inf)
        else:
            if x[lo + m - 1] - x[lo] == m - 1:  # one sample per task: every pair is h tasks apart
                scale = 1 / h
                slopes = sorted(map(sub, y[lo + h:lo + h + k], y[lo:lo + k]))
            else:
                scale = 1.0
                slopes = sorted([(y1 - y0) / (x1 - x0) for y0, y1, x0, x1 in zip(
                    y[lo:lo + k], y[lo + h:lo + h + k], x[lo:lo + k], x[lo + h:lo + h + k], strict=True)])
            mid = k // 2
            median = scale * (slopes[mid] if k % 2 else (slopes[mid - 1] + slopes[mid]) / 2)
            spread = scale * (slopes[(3 * k) // 4] - slopes[k // 4])
            found = (median, _SE_OF_MEDIAN * spread / math.sqrt(k))
        self._fits[lo, m] = found
        return found

    def _median(self, lo: int, h: int, k: int) -> float:
        """The pair median of a span too short to tell its error."""
        if k < 1:
            return 0.0
        x, y = self.x, self.y
        slopes = sorted([(y[i + h] - y[i]) / (x[i + h] - x[i]) for i in range(lo, lo + k)])
        mid = k // 2
        return slopes[mid] if k % 2 else (slopes[mid - 1] + slopes[mid]) / 2

    def refine(self, lo: int, m: int, slope: float) -> tuple[float, float]:
        """Least squares over the samples near the robust line of ``slope``, and its standard error.

        Fits the residuals from that line, which are small numbers. Infinite error when fewer than
        half the samples are near the line: then it is no line.
        """
        xs = self.x[lo:lo + m]
        residuals = [yy - slope * xx for xx, yy in zip(xs, self.y[lo:lo + m], strict=True)]
        ordered = sorted(residuals)
        centre = ordered[m // 2]
        cut = max(CUT * (ordered[(3 * m) // 4] - ordered[m // 4]) / _IQR_SIGMA, PAGE)
        low, high = centre - cut, centre + cut
        k, sx, sr = m, sum(xs), sum(residuals)
        # one sample per task (the usual case): the sum of squares has a closed form
        sxx = sx * sx / m + (m * m - 1) * m / 12 if xs[-1] - xs[0] == m - 1 else sum(map(mul, xs, xs))
        sxr, srr = sum(map(mul, xs, residuals)), sum(map(mul, residuals, residuals))
        if ordered[0] < low or ordered[-1] > high:
            for xx, r in zip(xs, residuals, strict=True):
                if not low <= r <= high:
                    k, sx, sr = k - 1, sx - xx, sr - r
                    sxx, sxr, srr = sxx - xx * xx, sxr - xx * r, srr - r * r
        if 2 * k < m or k < 4:
            return slope, math.inf
        sxx -= sx * sx / k
        sxr -= sx * sr / k
        srr -= sr * sr / k
        correction = sxr / sxx
        return slope + correction, math.sqrt(max(srr - correction * sxr, 0.0) / (k - 2) / sxx)

    def leaks(self, lo: int, m: int, z: float, rho: float) -> tuple[float, float] | None:
        """The span's slope and its error when the span is a steady leak, else None."""
        rough, error = self.fit(lo, m)
        if rough <= 0 or rough < PRE_Z * error:
            return None
        half = m // 2
        newer, _ = self.fit(lo + half, m - half)
        if not rho * rough <= newer <= rough / rho:
            return None
        older, _ = self.fit(lo, half)
        if not rho * rough <= older <= rough / rho:
            return None
        slope, error = self.refine(lo, m, rough)
        if slope <= 0 or slope < z * error:
            return None
        return slope, error

    def plateau(self) -> bool:
        """RSS rose from the oldest quarter to the newer half, and the newer half no longer grows.

        Levels are medians, so spikes and outliers do not raise them; the rise must beat three
        sigmas of the newer half's spread, and the newer half must account for under half of it.
        """
        n = len(self.x)
        quarter, half = n // 4, n // 2
        newer = sorted(self.y[half:])
        level = newer[len(newer) // 2]
        rise = level - sorted(self.y[:quarter])[quarter // 2]
        sigma = (newer[(3 * len(newer)) // 4] - newer[len(newer) // 4]) / _IQR_SIGMA
        if rise <= max(PRE_Z * sigma, PAGE):
            return False
        slope, _ = self.fit(half, n - half)
        return slope * (self.x[-1] - self.x[half]) < rise / 2


class History:
    """Bounded window of task-boundary samples for one child; O(1) append.

    One History per process: a task count that goes back (a new process in the same pool slot)
    is refused, and the caller starts a new History for it. ``min_samples`` (5/8 of the window),
    ``z`` and ``rho`` are the tests above; the defaults are the ones the test series measure.
    min_samples must be over twice a warm-up: the default 40 tells warm-ups of up to 20 tasks from
    leaks, a window of 32 (min_samples 20) takes a 15-task warm-up for one.
    """

    __slots__ = ("_at", "_cached", "_min_samples", "_rho", "_rss", "_tasks", "_z")

    def __init__(self, window: int = 64, *, min_samples: int | None = None, z: float = Z,
                 rho: float = RHO) -> None:
        if window < 8:
            raise ValueError(f"window must hold at least 8 samples, not {window}")
        self._min_samples = max(8, 5 * window // 8) if min_samples is None else min_samples
        if not 8 <= self._min_samples <= window:
            raise ValueError(f"min_samples must be from 8 to the window ({window}), not {min_samples}")
        if not (z > 0 and 0 < rho < 1):
            raise ValueError(f"z must be positive and rho between 0 and 1, not z={z}, rho={rho}")
        self._tasks: deque[int] = deque(maxlen=window)
        self._rss: deque[int] = deque(maxlen=window)
        self._at: deque[float] = deque(maxlen=window)
        self._z = z
        self._rho = rho
        self._cached: Trend | None = None

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def last_at(self) -> float | None:
        return self._at[-1] if self._at else None

    @property
    def window(self) -> int:
        maxlen = self._tasks.maxlen
        assert maxlen is not None
        return maxlen

    def add(self, tasks: int, rss: int, at: float) -> None:
        """Record the RSS after ``tasks`` tasks at monotonic time ``at``; the same count again replaces it.

        Raises ValueError when the task count or the time goes back: that is another process.
        """
        if self._tasks:
            last_tasks, last_at = self._tasks[-1], self._at[-1]
            if tasks < last_tasks or at < last_at:
                raise ValueError(f"sample goes back (tasks {last_tasks} -> {tasks}, at {last_at} -> {at}): "
                                 "a new process needs a new History")
            if tasks == last_tasks:
                self._tasks.pop()
                self._rss.pop()
                self._at.pop()
        self._tasks.append(tasks)
        self._rss.append(rss)
        self._at.append(at)
        self._cached = None

    def trend(self) -> Trend:
        """The window's trend, computed at most once per added sample."""
        if self._cached is None:
            self._cached = self._compute()
        return self._cached

    def _compute(self) -> Trend:
        n = len(self._tasks)
        if n < 2:
            return Trend(bytes_per_task=0.0, bytes_per_second=0.0, leaking=False, samples=n)
        first = self._tasks[0]  # task counts from the window's first: small numbers, exact squares
        window = _Window([tasks - first for tasks in self._tasks], list(self._rss))
        if n >= self._min_samples:
            for m in (n, 3 * n // 4):
                if m < self._min_samples:
                    break
                found = window.leaks(n - m, m, self._z, self._rho)
                if found is not None:
                    slope, error = found
                    return Trend(bytes_per_task=slope, bytes_per_second=slope * self._rate(n - m),
                                 leaking=True, samples=n, span=m, error=error)
        slope, error = window.fit(0, n)
        return Trend(bytes_per_task=slope, bytes_per_second=slope * self._rate(0), leaking=False, samples=n,
                     span=n, error=error, plateau=n >= max(16, self.window // 2) and window.plateau())

    def _rate(self, lo: int) -> float:
        """Tasks per second from sample ``lo`` to the newest: RSS moves at task boundaries only."""
        seconds = self._at[-1] - self._at[lo]
        return (self._tasks[-1] - self._tasks[lo]) / seconds if seconds > 0 else 0.0


def tasks_to_limit(trend: Trend, current: int, limit: int) -> float | None:
    """Tasks until ``current`` bytes reach ``limit`` at the trend's rate; 0.0 when already there.

    None when the child is not leaking: a plateau or spikes do not reach a limit by trend.
    """
    if current >= limit:
        return 0.0
    if not trend.leaking or trend.bytes_per_task <= 0:
        return None
    return (limit - current) / trend.bytes_per_task


def seconds_to_limit(trend: Trend, current: int, limit: int) -> float | None:
    """Seconds until ``current`` bytes reach ``limit`` at the trend's rate; 0.0 when already there."""
    if current >= limit:
        return 0.0
    if not trend.leaking or trend.bytes_per_second <= 0:
        return None
    return (limit - current) / trend.bytes_per_second


def recommend_max_tasks(bytes_per_task: float, fresh_rss: int, soft: int) -> int | None:
    """The largest ``--max-tasks-per-child`` that keeps a child strictly under ``soft``.

    A fresh child starts at ``fresh_rss`` and grows ``bytes_per_task`` a task, so after n tasks
    it holds fresh_rss + n * bytes_per_task, which must stay below ``soft`` (the policy recycles
    at the limit itself). None when it does not grow: nothing to recommend. 0 when not even one
    task fits (a fresh child at or over the limit, or one task's leak reaching it); Celery reads 0
    as "no limit", so a caller must not pass that on: only a higher limit helps such a child.
    """
    if not bytes_per_task > 0:
        return None
    headroom = soft - fresh_rss
    if headroom <= 0:
        return 0
    tasks = headroom / bytes_per_task
    if not math.isfinite(tasks):
        return None
    count = math.floor(tasks)
    if count * bytes_per_task >= headroom:  # landing exactly on the limit is not under it
        count -= 1
    return max(count, 0)
