"""In a pool child, between two tasks: start the next one only if the container has room.

A single allocation is one C call (a 150 MiB bytearray is one memset): nothing can interrupt
it half-way, so the line that prevents an OOM kill is the one a child checks before it
starts a task. The job is read but not yet acknowledged to the pool: its time limits do not
run, and a child asked to leave meanwhile leaves at once and the pool gives the job to another.

- **Far from the line** (the whole pool could start its largest known task and stay under it)
  nothing is checked, and the usage is read again only as often as a container growing
  ``FASTEST_GROWTH`` could close the gap; only a name this child never ran is looked up in
  the worker's room file first (below).
- **Near it**, the child counts its container's working set (usage less inactive page cache),
  what its task name needs (the most a run of it raised a child's RSS, shared by the worker's
  children through the room file), and what tasks that other children started have not yet
  allocated (protocol.room). If it all fits under the line it reserves its need and starts;
  otherwise it waits in steps of ``STEP``, at most ``container_hold``, then starts anyway.

- **A name no child of the worker ran yet** needs nothing known. One child runs it first; the
  others wait until its run has ended, at most ``FIRST_RUN_WAIT``, then judge with what it
  took (a run writes what it has reached from the watch thread as it goes): three children
  that each start a task of 150 MiB in a container with room for two would otherwise all
  allocate before any of them knows. A first run that allocates only after the wait (or in
  small steps) can still overcommit a container: an OOM kill, counted and quarantined, and a
  task that grows in steps is interrupted at the container's hard line by the daemon.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery_memguard.protocol import room
from celery_memguard.protocol.cgroups import Cgroups, parse_keyed, working_set

STEP = 0.02  # seconds between two looks while holding
FASTEST_GROWTH = 16 << 30  # bytes a second a container may grow
MAX_NAMES = 256  # task names whose needs this child remembers
REFRESH_SECONDS = 1.0  # how often the worker's shared needs are read again
LEARN_MARGIN = 1 << 20  # a need is written to the room when it exceeds the known one by this
FIRST_RUN_WAIT = 1.0  # seconds another child's first run of a name holds this one at most
ROOM_WAIT = 0.5  # seconds a child's first task waits for the daemon to make the room file


@dataclass(frozen=True, slots=True)
class Held:
    seconds: float
    working_set: int  # when the hold ended
    line: int
    gave_up: bool  # ran anyway after container_hold


class Headroom:
    def __init__(self, room_path: str | None = None, worker: tuple[int, int] = (0, 0),
                 pool: int = 1, cgroups: Cgroups | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._cgroups = cgroups or Cgroups()
        self._clock, self._sleep = clock, sleep
        self.room_path, self.worker, self.pool = room_path, worker, max(pool, 1)
        self.pid = os.getpid()
        self.container = self._cgroups.find("self")
        self.line = 0  # bytes of working set; 0: no line (none configured, or no limit)
        self.hold_max = 0.0
        self.needs: dict[str, int] = {}  # task name -> most its RSS rose in one run here
        self.shared: dict[str, int] = {}  # the same, as the worker's children know it
        self.reserved = False  # this child's running task has a reservation in the room
        self.maxrss_before = 0  # ru_maxrss when the running task began (KiB)
        self._first: str | None = None  # the name whose first run in the worker this child runs
        self._room_awaited = False  # this child's first task waited for the room file
        self._usage_fd: int | None = None
        self._next_look = 0.0
        self._next_refresh = 0.0
        self._page = os.sysconf("SC_PAGE_SIZE")

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

    def need(self, name: str) -> int:
        return max(self.needs.get(name, 0), self.shared.get(name, 0))

    # -- before a task -----------------------------------------------------------------------

    def hold(self, name: str, rss_before: int) -> Held | None:
        """Wait until the container has room for a run of ``name`` (at most hold_max);
        return how it went, or None when there was no need to wait."""
        self.reserved = False
        if self.line <= 0 or self._usage_fd is None:
            return None
        start = self._clock()
        if self.room_path is not None and not self._room_awaited:
            self._await_room(start)
        waited = (self.room_path is not None and name not in self.needs
                  and self._first_run(name, start))
        now = self._clock()
        if now < self._next_look and not waited:
            return None
        if now >= self._next_refresh and self.room_path is not None:
            found = room.read(self.room_path, self.worker)
            if found is not None:  # else (no room, or busy) look again at the next task
                self.shared = found.needs
                self._next_refresh = now + REFRESH_SECONDS
        largest = max([*self.needs.values(), *self.shared.values()], default=0)
        gap = self.line - self._usage() - largest * self.pool
        need, gave_up, current = self.need(name), False, None
        if gap > 0:  # usage bounds the working set from above
            self._next_look = now + gap / FASTEST_GROWTH
        else:
            while True:
                gave_up = self._clock() - start >= self.hold_max
                fits, current = self._reserve(need, rss_before, force=gave_up)
                if fits:
                    break
                waited = True
                self._sleep(STEP)
        if not waited:
            return None
        if current is None:  # it waited for a first run only
            current = self._working_set(self._usage())
        return Held(self._clock() - start, current, self.line, gave_up)

    def _await_room(self, start: float) -> None:
        """A fresh worker's first tasks can start before the daemon has heard of it and made
        its room file; without it no child can tell what the others start. So a child's
        first task waits for it, at most ``ROOM_WAIT`` (the daemon makes it at the first
        child's hello)."""
        self._room_awaited = True
        while (not os.path.exists(self.room_path or "")
               and self._clock() - start < min(ROOM_WAIT, self.hold_max)):
            self._sleep(STEP)

    def _first_run(self, name: str, start: float) -> bool:
        """Before this child's first run of a name: while another child's first run of it is
        under way, wait until it ends (at most ``FIRST_RUN_WAIT``, and never longer than
        container_hold); where none is and the worker knows no need for it, mark this run as
        the first. Not released by the need a running first run writes: that is a figure
        taken mid-allocation, which let waiters start together on a slow host. Returns
        whether it waited."""
        wait = min(FIRST_RUN_WAIT, self.hold_max)
        waited = False
        while True:
            at = int(self._clock() * 1000)

            def change(shared: room.Room, at: int = at) -> bool:
                shared.first = [f for f in shared.first if at - f[2] < FIRST_RUN_WAIT * 1000
                                and f[0] != self.pid and self._rss(f[0]) is not None]
                self.shared = dict(shared.needs)
                if any(f[1] == name for f in shared.first):
                    return True  # another child's first run of it is under way
                if name not in shared.needs:
                    shared.first.append((self.pid, name, at))
                    self._first = name
                return False  # known, or this run is the first: the usual check decides

            outcome = room.update(self.room_path or "", self.worker, change)
            # True: another's first run is under way; BUSY: the room is being written. Else go.
            if outcome is None or outcome is False or self._clock() - start >= wait:
                return waited
            waited = True  # another's first run, or the room busy: look again shortly
            self._sleep(STEP)

    def _reserve(self, need: int, rss_before: int, force: bool) -> tuple[bool, int]:
        """Whether the task fits (or must start anyway), and the working set it was judged
        by; if it fits, its need is reserved. Under the room's lock, what others have not yet
        allocated is counted first and the working set read after it: an allocation in
        between is then counted twice, never missed."""
        if self.room_path is None:
            current = self._working_set(self._usage())
            return force or current + need < self.line, current
        seen = [0]

        def change(shared: room.Room) -> bool:
            shared.starting = [s for s in shared.starting
                               if s[0] != self.pid and self._rss(s[0]) is not None]
            pending = sum(max(0, n - ((self._rss(pid) or 0) - before))
                          for pid, n, before in shared.starting)
            seen[0] = current = self._working_set(self._usage())
            fits = force or current + pending + need < self.line
            if fits:
                shared.starting.append((self.pid, need, rss_before))
            return fits

        result = room.update(self.room_path, self.worker, change)
        if result is None:  # no room file (no daemon): go by this child alone
            current = self._working_set(self._usage())
            return force or current + need < self.line, current
        if isinstance(result, room.Busy):  # another child is reserving: look again
            return force, seen[0]
        self.reserved = result
        return result, seen[0]

    # -- after a task ------------------------------------------------------------------------

    def task_began(self) -> None:
        """Where the process's lifetime peak stood as a task began: the watch may miss a
        peak between two reads; the kernel's count cannot."""
        if self.line:
            self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak(self, rss: int, watched: int) -> int:
        """The most the task held as far as known: the watch's reads, its end, and the
        process's lifetime peak when this task raised it (ru_maxrss, KiB on Linux)."""
        peak = max(rss, watched)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if maxrss > self.maxrss_before:
            peak = max(peak, maxrss * 1024)
        return peak

    def news(self, name: str, rose: int) -> bool:
        """Whether ``rose`` is more than the worker's children know ``name`` needs, by enough
        to tell them (a tenth, and at least ``LEARN_MARGIN``)."""
        known = self.need(name)
        return rose > known + max(LEARN_MARGIN, known // 10)

    def learn(self, name: str, rose: int, ended: bool = True) -> None:
        """A run of ``name`` raised this child's RSS by ``rose`` bytes at its peak (``ended``:
        the task is over, its reservation released; else it is still running and has gone
        past what was known: written at once, so that a child killed on its way up has told
        the others what it had reached)."""
        rose = max(rose, 0)
        news = self.news(name, rose)
        if name in self.needs or len(self.needs) < MAX_NAMES:
            self.needs[name] = max(self.needs.get(name, 0), rose)
        release = ended and self.reserved
        first = ended and self._first == name  # its first run ended: the others know now
        if self.room_path is None or not (news or release or first):
            return

        def change(shared: room.Room) -> None:
            if release:
                shared.starting = [s for s in shared.starting if s[0] != self.pid]
            if first:
                shared.first = [f for f in shared.first if f[0] != self.pid]
            if rose > shared.needs.get(name, 0) or (first and name not in shared.needs):
                shared.needs[name] = rose
            self.shared = dict(shared.needs)

        result = room.update(self.room_path, self.worker, change)
        if result is not None and not isinstance(result, room.Busy):  # else: at the next task
            if release:
                self.reserved = False
            if first:
                self._first = None

    # -- reading -----------------------------------------------------------------------------

    def reading(self) -> tuple[int, int]:
        """(working set, line) now, for a report; zeros where there is no line."""
        if self.line <= 0 or self._usage_fd is None:
            return 0, 0
        return self._working_set(self._usage()), self.line

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

    def _rss(self, pid: int) -> int | None:
        """Another child's RSS (None: gone); children of one worker may read each other's."""
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None
