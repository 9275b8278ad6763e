"""The hard limit with real workers: runaway tasks are interrupted mid-task, stubborn ones killed."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from celery_memguard import MemoryLimitExceeded
from celery_memguard.daemon.procs import Procs
from tests.builders import MiB
from tests.support import Daemon, RssSampler, Worker

pytestmark = pytest.mark.slow

HARD = 300 * MiB


@pytest.mark.parametrize("interval", ["250ms", "5s"])
def test_a_runaway_task_is_interrupted_near_the_hard_limit_whatever_the_tick(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
        interval: str) -> None:
    """16 MiB every 20 ms against hard 300 MiB: stopped with MemoryLimitExceeded under 364 MiB."""
    daemon = start_daemon(limits={"soft": "250MiB", "hard": "300MiB"},
                          sampling={"interval": interval})
    worker = start_worker(socket_path=daemon.socket_path)
    time.sleep(0.5)  # the children read the published hard limit at start
    with RssSampler(worker.pid) as sampler:
        result = worker.send("runaway", 16, 0.02, 640)
        with pytest.raises(MemoryLimitExceeded) as info:
            result.get(timeout=30)
    message = str(info.value)
    assert "over the hard limit of 300.0 MiB" in message, message
    assert info.value.limit == HARD
    assert info.value.rss > HARD
    assert result.state == "FAILURE"
    print(f"runaway stopped: peak {sampler.max_rss / MiB:.1f} MiB, interrupted at "
          f"{info.value.rss / MiB:.1f} MiB")
    assert sampler.max_rss <= HARD + 64 * MiB, f"peak {sampler.max_rss / MiB:.1f} MiB"

    after = [worker.send("noop") for _ in range(20)]
    assert all(r.get(timeout=20) for r in after)
    assert worker.proc.poll() is None  # the same worker went on serving
    deadline = time.monotonic() + 10
    while daemon.metric("celery_memguard_recycles_total", reason="hard") < 1:
        assert time.monotonic() < deadline, daemon.output()
        time.sleep(0.1)
    assert daemon.metric("celery_memguard_interrupted_tasks_total",
                         task="tests.apps.leaky.runaway", reason="hard") == 1
    [event] = [e for e in daemon.events() if e.get("event") == "task_interrupted"]
    assert event["task_id"] == result.id
    assert event["rss_bytes"] > event["limit_bytes"] == HARD


def test_a_task_that_ran_another_inside_is_still_watched(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """The inner task's end (apply(), Celery's task signals) does not disarm the outer's watch."""
    daemon = start_daemon(limits={"soft": "250MiB", "hard": "300MiB"},
                          sampling={"interval": "5s"})
    worker = start_worker(socket_path=daemon.socket_path)
    time.sleep(0.5)  # the children read the published hard limit at start
    with RssSampler(worker.pid) as sampler:
        result = worker.send("nested", 0, 640)
        with pytest.raises(MemoryLimitExceeded):
            result.get(timeout=30)
    assert sampler.max_rss <= HARD + 64 * MiB, f"peak {sampler.max_rss / MiB:.1f} MiB"


def test_a_task_that_swallows_the_interruption_is_killed_and_the_worker_serves_on(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """Still above hard kill_after later: SIGTERM (then SIGKILL), within kill_after + one tick."""
    kill_after, tick = 2.0, 0.5
    daemon = start_daemon(limits={"soft": "250MiB", "hard": "300MiB", "kill_after": f"{kill_after}s"},
                          sampling={"interval": f"{tick}s"})
    worker = start_worker(socket_path=daemon.socket_path)
    time.sleep(0.5)
    procs = Procs()
    result = worker.send("stubborn", 16, 0.02, 480, 60)
    crossed_at = None
    victim = None
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, daemon.output()
        for child in procs.children(worker.pid):
            rss = procs.rss(child.pid) or 0
            if crossed_at is None and rss > HARD:
                crossed_at, victim = time.monotonic(), child.pid
        if victim is not None and procs.stat(victim) is None:
            gone_at = time.monotonic()
            break
        time.sleep(0.02)
    assert crossed_at is not None
    print(f"stubborn task's child gone {gone_at - crossed_at:.2f}s after crossing the hard limit")
    assert gone_at - crossed_at <= kill_after + tick + 0.5, f"killed after {gone_at - crossed_at:.2f}s"
    with pytest.raises(Exception, match=r"(?i)worker|lost|exit"):
        result.get(timeout=20)
    after = [worker.send("noop") for _ in range(20)]
    assert all(r.get(timeout=20) for r in after)
    assert daemon.metric("celery_memguard_recycles_total", reason="kill") == 1
    kills = [e for e in daemon.events() if e.get("event") == "kill_sent"]
    assert kills[0]["signal"] == "SIGTERM"
    assert kills[0]["pid"] == victim
    assert (kills[0]["task"], kills[0]["task_id"]) == ("tests.apps.leaky.stubborn", result.id)
    assert daemon.metric("celery_memguard_interrupted_tasks_total",
                         task="tests.apps.leaky.stubborn", reason="kill") == 1
