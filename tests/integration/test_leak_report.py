"""Leak intelligence with a real worker: the leaking task is named, predictive recycling."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.builders import MiB
from tests.support import ROOT, Daemon, RssSampler, Worker

pytestmark = pytest.mark.slow


def test_a_mix_of_leaking_cache_and_spiky_tasks_ranks_the_leak_first(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """The report names the task that leaves memory behind on every call."""
    daemon = start_daemon(limits={"soft": "1GiB", "hard": "2GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    rng = random.Random(3)
    plan = rng.choices([("keep", 0.5), ("warm", 8), ("spiky", 100)], weights=[4, 3, 3], k=150)
    for result in [worker.send(name, arg) for name, arg in plan]:
        result.get(timeout=60)
    time.sleep(0.6)  # a tick publishes the ranking
    tasks = daemon.status()["tasks"]
    assert tasks[0]["task"] == "tests.apps.leaky.keep", tasks
    assert tasks[0]["leaky"]
    assert abs(tasks[0]["median_growth_bytes"] - 0.5 * MiB) < 0.1 * MiB
    verdicts = {t["task"]: t["leaky"] for t in tasks}
    assert verdicts["tests.apps.leaky.warm"] is False
    assert verdicts["tests.apps.leaky.spiky"] is False
    report = subprocess.run([sys.executable, "-m", "celery_memguard", "report", "--url", daemon.url],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    assert "leaking task: tests.apps.leaky.keep" in report.stdout


def test_predictive_recycling_keeps_the_peak_under_the_soft_limit_itself(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """The 2 MiB-per-task leak with predictive recycling: no sample above 120 MiB."""
    daemon = start_daemon(limits={"soft": "120MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms"}, recycle={"predictive": True})
    worker = start_worker(socket_path=daemon.socket_path)
    with RssSampler(worker.pid) as sampler:
        for result in [worker.send("keep", 2) for _ in range(200)]:
            result.get(timeout=60)
        time.sleep(0.3)
    print(f"predictive: peak {sampler.max_rss / MiB:.1f} MiB over {len(sampler.peak)} children")
    assert len(worker.runs()) == 200
    assert daemon.metric("celery_memguard_recycles_total", reason="predicted") >= 1
    assert sampler.max_rss < 120 * MiB, f"peak {sampler.max_rss / MiB:.1f} MiB"
