"""The in-child watch: it fires past the hard limit, and its interrupt only lands in the task."""

from __future__ import annotations

import sys
import time
from types import FrameType

import pytest

from celery_memguard import MemoryLimitExceeded
from celery_memguard.watch import Watch


def task_body(watch: Watch) -> FrameType:
    return sys._getframe()


def test_the_interrupt_is_raised_only_with_the_task_body_on_the_stack() -> None:
    fired: list[tuple[int, int]] = []
    watch = Watch(lambda: 0, lambda rss, limit: fired.append((rss, limit)))
    watch.configure(hard=100, interval=0.01)
    watch.task_started(task_body.__code__)
    watch._pending = (watch._token, 150, 100)
    outside = sys._getframe()
    watch.on_signal(0, outside)  # Celery's own frames: nothing raised
    inside = task_body(watch)
    with pytest.raises(MemoryLimitExceeded) as info:
        watch.on_signal(0, inside)
    assert (info.value.rss, info.value.limit) == (150, 100)
    watch.on_signal(0, inside)  # once per task: a second signal raises nothing
    watch.task_ended()


def test_the_thread_fires_once_past_the_limit_and_not_when_idle() -> None:
    rss = [50]
    fired: list[tuple[int, int]] = []
    watch = Watch(lambda: rss[0], lambda r, limit: fired.append((r, limit)))
    watch.configure(hard=100, interval=0.005)
    interrupts: list[int] = []
    import signal  # noqa: PLC0415

    from celery_memguard.watch import INTERRUPT_SIGNAL  # noqa: PLC0415

    previous = signal.signal(INTERRUPT_SIGNAL, lambda s, f: interrupts.append(s))
    try:
        watch.task_started(None)
        time.sleep(0.05)
        assert fired == []
        rss[0] = 150
        deadline = time.monotonic() + 2
        while not fired:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.05)
        assert fired == [(150, 100)]
        assert interrupts == [INTERRUPT_SIGNAL]
        watch.task_ended()
        rss[0] = 500  # idle: the watch reads nothing and fires nothing
        time.sleep(0.05)
        assert fired == [(150, 100)]
    finally:
        signal.signal(INTERRUPT_SIGNAL, previous)


def test_a_zero_hard_limit_reads_no_rss_and_fires_nothing_but_still_polls() -> None:
    """The thread still serves the child's reports; it only stops watching the memory."""
    reads: list[int] = []
    fired: list[tuple[int, int]] = []
    polls: list[float] = []

    def read() -> int:
        reads.append(1)
        return 10**12

    watch = Watch(read, lambda r, limit: fired.append((r, limit)),
                  lambda: polls.append(time.monotonic()))
    watch.configure(0, 0.005)
    watch.task_started(None)
    time.sleep(0.1)
    watch.task_ended()
    assert len(polls) >= 5
    assert reads == []
    assert fired == []


def test_the_watch_hands_over_what_waits_before_it_parks() -> None:
    """A child idle long enough parks its thread; what it held back goes first."""
    parked: list[float] = []
    watch = Watch(lambda: 0, lambda r, limit: None, None, lambda: parked.append(time.monotonic()))
    watch.configure(0, 0.005)
    watch.task_started(None)
    watch.task_ended()
    deadline = time.monotonic() + 3
    while not parked and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(parked) == 1
    assert not watch._wake.is_set()  # parked
