"""A worker in a real memory cgroup (cgroup v1 here): the container protected, not only each
child. Each test makes its own cgroup below this process's and removes it, killing only the
processes it started there; where no memory cgroup can be made, the tests skip saying why.

Measured without celery-memguard (agent not installed), the first scenario below: in a
520 MiB cgroup, concurrency 3, 12 tasks each holding 150 MiB for 1.5 s, the kernel OOM-killed
6, 9, 6 and 6 of the 12 tasks in four runs (WorkerLostError), while no child ever passed a
1 GiB soft limit (BENCHMARKS.md has the table).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import pytest

from celery_memguard.errors import MemoryLimitExceeded
from tests.builders import MiB
from tests.support import Daemon, MemoryCgroup, Worker, wait_for

pytestmark = pytest.mark.slow

HOLD = "hold"  # tests.apps.leaky.hold(mib, seconds, step_mib): a peak, no leak


def outcomes(results: list[Any], timeout: float = 120) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for result in results:
        try:
            result.get(timeout=timeout)
            seen["ok"] += 1
        except MemoryLimitExceeded as exc:
            seen[f"MemoryLimitExceeded:{exc.reason}"] += 1
        except Exception as exc:  # WorkerLostError, as Celery reports a child OOM-killed
            seen[type(exc).__name__] += 1
    return seen


@pytest.mark.parametrize("primed", [True, False], ids=["after-a-first-run", "fresh-worker"])
def test_children_under_their_limits_but_too_many_for_the_container_are_held_back(
        memory_cgroup: Callable[[int], MemoryCgroup], start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker], primed: bool) -> None:
    """520 MiB, concurrency 3, tasks that take 150 MiB in one allocation for 1.5 s: no child
    nears its own limits, three at once overflow the container. No OOM kill: each child waits
    before its task until the others have freed theirs, every task runs once and succeeds, and
    the waits are counted; nothing is recycled or interrupted. After one run of the task name
    its need is known to every child; on a fresh worker nothing knows it yet, so one child
    runs it first and the other two wait until its watch has written what it took."""
    group = memory_cgroup(520 * MiB)
    daemon = start_daemon(sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path, concurrency=3, cgroup=group)
    if primed:
        assert worker.send(HOLD, 150, 0.1).get(timeout=60)  # the task name's first run
        wait_for(lambda: daemon.metric("celery_memguard_task_peak_growth_bytes") >= 140 * MiB,
                 10, "the children did not share what the task needs")
    base = group.oom_kills()
    results = [worker.send(HOLD, 150, 1.5) for _ in range(12)]
    seen = outcomes(results)
    assert group.oom_kills() == base, daemon.output()
    assert seen == {"ok": 12}
    assert sorted(collections.Counter(worker.runs()).values()) == [1] * (13 if primed else 12)
    assert daemon.metric("celery_memguard_task_holds_total", worker=worker.name) >= 1
    assert daemon.metric("celery_memguard_oom_kills_total") == 0
    assert daemon.metric("celery_memguard_interrupted_tasks_total") == 0
    assert daemon.metric("celery_memguard_recycles_total") == 0
    peak = int((group.path / "memory.max_usage_in_bytes").read_text())
    assert peak < 520 * MiB


def test_an_oom_kill_is_counted_once_from_the_kernel_counter_with_its_task(
        memory_cgroup: Callable[[int], MemoryCgroup], start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    """A container too small for one task (one allocation: nothing can stop it half-way):
    the kernel kills the child, and the daemon counts exactly that kill, with the task's name
    and id, from the kernel's counter; the worker serves on."""
    group = memory_cgroup(200 * MiB)
    daemon = start_daemon(sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path, concurrency=1, cgroup=group)
    base = group.oom_kills()
    assert base == 0, f"OOM kills while the worker started: {worker.output()}"
    result = worker.send(HOLD, 300, 0.1)
    assert outcomes([result]) == {"WorkerLostError": 1}
    assert group.oom_kills() == base + 1
    try:
        wait_for(lambda: daemon.metric("celery_memguard_oom_kills_total", worker=worker.name,
                                       task="tests.apps.leaky.hold") == 1, 15, "not counted")
    except AssertionError:
        metrics = [line for line in daemon.get("/metrics").splitlines()
                   if worker.name in line or "messages" in line]
        raise AssertionError("\n".join([*metrics, daemon.output(), worker.output()])) from None
    [event] = [e for e in daemon.events() if e.get("event") == "child_oom_killed"]
    assert (event["task"], event["task_id"]) == ("tests.apps.leaky.hold", result.id)
    assert daemon.metric("celery_memguard_interrupted_tasks_total", reason="killed") == 0
    wait_for(lambda: daemon.metric("celery_memguard_container_memory_events_total",
                                   worker=worker.name, event="oom_kill") == base + 1, 5,
             "the container's own counter is not exported")
    assert worker.send("noop").get(timeout=30)


def test_a_task_that_always_ooms_its_worker_is_run_at_most_quarantine_after_times(
        memory_cgroup: Callable[[int], MemoryCgroup], start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    """task_acks_late with task_reject_on_worker_lost redelivers a task whose child died:
    forever, when the task is what kills it. Quarantined after two OOM kills, its third
    delivery fails at once with MemoryLimitExceeded (reason quarantined); other tasks run."""
    group = memory_cgroup(200 * MiB)
    daemon = start_daemon(sampling={"interval": "250ms"}, quarantine={"after": 2},
                          limits={"container_soft": None, "container_hard": None})
    worker = start_worker(socket_path=daemon.socket_path, concurrency=1, cgroup=group,
                          acks_late=True,
                          extra_env={"MEMGUARD_TEST_REJECT_ON_LOST": "1", "MEMGUARD_TEST_LOST_WAIT": "1"})
    killer = worker.send(HOLD, 300, 0.1)
    others = [worker.send("noop") for _ in range(5)]
    started = time.monotonic()
    with pytest.raises(MemoryLimitExceeded) as raised:
        killer.get(timeout=120)
    assert raised.value.reason == "quarantined"
    assert killer.id in str(raised.value)
    assert "2 OOM kills" in str(raised.value)
    assert collections.Counter(worker.runs())[killer.id] == 2
    assert outcomes(others) == {"ok": 5}
    wait_for(lambda: daemon.metric("celery_memguard_interrupted_tasks_total",
                                   reason="quarantined") == 1, 5, daemon.output())
    assert daemon.metric("celery_memguard_quarantined_task_ids") == 1
    assert daemon.metric("celery_memguard_oom_kills_total", task="tests.apps.leaky.hold") == 2
    assert time.monotonic() - started < 100
