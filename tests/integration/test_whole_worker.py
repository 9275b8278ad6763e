"""Pools without children: the worker itself is the unit, restarted warm by its process manager."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Daemon, Worker

pytestmark = pytest.mark.slow


def test_a_threads_worker_past_its_soft_limit_is_restarted_warm_losing_no_task(
        tmp_path: Path, redis_url: str, start_daemon: Callable[..., Daemon]) -> None:
    """The test plays the process manager: each time the worker exits it starts it again."""
    daemon = start_daemon(limits={"soft": "150MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms", "scan_interval": "1s"})
    workers: list[Worker] = []

    def start(queue: str | None = None) -> Worker:
        worker = Worker(tmp_path, f"{redis_url}/0", f"{redis_url}/1", socket_path=daemon.socket_path,
                        extra_args=("-P", "threads"), restart=True, queue=queue,
                        name="threads@memguard-test")
        workers.append(worker)
        return worker

    try:
        worker = start()
        worker.wait_ready()
        results = [worker.send("sleep_then_keep", 0.01, 2) for _ in range(150)]
        deadline = time.monotonic() + 120
        while not all(r.ready() for r in results):
            assert time.monotonic() < deadline, daemon.output()
            if worker.proc.poll() is not None:  # exited: the process manager starts it again
                worker = start(queue=worker.queue)
            time.sleep(0.1)
        assert all(r.successful() for r in results)
        runs = workers[0].runs()
        assert len(runs) == 150
        assert [tid for tid, n in Counter(runs).items() if n > 1] == []
        assert len(workers) >= 2, "the worker was never restarted"
        assert daemon.metric("celery_memguard_worker_restarts_total", reason="soft") >= 1
        warm = [e for e in daemon.events() if e.get("event") == "worker_restart_requested"]
        assert warm[0]["shutdown"] == "warm"
        assert warm[0]["pid"] == workers[0].pid
        assert daemon.metric("celery_memguard_recycles_total") == 0
    finally:
        for worker in workers:
            worker.stop()
