"""The in-child watch: it fires past the hard limit, and its interrupt only lands in the task."""

from __future__ import annotations

import sys
import threading
import time
from types import FrameType

import pytest

from celery_memguard import MemoryLimitExceeded
from celery_memguard.agent.watch import Watch


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

    from celery_memguard.protocol.signals import INTERRUPT_SIGNAL  # noqa: PLC0415

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
    time.sleep(0.3)
    watch.task_ended()
    assert len(polls) >= 3  # at the reports' pace, MAX_DELAY: no memory to watch
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


def test_the_watch_reads_often_only_where_a_fast_task_could_reach_the_hard_limit() -> None:
    """A child growing FASTEST_GROWTH is read before it can cross: every interval close to the
    limit, at most MAX_DELAY apart far from it, and never faster than the interval asked for."""
    from celery_memguard.agent.watch import FASTEST_GROWTH, MAX_DELAY, next_delay  # noqa: PLC0415

    mib = 1024 * 1024
    hard = 1024 * mib
    assert next_delay(45 * mib, hard, 0.01) == MAX_DELAY  # 979 MiB away: 0.12 s at 8 GiB/s
    assert next_delay(hard - 200 * mib, hard, 0.01) == (200 * mib) / FASTEST_GROWTH
    assert next_delay(hard - 10 * mib, hard, 0.01) == 0.01
    assert next_delay(hard + 10 * mib, hard, 0.01) == 0.01  # past it: as often as asked
    assert next_delay(45 * mib, 0, 0.01) == MAX_DELAY  # no hard limit: only the reports' pace
    assert next_delay(45 * mib, hard, 1.0) == 1.0  # a longer interval asked for is kept
    for rss in range(0, hard, 7 * mib):  # the promise itself
        delay = next_delay(rss, hard, 0.01)
        assert rss + FASTEST_GROWTH * delay <= hard or delay == 0.01


def test_with_no_daemons_settings_the_child_stays_single_threaded() -> None:
    """No settings, no thread: there is no hard limit to watch and no one to report to, and a
    two-threaded child that the OOM killer picks is often followed by a second kill in the same
    OOM event. The thread starts at the first task after a daemon's settings arrive."""
    polls: list[float] = []
    watch = Watch(lambda: 0, lambda r, limit: None, lambda: polls.append(time.monotonic()))
    before = {t.ident for t in threading.enumerate()}
    watch.task_started(None)
    time.sleep(0.1)
    watch.task_ended()
    assert {t.ident for t in threading.enumerate()} == before
    assert polls == []
    watch.configure(0, 0.005)
    watch.task_started(None)
    time.sleep(0.1)
    watch.task_ended()
    assert [t.name for t in threading.enumerate() if t.ident not in before] == ["memguard-watch"]
    assert polls
