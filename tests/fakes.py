"""A scripted process table and a manual clock for driving the daemon without processes, and
a child's connection that records what it would have sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.readings import FoundWorker, ProcStat
from celery_memguard.protocol.cgroups import Container, ContainerReading
from tests.builders import MiB


@dataclass
class FakeProc:
    pid: int
    ppid: int
    start: int
    rss: int = 50 * MiB
    uss: int | None = None
    cmdline: tuple[str, ...] = ()
    name: str = ""


@dataclass
class FakeProcs(Procs):
    """Processes are entries in ``table``; signals sent are recorded, never delivered."""

    table: dict[int, FakeProc] = field(default_factory=dict)
    signals: list[tuple[int, int]] = field(default_factory=list)
    denied: set[int] = field(default_factory=set)
    containers: dict[int, ContainerReading] = field(default_factory=dict)  # worker pid -> cgroup
    pressure_file: Path | None = None  # where every container's pressure is read (PSI)

    def __post_init__(self) -> None:
        Procs.__init__(self, root="/nonexistent")
        self.page_size = 4096

    def add(self, pid: int, ppid: int, start: int | None = None, **kw: object) -> FakeProc:
        proc = FakeProc(pid=pid, ppid=ppid, start=start if start is not None else pid * 10, **kw)  # type: ignore[arg-type]
        self.table[pid] = proc
        return proc

    def stat(self, pid: int) -> ProcStat | None:
        p = self.table.get(pid)
        return None if p is None else ProcStat(pid, p.ppid, p.start)

    def rss(self, pid: int) -> int | None:
        p = self.table.get(pid)
        return None if p is None else p.rss

    def uss_pss(self, pid: int) -> tuple[int, int] | None:
        p = self.table.get(pid)
        return None if p is None or p.uss is None else (p.uss, p.uss)

    def child_pids(self, pid: int) -> list[int]:
        return [p.pid for p in self.table.values() if p.ppid == pid]

    def children(self, pid: int) -> list[ProcStat]:
        return [ProcStat(p.pid, p.ppid, p.start) for p in self.table.values() if p.ppid == pid]

    def scan_workers(self, full: bool = True) -> list[FoundWorker]:
        return [FoundWorker(stat=ProcStat(p.pid, p.ppid, p.start), name=p.name,
                            children=tuple(self.children(p.pid)))
                for p in self.table.values() if p.name]

    def container(self, pid: int) -> Container | None:
        if pid not in self.containers:
            return None
        where = Path(f"/fake/cgroup/{pid}")
        return Container(version=2, directory=where, pressure_file=self.pressure_file,
                         path=str(where), own=where)

    def read_container(self, container: Container) -> ContainerReading | None:
        return self.containers.get(int(container.directory.name))

    def memory_limit(self) -> tuple[int, str]:
        return 16 * 1024 * MiB, "host"

    def may_signal(self, pid: int) -> bool | None:
        if pid not in self.table:
            return None
        return pid not in self.denied

    def send_signal(self, pid: int, signum: int) -> bool:
        if pid in self.denied:
            raise PermissionError(pid)
        if pid not in self.table:
            return False
        self.signals.append((pid, signum))
        return True


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingSender:
    """Stands in for a child's connection to the daemon: what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def can_send(self) -> bool:
        return True

    def send(self, message: object) -> None:
        self.sent.append(message)

    def ring(self) -> None:
        self.sent.append("ring")

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


@dataclass
class RecordingProcs(Procs):
    """The real process table, except that signals are recorded and never delivered, and the
    scan finds no worker (this host's other workers have nothing to do with this test)."""

    signals: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        Procs.__init__(self)

    def scan_workers(self, full: bool = True) -> list[FoundWorker]:
        return []

    def send_signal(self, pid: int, signum: int) -> bool:
        self.signals.append((pid, signum))
        return True
