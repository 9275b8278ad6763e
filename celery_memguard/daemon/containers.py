"""Each worker's memory cgroup: found, read as the kernel reports it, and watched near its line.

The tick reads every worker's container once (``read``); between ticks, ``watch`` reads again
the containers that have a hard line, sooner the closer they are to it, and returns the
workers past it so that the supervisor decides for them at once. Workers in one cgroup share
one read of its files. The files are read through ``procs``, the OS seam.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from celery_memguard.daemon import container_policy
from celery_memguard.daemon.config import LimitsConfig
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.records import WorkerRec
from celery_memguard.daemon.state import State
from celery_memguard.protocol.cgroups import Container, ContainerReading

FASTEST_CONTAINER_GROWTH = 4 << 30  # bytes a second a container's working set may grow
CONTAINER_CHECK_MIN = 0.01  # seconds: the closest two looks at a container near its hard line
MAX_KEPT = 4096  # cgroups whose last reading is kept


class Containers:
    def __init__(self, procs: Procs, state: State,
                 limits_for: Callable[[str], LimitsConfig]) -> None:
        self.procs = procs
        self.state = state
        self.limits_for = limits_for
        self._found: dict[int, Container | None] = {}  # worker pid -> its memory cgroup
        self._reads: dict[tuple[Path, Path, Path | None],
                          tuple[float, ContainerReading | None]] = {}

    def forget(self, pid: int) -> None:
        self._found.pop(pid, None)

    def read(self, rec: WorkerRec, now: float, find: bool = False) -> None:
        """The worker's memory cgroup: found once (again with ``find``), read every tick;
        its OOM kill counter is what tells an OOM kill from another SIGKILL."""
        pid = rec.proc.pid
        if pid not in self._found or find:
            self._found[pid] = self.procs.container(pid)
        container = self._found[pid]
        rec.container = container.path if container is not None else None
        reading = self._reading(container, now) if container is not None else None
        if reading is None:  # not visible from here: as the worker's agent read it (its hello)
            reading = rec.reported_container
        rec.container_reading = reading
        if reading is None:
            rec.container_over_since = None
            return
        self.state.oom.observe(rec.container_key, reading.events.get("oom_kill"), now)
        if not container_policy.over_soft(reading, self.limits_for(rec.name or "")):
            rec.container_over_since = None
        elif rec.container_over_since is None:
            rec.container_over_since = now

    def _reading(self, container: Container, now: float) -> ContainerReading | None:
        """One read of a cgroup serves every worker in it, and the tick and the watch that
        follows it at once: a reading younger than half the closest look is used again."""
        key = (container.directory, container.own, container.pressure_file)
        kept = self._reads.get(key)
        if kept is not None and 0 <= now - kept[0] < CONTAINER_CHECK_MIN / 2:
            return kept[1]
        reading = self.procs.read_container(container)
        if len(self._reads) > MAX_KEPT:
            self._reads.clear()
        self._reads[key] = (now, reading)
        return reading

    def stall_files(self, workers: Iterable[WorkerRec]) -> dict[Path, float]:
        """The pressure files to keep a stall trigger on (pressure.py), each at the smallest
        limits.container_pressure among the workers whose container it measures."""
        wanted: dict[Path, float] = {}
        for rec in workers:
            container = self._found.get(rec.proc.pid)
            share = self.limits_for(rec.name or "").container_pressure
            if container is not None and container.pressure_file is not None and share:
                path = container.pressure_file
                wanted[path] = min(share, wanted.get(path, share))
        return wanted

    def stalled(self, fired: list[Path], workers: Iterable[WorkerRec], now: float,
                ) -> list[WorkerRec]:
        """The workers whose container's stall trigger fired, their container read afresh
        and the stall counted."""
        found = []
        for rec in list(workers):
            container = self._found.get(rec.proc.pid)
            if container is not None and container.pressure_file in fired:
                self.read(rec, now)
                self.state.stalls[rec.name or ""] += 1
                found.append(rec)
        return found

    def watch(self, workers: Iterable[WorkerRec], now: float, interval: float,
              ) -> tuple[list[WorkerRec], float]:
        """Between ticks: read the containers that have a hard line. Returns the workers past
        it, and when to look again: sooner the closer a container is to its line, as a child
        growing ``FASTEST_CONTAINER_GROWTH`` could reach it."""
        due = now + interval
        over: list[WorkerRec] = []
        for rec in workers:
            limits = self.limits_for(rec.name or "")
            if self._found.get(rec.proc.pid) is None or limits.container_hard is None:
                continue  # unseen, or known from the worker's hellos only: the tick will do
            self.read(rec, now)
            reading = rec.container_reading
            if reading is None or reading.limit is None:
                continue
            if container_policy.over_hard(reading, limits):
                over.append(rec)
            headroom = reading.limit * limits.container_hard - reading.working_set
            due = min(due, now + max(CONTAINER_CHECK_MIN, headroom / FASTEST_CONTAINER_GROWTH))
        return over, due
