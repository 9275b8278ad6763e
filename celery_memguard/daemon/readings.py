"""What the OS seam (procs.py) reads of processes: frozen values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcId:
    """A process identity that survives pid reuse: pid plus its start time in clock ticks."""

    pid: int
    start: int


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    ppid: int
    start: int  # start time in clock ticks after boot: with the pid, a unique identity

    @property
    def proc(self) -> ProcId:
        return ProcId(self.pid, self.start)


@dataclass(frozen=True, slots=True)
class FoundWorker:
    """A Celery worker main process found by scanning the process table."""

    stat: ProcStat
    name: str
    children: tuple[ProcStat, ...]
