"""The OS seam: find workers and their children, read memory, send signals.

Everything that touches ``/proc``, psutil or ``os.kill`` lives here, behind one class whose
root directory is an argument, so the rest of the daemon can be driven by a fake table. A
process that vanished is normal (None / False); access denied is reported to the caller.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import socket
from collections.abc import Iterator
from pathlib import Path

import psutil

from celery_memguard.daemon.readings import FoundWorker, ProcStat
from celery_memguard.protocol.cgroups import Cgroups, Container, ContainerReading


class Procs:
    """Reads and signals real processes. ``root`` is the procfs mount (a fixture tree in tests).

    The RSS of a process is read through a descriptor of its ``statm`` kept open between
    ticks: procfs regenerates the file at every read, a ``pread`` on a held descriptor costs
    about a tenth of an open+read+close (2 against 20 µs here), and a descriptor stays bound
    to the process it was opened for - once that process is gone it answers ESRCH, even if
    its pid has been reused. Descriptors of pids not read since the last ``sweep()`` are
    closed there. A root that is not procfs (a fixture tree) is opened afresh at every read.
    """

    def __init__(self, root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.root = root
        self.cgroup_root = cgroup_root
        self.cgroups = Cgroups(root=cgroup_root, proc=root)
        self.page_size = os.sysconf("SC_PAGE_SIZE")
        self.clock_ticks = os.sysconf("SC_CLK_TCK")
        self.denied_smaps = 0  # smaps_rollup reads refused (no CAP_SYS_PTRACE over another user)
        self._seen: dict[int, list[str] | None] = {}  # pid -> worker command line, or None
        self._hold = os.path.realpath(root) == "/proc"
        self._statm: dict[int, int] = {}  # pid -> open descriptor of /proc/PID/statm
        self._read: set[int] = set()  # pids read since the last sweep
        self._held_max = _held_max()

    # -- reading -----------------------------------------------------------------------------

    def alive(self, pid: int, start: int) -> bool:
        """Whether a process with this pid and start time still runs."""
        stat = self.stat(pid)
        return stat is not None and stat.start == start

    def stat(self, pid: int) -> ProcStat | None:
        """ppid and start time from /proc/PID/stat, or None if the process is gone or a zombie."""
        try:
            with open(f"{self.root}/{pid}/stat", "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOENT):
                return None
            raise
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None  # exited, waiting to be reaped: it has no memory and takes no signal
        return ProcStat(pid=pid, ppid=int(fields[1]), start=int(fields[19]))

    def rss(self, pid: int) -> int | None:
        """Resident set size in bytes from /proc/PID/statm (a couple of microseconds through a
        held descriptor), None if gone; 0 for a zombie."""
        fd = self._statm.get(pid)
        held = fd is not None
        if fd is None:
            try:
                fd = os.open(f"{self.root}/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            except (FileNotFoundError, ProcessLookupError):
                return None
            held = self._hold and len(self._statm) < self._held_max
            if held:
                self._statm[pid] = fd
        try:
            data = os.pread(fd, 128, 0)
        except ProcessLookupError:  # the process this descriptor was opened for is gone
            self._close(pid)
            return None
        finally:
            if not held:
                os.close(fd)
        self._read.add(pid)
        return int(data.split()[1]) * self.page_size

    def sweep(self) -> None:
        """Close the held descriptors of pids not read since the previous sweep (once a tick)."""
        for pid in [pid for pid in self._statm if pid not in self._read]:
            self._close(pid)
        self._read.clear()
        self._held_max = _held_max()  # the daemon raises its limit after it is built

    def close(self) -> None:
        for pid in list(self._statm):
            self._close(pid)

    def _close(self, pid: int) -> None:
        fd = self._statm.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def age(self, start: int) -> float | None:
        """Seconds since a process started, from its start time in clock ticks (stat field
        22) and the system's uptime; None where the root has no uptime (a fixture tree)."""
        try:
            with open(f"{self.root}/uptime", "rb") as fh:
                uptime = float(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return max(0.0, uptime - start / self.clock_ticks)

    def uss_pss(self, pid: int) -> tuple[int, int] | None:
        """USS and PSS in bytes from /proc/PID/smaps_rollup (tens of microseconds); None if gone,
        or if reading it is not allowed (counted in ``denied_smaps``): RSS then decides."""
        try:
            with open(f"{self.root}/{pid}/smaps_rollup", "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except PermissionError:
            # Another user's process needs CAP_SYS_PTRACE for this file; RSS still works.
            self.denied_smaps += 1
            return None
        values: dict[bytes, int] = {}
        for line in data.splitlines():
            key, _, rest = line.partition(b":")
            if key in (b"Pss", b"Private_Clean", b"Private_Dirty", b"Private_Hugetlb"):
                values[key] = int(rest.split()[0]) * 1024
        uss = values.get(b"Private_Clean", 0) + values.get(b"Private_Dirty", 0)
        uss += values.get(b"Private_Hugetlb", 0)
        return uss, values.get(b"Pss", 0)

    def child_pids(self, pid: int) -> list[int]:
        """Direct children of pid, from /proc/PID/task/*/children where the kernel has it
        (one read per thread of the parent; zombies included until reaped)."""
        pids: list[int] = []
        task_dir = Path(self.root, str(pid), "task")
        try:
            for task in task_dir.iterdir():
                pids.extend(int(p) for p in (task / "children").read_bytes().split())
        except FileNotFoundError:
            if not task_dir.parent.exists():
                return []
            pids = [s.pid for s in self._all_stats() if s.ppid == pid]
        return pids

    def children(self, pid: int) -> list[ProcStat]:
        """Direct, live children of pid with their identities (one stat read each)."""
        stats = [self.stat(child) for child in self.child_pids(pid)]
        return [s for s in stats if s is not None and s.ppid == pid]

    def cmdline(self, pid: int) -> list[str]:
        try:
            data = Path(self.root, str(pid), "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return []
        return [part.decode(errors="replace") for part in data.split(b"\0") if part]

    def scan_workers(self, full: bool = True) -> list[FoundWorker]:
        """Every Celery worker main process with its direct children, agent or not.

        Command lines are read once per pid: a scan that is not ``full`` reads only those of
        pids it has not seen, so it costs a directory listing plus the few worker processes,
        not a read of every process on the host (which blocked the loop for tens of ms). A
        pid reused by an unrelated process is caught by the start time kept for matches, and
        by the next full scan for the others.
        """
        listed = [int(entry.name) for entry in os.scandir(self.root) if entry.name.isdigit()]
        if full:
            self._seen.clear()
        else:
            alive = set(listed)
            for pid in [pid for pid in self._seen if pid not in alive]:
                del self._seen[pid]
        for pid in listed:
            if pid not in self._seen:
                line = self.cmdline(pid)
                self._seen[pid] = line if is_worker_cmdline(line) else None
        matched: dict[int, tuple[ProcStat, list[str]]] = {}
        for pid, cmd in self._seen.items():
            if cmd is not None and (stat := self.stat(pid)) is not None:
                matched[pid] = (stat, cmd)
        found = []
        for pid, (stat, cmd) in matched.items():
            if stat.ppid in matched:
                continue  # a pool child (forked, so it shares its parent's command line)
            found.append(FoundWorker(stat=stat, name=worker_name(cmd, pid),
                                     children=tuple(self.children(pid))))
        return found

    def _all_stats(self) -> Iterator[ProcStat]:
        for entry in os.scandir(self.root):
            if entry.name.isdigit():
                stat = self.stat(int(entry.name))
                if stat is not None:
                    yield stat

    def container(self, pid: int) -> Container | None:
        """The memory cgroup of a worker (protocol.cgroups), None where not visible from here."""
        return self.cgroups.find(pid)

    def read_container(self, container: Container) -> ContainerReading | None:
        return self.cgroups.read(container)

    def memory_total(self) -> int:
        """The memory a percentage refers to: the cgroup limit if one is set, else the host's."""
        return self.memory_limit()[0]

    def memory_limit(self) -> tuple[int, str]:
        """(bytes, "cgroup" or "host"): the tightest cgroup memory limit above us, else RAM."""
        host = int(psutil.virtual_memory().total)
        limit = self.cgroups.memory_limit("self")
        if limit is not None and limit < host:
            return limit, "cgroup"
        return host, "host"

    # -- acting ------------------------------------------------------------------------------

    def may_signal(self, pid: int) -> bool | None:
        """Whether this process may send ``pid`` signals (signal 0 checks and sends nothing);
        None if it is gone."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return False
        return True

    def send_signal(self, pid: int, signum: int) -> bool:
        """Deliver a signal; False if the process is gone, PermissionError if not ours to signal."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True


_TITLE = re.compile(r"\[celeryd:(?: ([^\]]+):)?([^:\]]+)\]")  # [celeryd: NODE:PROCESS]


def _title(cmdline: list[str]) -> tuple[str, str] | None:
    """(nodename, process name) of a title Celery set with setproctitle, else None."""
    match = _TITLE.match(cmdline[0]) if cmdline else None
    return (match.group(1) or "", match.group(2)) if match else None


def is_worker_cmdline(cmdline: list[str]) -> bool:
    """True for ``celery ... worker`` command lines and the title Celery gives a worker's main
    process (``[celeryd: w1@host:MainProcess]``); a pool child's title (``...:ForkPoolWorker-1]``)
    is not a worker, also where its main process has no such title (an embedded worker)."""
    if not cmdline:
        return False
    title = _title(cmdline)
    if title is not None:
        return title[1] == "MainProcess"
    program = os.path.basename(cmdline[0])
    if program == "celery":
        is_celery = True
    elif program.startswith("python") and len(cmdline) > 1:
        is_celery = os.path.basename(cmdline[1]) == "celery" or cmdline[1:3] == ["-m", "celery"]
    else:
        is_celery = False  # e.g. `timeout 60 celery ... worker`: the wrapper is not the worker
    return is_celery and "worker" in cmdline


def worker_name(cmdline: list[str], pid: int) -> str:
    """The nodename Celery would use: ``-n/--hostname`` with %h/%n/%d expanded, else celery@host."""
    title = _title(cmdline)
    if title is not None and title[0]:
        return title[0]
    host = socket.gethostname()
    name = f"celery@{host}"
    args = iter(cmdline)
    for arg in args:
        if arg in ("-n", "--hostname"):
            name = next(args, name)
        elif arg.startswith("--hostname="):
            name = arg.split("=", 1)[1]
        elif arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
            name = arg[2:]
    short, _, domain = host.partition(".")
    name = name.replace("%h", host).replace("%n", short).replace("%d", domain)
    if "@" not in name:
        name = f"celery@{name}"
    return name



def _held_max() -> int:
    """Held statm descriptors take at most a quarter of this process's descriptor limit (the
    agents' connections need one each); past it, reads open and close as usual."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 16 if soft == resource.RLIM_INFINITY else max(0, soft // 4)
