"""The supported Celery range, proven: the core guarantees against the newest patch of every
minor from 5.3 to 5.7, each worker running in a cached venv with the billiard that Celery
pulls in (tests/environments.py). The daemon and the test client are this venv's."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from celery_memguard import MemoryLimitExceeded
from tests.builders import MiB
from tests.environments import celery_python
from tests.support import Daemon, Worker, wait_for

pytestmark = pytest.mark.slow

MINORS = ["5.3", "5.4", "5.5", "5.6", "5.7"]


def mine(daemon: Daemon, worker: Worker) -> dict[str, Any]:
    """This test's worker in /status, once its hello arrived ({} until then)."""
    found = [w for w in daemon.status()["workers"] if w["pid"] == worker.pid]
    assert len(found) <= 1, found
    return found[0] if found else {}


@pytest.mark.parametrize("minor", MINORS)
def test_found_recycled_past_soft_with_every_task_once_and_replaced_at_once(
        minor: str, start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    """Worker discovery, a soft recycle that loses and repeats no task, and prompt replacement:
    a pool of one is empty from each recycle to its replacement, and no gap between two
    results waits for Celery's 5 s maintain_pool timer."""
    daemon = start_daemon(limits={"soft": "100MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path, concurrency=1,
                          python=celery_python(minor))
    # Its children may speak first: the worker is whole once its main process said hello.
    wait_for(lambda: mine(daemon, worker).get("concurrency") == 1, 10,
             f"no hello from the worker: {daemon.output()}")
    entry = mine(daemon, worker)
    assert (entry["name"], entry["agent_state"]) == (worker.name, "full"), entry
    assert entry["versions"]["celery"].startswith(minor + "."), entry

    results = [worker.send("keep", 4) for _ in range(60)]
    for result in results:
        result.get(timeout=60)
    runs = Counter(worker.runs())
    assert [runs[r.id] for r in results] == [1] * 60
    recycles = daemon.metric("celery_memguard_recycles_total", worker=worker.name, reason="soft")
    assert recycles >= 2, daemon.output()
    done = sorted(r.date_done for r in results)
    longest = max((b - a).total_seconds() for a, b in itertools.pairwise(done))
    assert longest < 1.0, f"a replacement waited {longest:.2f} s"
    wait_for(lambda: len(mine(daemon, worker)["children"]) == 1, 10,
             "the replacement child is not listed")


@pytest.mark.parametrize("minor", MINORS)
def test_a_runaway_task_is_interrupted_at_its_workers_own_hard_limit(
        minor: str, start_daemon: Callable[..., Daemon],
        start_worker: Callable[..., Worker]) -> None:
    """MemoryLimitExceeded at the hard limit of the worker's workers: entry, which the
    children find by their nodename (before 5.7 worker_process_init does not carry it)."""
    worker_hard = 300 * MiB
    daemon = start_daemon(limits={"soft": "250MiB", "hard": "2GiB"},
                          workers=[{"match": "q*@memguard-test",
                                    "limits": {"soft": "250MiB", "hard": "300MiB"}}],
                          sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path, python=celery_python(minor))
    result = worker.send("runaway", 16, 0.02, 640)
    with pytest.raises(MemoryLimitExceeded) as info:
        result.get(timeout=30)
    assert info.value.limit == worker_hard
    assert worker_hard < info.value.rss <= worker_hard + 64 * MiB
    assert all(r.get(timeout=20) for r in [worker.send("noop") for _ in range(10)])
    wait_for(lambda: daemon.metric("celery_memguard_recycles_total", worker=worker.name,
                                   reason="hard") == 1, 10, daemon.output())
