"""Leak trends from task-boundary samples: leaks flagged and measured, plateaus, spikes and steps not.

The series are synthetic and seeded: RSS in bytes after each task, gaussian noise plus an
occasional outlier of 20..100 MiB either way, task durations of 0.5..1.5 times a mean.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import pytest

from celery_memguard.daemon.leak_trend import (
    History,
    Trend,
    recommend_max_tasks,
    seconds_to_limit,
    tasks_to_limit,
)
from tests.builders import MiB

KiB = 1024
FRESH = 90 * MiB  # a fresh child's RSS
TASKS = 160
SEEDS = (1, 2, 3)
LEAKS = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 8 * MiB)
NOISES = (256 * KiB, 1 * MiB)


def noisy(rng: random.Random, clean: Sequence[float], noise: float, outliers: float = 0.03) -> list[int]:
    out = []
    for value in clean:
        jump = rng.choice((-1, 1)) * rng.uniform(20, 100) * MiB if rng.random() < outliers else 0.0
        out.append(int(value + rng.gauss(0, noise) + jump))
    return out


def leak(rng: random.Random, per_task: float, noise: float, start: int = 0) -> list[int]:
    return noisy(rng, [FRESH + per_task * max(0, i - start) for i in range(TASKS)], noise)


def warm_up(rng: random.Random, over: int, noise: float, shape: str) -> list[int]:
    """+30 MiB over the first ``over`` tasks (linear, or approaching it exponentially), then flat."""
    if shape == "linear":
        clean = [FRESH + 30 * MiB * min(i, over) / over for i in range(TASKS)]
    else:
        clean = [FRESH + 30 * MiB * (1 - math.exp(-3 * i / over)) for i in range(TASKS)]
    return noisy(rng, clean, noise)


def sawtooth(rng: random.Random, every: int, noise: float) -> list[int]:
    """Flat, but every ``every``-th task leaves 50..200 MiB behind until the next one frees it."""
    spikes = [rng.uniform(50, 200) * MiB if i % every == every - 1 else 0.0 for i in range(TASKS)]
    return noisy(rng, [FRESH + spike for spike in spikes], noise, outliers=0)


def step(rng: random.Random, at: int, size: int, noise: float) -> list[int]:
    """A cache filled once at task ``at``, then flat."""
    return noisy(rng, [FRESH + (size if i >= at else 0) for i in range(TASKS)], noise)


def replay(rss: Sequence[int], rng: random.Random, seconds_per_task: float = 0.5,
           every: int = 1) -> list[Trend]:
    """The trend after each sample, samples taken every ``every`` tasks."""
    history = History()
    trends = []
    at = 1000.0
    for i, value in enumerate(rss):
        at += seconds_per_task * every * rng.uniform(0.5, 1.5)
        history.add(i * every, value, at)
        trends.append(history.trend())
    return trends


@cache
def steady(per_task: int, noise: int, seed: int) -> tuple[Trend, ...]:
    rng = random.Random(seed)
    return tuple(replay(leak(rng, per_task, noise), rng))


def first_flag(trends: Sequence[Trend]) -> int | None:
    return next((i for i, trend in enumerate(trends) if trend.leaking), None)


def flagged_at(trends: Sequence[Trend]) -> list[int]:
    return [i for i, trend in enumerate(trends) if trend.leaking]


STEADY = [pytest.param(per_task, noise, seed, id=f"{per_task // KiB}KiB-noise{noise // KiB}KiB-seed{seed}")
          for per_task in LEAKS for noise in NOISES for seed in SEEDS]


@pytest.mark.parametrize(("per_task", "noise", "seed"), STEADY)
def test_a_steady_leak_is_flagged_within_50_tasks_and_stays_flagged(per_task: int, noise: int,
                                                                    seed: int) -> None:
    """Every leak of 256 KiB a task or more is flagged by task 50 and at every task after it."""
    trends = steady(per_task, noise, seed)
    first = first_flag(trends)
    assert first is not None
    assert first <= 50
    assert all(trend.leaking for trend in trends[50:])


@pytest.mark.parametrize(("per_task", "noise", "seed"), STEADY)
def test_a_flagged_steady_leak_is_measured_within_20_percent(per_task: int, noise: int, seed: int) -> None:
    """Whenever a steady leak is flagged, bytes_per_task is within 20 % of the true leak."""
    trends = steady(per_task, noise, seed)
    errors = [abs(trend.bytes_per_task / per_task - 1) for trend in trends if trend.leaking]
    assert errors
    assert max(errors) < 0.2


@pytest.mark.parametrize("seconds_per_task", [0.05, 0.5, 7.0])
@pytest.mark.parametrize("per_task", [512 * KiB, 4 * MiB])
def test_bytes_per_second_is_the_leak_at_the_task_rate(seconds_per_task: float, per_task: int) -> None:
    """A flagged leak grows per second by its leak per task times the tasks done per second."""
    rng = random.Random(7)
    trends = replay(leak(rng, per_task, 512 * KiB), rng, seconds_per_task=seconds_per_task)
    for trend in trends[50:]:
        assert trend.leaking
        assert trend.bytes_per_second == pytest.approx(per_task / seconds_per_task, rel=0.2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("per_task", [256 * KiB, 1 * MiB])
def test_a_leak_that_starts_late_is_flagged_within_50_tasks(per_task: int, noise: int, seed: int) -> None:
    """Flat for 60 tasks, then leaking: not flagged while flat, flagged and within 20 % from 50 tasks on."""
    rng = random.Random(seed)
    trends = replay(leak(rng, per_task, noise, start=60), rng)
    assert not any(trend.leaking for trend in trends[:61])
    assert all(trend.leaking for trend in trends[110:])
    assert all(abs(trend.bytes_per_task / per_task - 1) < 0.2 for trend in trends[110:])


@pytest.mark.parametrize("seed", SEEDS)
def test_a_leak_after_a_warm_up_is_flagged_and_measured_once_the_warm_up_leaves_the_window(seed: int) -> None:
    """+30 MiB over 15 tasks, then 1 MiB a task: flagged and within 20 % from 50 tasks into the leak."""
    rng = random.Random(seed)
    clean = [FRESH + 30 * MiB * min(i, 15) / 15 + MiB * max(0, i - 15) for i in range(TASKS)]
    trends = replay(noisy(rng, clean, 512 * KiB), rng)
    assert all(trend.leaking for trend in trends[65:])
    assert all(abs(trend.bytes_per_task / MiB - 1) < 0.2 for trend in trends[65:])


QuietSeries = Callable[[random.Random], list[int]]
QUIET: list[tuple[str, QuietSeries]] = [
    *((f"warm-up-{shape}-{over}-noise{noise // KiB}KiB",
       lambda rng, over=over, noise=noise, shape=shape: warm_up(rng, over, noise, shape))
      for shape in ("linear", "exponential") for over in (10, 15, 20) for noise in NOISES),
    *((f"sawtooth-every-{every}-noise{noise // KiB}KiB",
       lambda rng, every=every, noise=noise: sawtooth(rng, every, noise))
      for every in (2, 3, 5, 8, 10) for noise in NOISES),
    *((f"step-{size // MiB}MiB-at-{at}-noise{noise // KiB}KiB",
       lambda rng, size=size, at=at, noise=noise: step(rng, at, size, noise))
      for size in (16 * MiB, 32 * MiB, 100 * MiB, 200 * MiB) for at in (40, 70) for noise in NOISES),
    ("flat-noise-1MiB", lambda rng: noisy(rng, [FRESH] * TASKS, MiB)),
    ("flat-heavy-outliers", lambda rng: noisy(rng, [FRESH] * TASKS, 512 * KiB, outliers=0.15)),
    ("gc-ramp-5MiB-for-8-tasks",
     lambda rng: noisy(rng, [FRESH + 5 * MiB * (i % 8) for i in range(TASKS)], MiB)),
    ("shrinking", lambda rng: leak(rng, -MiB, 512 * KiB)),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("series", [pytest.param(make, id=name) for name, make in QUIET])
def test_plateaus_spikes_and_steps_are_never_flagged(series: QuietSeries, seed: int) -> None:
    """No warm-up plateau, sawtooth of temporary spikes or single step is flagged, at any task."""
    rng = random.Random(seed)
    trends = replay(series(rng), rng)
    assert flagged_at(trends) == []


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", ["linear", "exponential"])
def test_a_finished_warm_up_is_marked_as_a_plateau(shape: str, seed: int) -> None:
    """Soon after a warm-up ends (tasks 32 to 44) the trend says plateau, not leaking; later it does not."""
    rng = random.Random(seed)
    trends = replay(warm_up(rng, 15, MiB, shape), rng)
    assert all(trend.plateau and not trend.leaking for trend in trends[32:45])
    assert not any(trend.plateau for trend in trends[-20:])  # the warm-up has left the window


def test_neither_a_leak_nor_noise_is_a_plateau() -> None:
    """The plateau flag needs growth that stopped: a steady leak and flat noise never show one."""
    rng = random.Random(4)
    assert not any(trend.plateau for trend in steady(MiB, MiB, 1))
    assert not any(trend.plateau for trend in replay(noisy(rng, [FRESH] * TASKS, MiB), rng))


def test_noise_free_series_are_exact() -> None:
    """An exact leak is flagged with its exact slope; an exact step and a constant RSS are not leaks."""
    rng = random.Random(0)
    exact = replay([FRESH + 300 * KiB * i for i in range(100)], rng)[-1]
    assert exact.leaking
    assert exact.bytes_per_task == pytest.approx(300 * KiB)
    assert exact.error == pytest.approx(0.0, abs=1.0)
    assert not any(t.leaking for t in replay([FRESH + (30 * MiB if i >= 40 else 0) for i in range(100)], rng))
    constant = replay([FRESH] * 100, rng)
    assert not any(t.leaking for t in constant)
    assert constant[-1].bytes_per_task == 0.0


def test_a_leak_in_whole_pages_is_found_even_below_a_page_per_task() -> None:
    """RSS moves in 4 KiB pages: 1 KiB a task shows as a page every 4 tasks and is still a leak."""
    rng = random.Random(0)
    trend = replay([FRESH + (KiB * i) // 4096 * 4096 for i in range(100)], rng)[-1]
    assert trend.leaking
    assert trend.bytes_per_task == pytest.approx(KiB, rel=0.1)


def test_the_slope_is_per_task_when_samples_skip_tasks() -> None:
    """Samples taken every third task still give the leak per task, not per sample."""
    rng = random.Random(5)
    clean = [FRESH + MiB * 3 * i for i in range(100)]
    trend = replay(noisy(rng, clean, 256 * KiB), rng, every=3)[-1]
    assert trend.leaking
    assert trend.bytes_per_task == pytest.approx(MiB, rel=0.05)


def test_nothing_is_flagged_before_min_samples() -> None:
    """Even an exact leak waits for 5/8 of a window of samples, but its slope is reported meanwhile."""
    history = History(window=64)
    for i in range(39):
        history.add(i, FRESH + MiB * i, float(i))
    trend = history.trend()
    assert (trend.leaking, trend.samples) == (False, 39)
    assert trend.bytes_per_task == pytest.approx(MiB)
    history.add(39, FRESH + MiB * 39, 39.0)
    assert history.trend().leaking


@pytest.mark.parametrize("samples", [0, 1])
def test_too_few_samples_give_an_unknown_trend(samples: int) -> None:
    """With no pair of samples, every slope is 0.0 and nothing is flagged."""
    history = History()
    for i in range(samples):
        history.add(i, FRESH, float(i))
    assert history.trend() == Trend(bytes_per_task=0.0, bytes_per_second=0.0, leaking=False, samples=samples)


def test_the_window_is_bounded() -> None:
    """Ten thousand samples later the window still holds 64: memory does not grow with samples."""
    history = History(window=64)
    for i in range(10_000):
        history.add(i, FRESH + MiB * i, i * 0.5)
    assert len(history) == history.window == 64
    trend = history.trend()
    assert trend.samples == 64
    assert trend.leaking
    assert trend.bytes_per_task == pytest.approx(MiB)
    assert trend.bytes_per_second == pytest.approx(2 * MiB)


def test_a_task_count_that_goes_back_is_refused() -> None:
    """A count that restarts (a new process in the slot) raises: the caller starts a new History."""
    history = History()
    history.add(40, FRESH, 10.0)
    with pytest.raises(ValueError, match="new History"):
        history.add(0, FRESH, 11.0)
    with pytest.raises(ValueError, match="goes back"):
        history.add(41, FRESH, 9.0)
    assert len(history) == 1


def test_the_same_task_count_again_replaces_its_sample() -> None:
    """A repeated report of one task boundary keeps one sample, the newer one."""
    history = History()
    for i in range(40):
        history.add(i, FRESH, float(i))
    history.add(39, FRESH + 100 * MiB, 39.5)
    assert len(history) == 40
    assert history.trend().bytes_per_task == 0.0  # one outlier, not a second sample


def test_the_trend_is_computed_once_per_sample() -> None:
    """trend() returns the cached object until the next add()."""
    history = History()
    for i in range(40):
        history.add(i, FRESH + MiB * i, float(i))
    first = history.trend()
    assert history.trend() is first
    history.add(40, FRESH + MiB * 40, 40.0)
    assert history.trend() is not first


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"window": 4}, "at least 8"),
    ({"window": 64, "min_samples": 4}, "min_samples"),
    ({"window": 64, "min_samples": 65}, "min_samples"),
    ({"z": 0.0}, "z must be positive"),
    ({"rho": 1.0}, "rho"),
])
def test_bad_history_settings_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    """A window too short to split, a minimum outside it, or thresholds out of range are refused."""
    with pytest.raises(ValueError, match=fragment):
        History(**kwargs)


LEAKING = Trend(bytes_per_task=MiB, bytes_per_second=4 * MiB, leaking=True, samples=64)
PLATEAU = Trend(bytes_per_task=MiB, bytes_per_second=4 * MiB, leaking=False, samples=64, plateau=True)
SHRINKING = Trend(bytes_per_task=-MiB, bytes_per_second=-4 * MiB, leaking=True, samples=64)


@pytest.mark.parametrize(("trend", "current", "limit", "tasks", "seconds"), [
    (LEAKING, 100 * MiB, 200 * MiB, 100.0, 25.0),
    (LEAKING, 100 * MiB, 100 * MiB + KiB, 1 / 1024, 1 / 4096),
    (LEAKING, 200 * MiB, 200 * MiB, 0.0, 0.0),  # at the limit
    (LEAKING, 300 * MiB, 200 * MiB, 0.0, 0.0),  # over it
    (PLATEAU, 300 * MiB, 200 * MiB, 0.0, 0.0),  # over it without a leak is over it all the same
    (PLATEAU, 100 * MiB, 200 * MiB, None, None),
    (SHRINKING, 100 * MiB, 200 * MiB, None, None),
    (Trend(bytes_per_task=0.0, bytes_per_second=0.0, leaking=False, samples=0), 0, 1, None, None),
])
def test_time_to_limit_at_the_current_rate(trend: Trend, current: int, limit: int, tasks: float | None,
                                           seconds: float | None) -> None:
    """Tasks and seconds to a limit: None when not leaking, 0 at or over it, else headroom / rate."""
    assert tasks_to_limit(trend, current, limit) == (None if tasks is None else pytest.approx(tasks))
    assert seconds_to_limit(trend, current, limit) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(("bytes_per_task", "fresh", "soft", "expected"), [
    (0.0, 90 * MiB, 500 * MiB, None),  # no leak, nothing to recommend
    (-MiB, 90 * MiB, 500 * MiB, None),
    (math.nan, 90 * MiB, 500 * MiB, None),
    (5e-324, 90 * MiB, 500 * MiB, None),  # so small the count overflows: no leak to speak of
    (3 * MiB, 100 * MiB, 200 * MiB, 33),  # 33.3 rounds down
    (MiB, 100 * MiB, 200 * MiB, 99),  # 100 tasks would land on the limit, which is not under it
    (1.5 * MiB, 100 * MiB, 200 * MiB, 66),
    (200 * MiB, 100 * MiB, 200 * MiB, 0),  # one task already reaches it
    (MiB, 200 * MiB, 200 * MiB, 0),  # a fresh child at the limit: no count helps
    (MiB, 300 * MiB, 200 * MiB, 0),
    (1.0, 0, 10**9, 10**9 - 1),
])
def test_recommended_max_tasks_keeps_a_child_under_the_soft_limit(bytes_per_task: float, fresh: int,
                                                                  soft: int, expected: int | None) -> None:
    """The largest task count whose RSS stays strictly under soft; None without a leak, 0 when none does."""
    count = recommend_max_tasks(bytes_per_task, fresh, soft)
    assert count == expected
    if count:
        assert fresh + count * bytes_per_task < soft <= fresh + (count + 1) * bytes_per_task


def test_recommendation_from_a_measured_leak() -> None:
    """A measured 2 MiB leak from 90 MiB under a 500 MiB limit recommends about 205 tasks."""
    trend = steady(2 * MiB, MiB, 1)[-1]
    count = recommend_max_tasks(trend.bytes_per_task, FRESH, 500 * MiB)
    assert count is not None
    assert 195 <= count <= 215
