"""The in-child watch that stops a runaway task: a thread reads RSS while a task runs.

A daemon tick (a second, or a quarter of one) is far too slow for a task that allocates
16 MiB every 20 ms, so each pool child watches itself while a task runs (one pread of
/proc/self/statm per read). It reads every ``watch_interval`` (10 ms by default) near the
hard limit, and less often further from it: never later than a child growing
``FASTEST_GROWTH`` could reach the limit, and at least every ``MAX_DELAY`` (or every
``watch_interval``, if longer). Reading every 10 ms regardless woke each busy child's thread
about 150 times a second under short tasks. Past the hard limit the thread signals the main
thread, whose handler raises MemoryLimitExceeded - but only when the task's own code is on
the stack, so the exception can never land in Celery's or billiard's bookkeeping around the
task. Either way the child leaves after the task.

The same thread serves the child's reports: every read it calls ``on_poll``, which announces a
task that has run for a while and sends the ends of recent tasks once the child is idle.

No Celery import here: the child agent arms and disarms it as each job begins and ends.

The thread starts only once a daemon's settings are loaded (``configure``): with no daemon
there is no hard limit to watch and no one to report to, and a second thread in a child is
not free. Measured in a 520 MiB cgroup whose three children overflow it (12 tasks of 150 MiB),
an OOM kill of a two-threaded child was often followed by one or two more kills in the same
OOM event, 2-6 ms later: 101 kills in 71 events over 17 runs with the thread, 69 in 69 without
the agent. A child whose only thread is the main one dies at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType

from celery_memguard.errors import MemoryLimitExceeded
from celery_memguard.protocol.signals import INTERRUPT_SIGNAL

IDLE_PARK = 1.0  # seconds without a running task after which the thread parks on an event
FASTEST_GROWTH = 8 << 30  # bytes a second: several times what a Python child reaches here
MAX_DELAY = 0.05  # the longest sleep between two reads (and the pace of the child's reports)


def next_delay(rss: int, hard: int, interval: float) -> float:
    """How long the watch may sleep after reading ``rss``: not past the moment a child
    growing ``FASTEST_GROWTH`` could cross ``hard``; never less than ``interval``, and never
    more than ``MAX_DELAY`` unless ``interval`` itself is longer."""
    longest = max(interval, MAX_DELAY)
    if hard <= 0:
        return longest
    return min(longest, max(interval, (hard - rss) / FASTEST_GROWTH))


class Watch:
    """Reads RSS every ``interval`` while tasks run; parks when the child has been idle a while.

    Task boundaries only write two attributes: waking a thread at every task start and end
    costs a GIL hand-off each time, which showed as lost throughput on short tasks. The thread
    notices a new task at its next read instead (``interval`` later at most).
    """

    def __init__(self, read_rss: Callable[[], int], on_fire: Callable[[int, int], None],
                 on_poll: Callable[[], None] | None = None,
                 on_park: Callable[[], None] | None = None) -> None:
        self.read_rss = read_rss
        self.on_fire = on_fire  # (rss, limit): report and ask to leave after the task
        self.on_poll = on_poll  # every wake-up, busy or idle until it parks
        self.on_park = on_park  # just before it parks: nothing may wait for the next task
        self.hard = 0
        self.interval = 0.01
        self.configured = False  # a daemon's settings were loaded: the thread may start
        self._main_ident = threading.main_thread().ident
        self._wake = threading.Event()  # set while the thread is (or should be) polling
        self._token = 0  # counts task starts
        self._busy = False  # a task runs
        self._run_code: CodeType | None = None  # the running task's body, when known
        self._pending: tuple[int, int, int] | None = None  # (token, rss, limit) fired
        self._thread: threading.Thread | None = None
        self.peak = 0  # the highest RSS read during the running (or last) task

    def configure(self, hard: int, interval: float) -> None:
        self.hard, self.interval = hard, interval
        self.configured = True

    def install(self) -> None:
        signal.signal(INTERRUPT_SIGNAL, self.on_signal)

    # -- main thread -----------------------------------------------------------------------

    def task_started(self, run_code: CodeType | None) -> None:
        self.peak = 0
        self._token += 1
        self._pending = None
        self._run_code = run_code
        self._busy = True
        if not self._wake.is_set():  # parked: the first task after a quiet spell wakes it
            self._wake.set()
        if self._thread is None and self.configured:
            self._thread = threading.Thread(target=self._loop, name="memguard-watch", daemon=True)
            self._thread.start()

    def task_ended(self) -> None:
        self._busy = False
        self._run_code = None
        self._pending = None

    def in_task_body(self, frame: FrameType | None) -> bool:
        """Whether the running task's own code is on the stack of ``frame`` (an exception
        raised there lands in the task, not in Celery's or billiard's bookkeeping)."""
        code = self._run_code
        while code is not None and frame is not None:
            if frame.f_code is code:
                return True
            frame = frame.f_back
        return False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        pending, code = self._pending, self._run_code
        if pending is None or code is None or pending[0] != self._token:
            return
        while frame is not None:
            if frame.f_code is code:
                self._pending = None  # once per task: a task that swallows it meets the kill
                raise MemoryLimitExceeded(pending[1], pending[2])
            frame = frame.f_back
        # Not inside the task body (Celery is storing its result): it leaves after the task.

    # -- watch thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        fired = 0  # the token of the last task fired on: once per task
        delay = self.interval
        while True:
            self._wake.wait()
            idle_since = time.monotonic()
            while True:
                time.sleep(delay)
                token = self._token
                if self.on_poll is not None:
                    with contextlib.suppress(Exception):  # the watch must outlive any error
                        self.on_poll()
                if not self._busy:
                    if time.monotonic() - idle_since > IDLE_PARK:
                        self._wake.clear()
                        if not self._busy:
                            if self.on_park is not None:
                                with contextlib.suppress(Exception):
                                    self.on_park()
                            break  # parked; a task start sets the event again
                    continue
                idle_since = time.monotonic()
                hard = self.hard
                if hard <= 0:  # no memory to watch: only the reports' pace
                    delay = next_delay(0, hard, self.interval)
                    continue
                if token == fired:
                    continue
                rss = self.read_rss()
                if token == self._token and rss > self.peak:
                    self.peak = rss  # the most this task has held yet, as far as seen
                delay = next_delay(rss, hard, self.interval)
                if rss > hard and token == self._token and self._busy:
                    fired = token
                    self._pending = (token, rss, hard)
                    with contextlib.suppress(Exception):  # the watch must outlive any error
                        self.on_fire(rss, hard)
                        if self._main_ident is not None:
                            signal.pthread_kill(self._main_ident, INTERRUPT_SIGNAL)
