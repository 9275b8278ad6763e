"""Fixtures for real brokers, workers and daemons; each one cleans up after itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Daemon, MemoryCgroup, PrivateRedis, Worker, answers, redis_pings


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's Redis on 6379 when it answers, else a private redis-server."""
    if redis_pings(6379):
        yield "redis://127.0.0.1:6379"
        return
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield f"redis://127.0.0.1:{server.port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    if not answers("127.0.0.1", 5672):
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(**config: Any) -> Daemon:
        daemon = Daemon(tmp_path, config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def start_worker(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(broker: str | None = None, **kwargs: Any) -> Worker:
        worker = Worker(tmp_path, broker or f"{redis_url}/0", f"{redis_url}/1", **kwargs)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], MemoryCgroup]]:
    """Makes cgroup v1 memory cgroups with a limit; skips, saying why, where none can be made."""
    made: list[MemoryCgroup] = []

    def make(limit: int) -> MemoryCgroup:
        try:
            group = MemoryCgroup("memguard-test", limit)
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup here ({exc}); run as root on a host "
                        f"with the cgroup v1 memory controller")
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()
