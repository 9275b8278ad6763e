"""In a pool child, between two tasks: start the next one only if the container has room.

A single allocation is one C call (a 150 MiB bytearray is one memset): nothing can interrupt
it half-way, so the line that prevents an OOM kill is the one a child checks before it
starts a task. Past its container's soft line (by the working set: usage less inactive page
cache), a child waits before it starts the job it has just read, in steps of ``STEP``, until
the container is back under the line or ``container_hold`` has passed; then it runs the task
anyway. The job is read but not yet acknowledged to the pool: its time limits do not run, and a
child asked to leave meanwhile leaves at once and the pool gives the job to another.

What the task will need comes from this child's own earlier runs of the same task name: the
most its RSS rose during one of them (``needs``). A name it never ran needs nothing known.
Far under the line (less the largest need seen) the usage is read only as often as a container
growing ``FASTEST_GROWTH`` could reach it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery_memguard.protocol.cgroups import Cgroups, parse_keyed, working_set

STEP = 0.02  # seconds between two looks while holding
FASTEST_GROWTH = 16 << 30  # bytes a second a container may grow
MAX_NAMES = 256  # task names whose needs are remembered


@dataclass(frozen=True, slots=True)
class Held:
    seconds: float
    working_set: int  # when the hold ended
    line: int
    gave_up: bool  # ran anyway after container_hold


class Headroom:
    def __init__(self, cgroups: Cgroups | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._cgroups = cgroups or Cgroups()
        self._clock, self._sleep = clock, sleep
        self.container = self._cgroups.find("self")
        self.line = 0  # bytes of working set; 0: no line (none configured, or no limit)
        self.hold_max = 0.0
        self.needs: dict[str, int] = {}  # task name -> most its RSS rose in one run here
        self._usage_fd: int | None = None
        self._next_look = 0.0

    def configure(self, share: float | None, hold_max: float) -> None:
        """The line as a share of this child's container limit (None: no line)."""
        self.hold_max = hold_max
        self.line = 0
        if share is None or self.container is None:
            return
        reading = self._cgroups.read(self.container)
        if reading is None or reading.limit is None:
            return
        self.line = int(reading.limit * share)
        if self._usage_fd is None:
            name = "memory.current" if self.container.version == 2 else "memory.usage_in_bytes"
            try:
                self._usage_fd = os.open(self.container.directory / name,
                                         os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.line = 0

    def reading(self) -> tuple[int, int]:
        """(working set, line) now, for a report; zeros where there is no line."""
        if self.line <= 0 or self._usage_fd is None:
            return 0, 0
        return self._working_set(self._usage()), self.line

    def learn(self, name: str, rose: int) -> None:
        """A run of ``name`` raised this child's RSS by ``rose`` bytes at its peak."""
        if name in self.needs or len(self.needs) < MAX_NAMES:
            self.needs[name] = max(rose, 0) if name not in self.needs else max(
                self.needs[name], rose)

    def hold(self, name: str) -> Held | None:
        """Wait until the container has room for a run of ``name`` (at most hold_max);
        return how it went, or None when there was no need to wait."""
        if self.line <= 0 or self._usage_fd is None:
            return None
        now = self._clock()
        if now < self._next_look:
            return None
        need = self.needs.get(name, 0)
        usage = self._usage()
        if usage + need < self.line:  # usage bounds the working set from above
            # Whatever the next task: the largest need any name has shown here.
            room = self.line - usage - max(self.needs.values(), default=0)
            self._next_look = now + max(0, room) / FASTEST_GROWTH
            return None
        current = self._working_set(usage)
        if current + need < self.line:
            return None
        start = now
        while current + need >= self.line:
            if self._clock() - start >= self.hold_max:
                return Held(self._clock() - start, current, self.line, gave_up=True)
            self._sleep(STEP)
            current = self._working_set(self._usage())
        return Held(self._clock() - start, current, self.line, gave_up=False)

    def _usage(self) -> int:
        assert self._usage_fd is not None
        try:
            return int(os.pread(self._usage_fd, 64, 0))
        except (OSError, ValueError):
            return 0

    def _working_set(self, usage: int) -> int:
        assert self.container is not None
        try:
            stat = parse_keyed((self.container.directory / "memory.stat").read_text())
        except OSError:
            return usage
        return working_set(usage, stat, self.container.version)
