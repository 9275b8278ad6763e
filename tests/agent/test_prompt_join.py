"""How the agent looks again for a pool child that exited but was not yet joined (agent/prompt_join.py).

The schedule alone, with stand-ins for Celery's hub and pool; the real worker's prompt
replacement is tested in test_agent.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from celery_memguard.agent import prompt_join


class Hub:
    def __init__(self) -> None:
        self.delays: list[float] = []
        self.due: list[Callable[[], None]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.delays.append(delay)
        self.due.append(callback)

    def run(self) -> None:
        while self.due:
            self.due.pop(0)()


class Pool:
    """maintain_pool joins ``proc`` on its ``joinable_at``-th call."""

    def __init__(self, proc: object, joinable_at: int | None) -> None:
        self._pool = [proc, object()]
        self.proc, self.joinable_at, self.calls = proc, joinable_at, 0

    def maintain_pool(self) -> None:
        self.calls += 1
        if self.calls == self.joinable_at:
            self._pool.remove(self.proc)


def start(pool: Pool, hub: Hub) -> None:
    prompt_join._join_later(pool, hub, pool.proc, prompt_join.JOIN_RETRIES,
                            prompt_join.JOIN_FIRST_RETRY_SECONDS)


@pytest.mark.parametrize("joinable_at", [1, 3, 6])
def test_a_child_is_looked_for_soon_then_less_often_until_it_is_joined(joinable_at: int) -> None:
    """A child can be reaped 1-5 ms after its pipe closes: the first look is 2 ms later, the
    next ones twice as far apart up to 20 ms, and none follows the one that joined it."""
    proc = object()
    pool, hub = Pool(proc, joinable_at), Hub()
    start(pool, hub)
    hub.run()
    assert pool.calls == joinable_at
    assert hub.delays == pytest.approx([0.002, 0.004, 0.008, 0.016, 0.02, 0.02][:joinable_at])
    assert proc not in pool._pool


def test_a_child_never_joined_is_looked_for_about_a_second_then_left_to_celery() -> None:
    proc = object()
    pool, hub = Pool(proc, None), Hub()
    start(pool, hub)
    hub.run()
    assert pool.calls == prompt_join.JOIN_RETRIES
    assert max(hub.delays) == prompt_join.JOIN_RETRY_SECONDS
    assert 0.9 <= sum(hub.delays) <= 1.1


def test_a_child_already_joined_is_not_looked_for() -> None:
    proc = object()
    pool, hub = Pool(proc, None), Hub()
    pool._pool.remove(proc)
    start(pool, hub)
    assert hub.delays == []
