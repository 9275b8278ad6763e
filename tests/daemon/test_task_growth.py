"""Per-task growth: histogram buckets and the ranking that names the leaking task."""

from __future__ import annotations

import random

from celery_memguard.daemon.task_growth import BUCKETS, MiB, TaskGrowth, rank


def test_histogram_buckets_are_cumulative_and_count_every_call() -> None:
    growth = TaskGrowth()
    for delta in (-2 * MiB, 0, 100 * 1024, 3 * MiB, 10**12):
        growth.add(delta)
    pairs = growth.cumulative()
    assert len(pairs) == len(BUCKETS)
    assert pairs[-1] == (float("inf"), 5)
    assert [n for _, n in pairs] == sorted(n for _, n in pairs)
    assert dict(pairs)[0] == 2  # -2 MiB (a free counts as no growth) and 0
    assert growth.total == 100 * 1024 + 3 * MiB + 10**12


def test_the_leaking_task_ranks_first_and_cache_and_spikes_are_not_leaky() -> None:
    """2 MiB per call leaks; a cache filled once per process and spikes that are freed do not."""
    rng = random.Random(7)
    stats = {"app.leak": TaskGrowth(), "app.cache": TaskGrowth(), "app.spiky": TaskGrowth()}
    for call in range(200):
        stats["app.leak"].add(2 * MiB + rng.randint(-50_000, 50_000))
        stats["app.cache"].add(8 * MiB if call % 50 == 0 else rng.randint(-4096, 4096))
        stats["app.spiky"].add(rng.choice([0, 0, 0, 4096, -4096, 40 * MiB, -30 * MiB]) // 10)
    ranked = rank(stats)
    assert ranked[0].task == "app.leak"
    assert {r.task: r.leaky for r in ranked} == {"app.leak": True, "app.cache": False,
                                                  "app.spiky": False}
    assert abs(ranked[0].median_bytes - 2 * MiB) < 64 * 1024


def test_too_few_calls_are_not_called_a_leak() -> None:
    growth = TaskGrowth()
    for _ in range(3):
        growth.add(8 * MiB)
    assert not rank({"app.new": growth})[0].leaky
