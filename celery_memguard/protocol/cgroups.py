"""A worker's container as the kernel judges it: its memory cgroup. Standard library only.

Both sides read it and must read it alike: the daemon for every worker it supervises, a pool
child for its own container before it starts a task, the worker's main process for the OOM
kill counter when it reaps a child.

cgroup v2 (``memory.current``, ``memory.max``, ``memory.high``, ``memory.events``,
``memory.stat``, ``memory.pressure``) and v1 (``memory.usage_in_bytes``,
``memory.limit_in_bytes``, ``memory.oom_control``, ``memory.failcnt``, ``memory.stat``), with
pressure from the v2 hierarchy where it is mounted (per cgroup), else ``/proc/pressure/memory``
(the whole system). The container of a worker is found from ``/proc/<worker pid>/cgroup``, not
the daemon's own: in Kubernetes the sidecar is a container of its own, with its own limit.

The cgroup that binds is the nearest one, going up from the worker's, that has a limit: its
usage is what the kernel compares with that limit. Its working set is usage minus the inactive
page cache, which the kernel drops before it kills (what Kubernetes' eviction judges).
The parsing functions are pure; ``Cgroups`` reads files under two roots given as arguments.
Where no limited cgroup holds a process, the kernel's global OOM kills are counted in
/proc/vmstat (``system_oom_kills``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True, slots=True)
class Pressure:
    """Memory pressure stall information: shares of time (0-1) and totals in seconds."""

    some_avg10: float
    full_avg10: float
    some_total: float
    full_total: float


@dataclass(frozen=True, slots=True)
class Container:
    """Where a worker's memory cgroup is, in the hierarchy this process sees."""

    version: int  # 1 or 2
    directory: Path  # the cgroup whose limit binds (or the worker's own, with no limit)
    pressure_file: Path | None  # memory.pressure of that cgroup (v2), else the system's
    path: str  # the cgroup path as /proc/PID/cgroup names it: the container's identity
    own: Path  # the process's own cgroup, whose event counters count its processes' kills


@dataclass(frozen=True, slots=True)
class ContainerReading:
    usage: int  # bytes charged to the cgroup, page cache included
    working_set: int  # usage minus inactive page cache: what the kernel cannot drop
    limit: int | None  # bytes; None where nothing up the path sets one
    high: int | None  # v2 memory.high, the throttling line; None when unset (or v1)
    events: dict[str, int]  # oom, oom_kill, high, max: counters since the cgroup was made
    pressure: Pressure | None


# -- parsing (pure) -------------------------------------------------------------------------------

def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) from the text of /proc/PID/cgroup; None where absent."""
    v2 = v1 = None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path.strip()
        elif "memory" in controllers.split(","):
            v1 = path.strip()
    return v2, v1


def parse_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control) as a dict."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        value = value.strip()
        if value.lstrip("-").isdigit():
            values[key] = int(value)
    return values


def parse_limit(text: str) -> int | None:
    """A limit file's value in bytes: None for ``max`` (v2) or v1's page-rounded 2**63."""
    text = text.strip()
    if not text.isdigit():
        return None
    value = int(text)
    return value if value < UNLIMITED else None


def parse_pressure(text: str) -> Pressure | None:
    """``some avg10=.. avg60=.. avg300=.. total=..`` and ``full ...`` lines (PSI)."""
    found: dict[str, tuple[float, float]] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        values = dict(field.split("=", 1) for field in fields if "=" in field)
        try:
            found[kind] = (float(values["avg10"]) / 100, int(values["total"]) / 1e6)
        except (KeyError, ValueError):
            continue
    if "some" not in found:
        return None
    full = found.get("full", (0.0, 0.0))
    return Pressure(some_avg10=found["some"][0], full_avg10=full[0],
                    some_total=found["some"][1], full_total=full[1])


def working_set(usage: int, stat: dict[str, int], version: int) -> int:
    """Usage minus the inactive page cache (the hierarchical figure on v1)."""
    inactive = stat.get("inactive_file", 0) if version == 2 else stat.get(
        "total_inactive_file", stat.get("inactive_file", 0))
    return max(0, usage - inactive)


# -- reading --------------------------------------------------------------------------------------

class Cgroups:
    """Finds and reads the memory cgroups of processes. ``root`` is where the cgroup
    hierarchies are mounted and ``proc`` the procfs mount (fixture trees in tests).

    Layouts: v2 alone at ``root`` (``root/cgroup.controllers`` exists), or v1 controllers in
    ``root/<controller>`` with the v2 hierarchy, if any, at ``root/unified``.
    """

    def __init__(self, root: str = "/sys/fs/cgroup", proc: str = "/proc") -> None:
        self.root = Path(root)
        self.proc = proc

    @property
    def unified(self) -> Path | None:
        """Where the v2 hierarchy is mounted, if anywhere."""
        if (self.root / "cgroup.controllers").exists():
            return self.root
        if (self.root / "unified" / "cgroup.controllers").exists():
            return self.root / "unified"
        return None

    def find(self, pid: int | str) -> Container | None:
        """The memory cgroup of a process, or None where it cannot be seen from here (the
        process is gone, or its cgroup lies outside this process's cgroup namespace)."""
        try:
            text = Path(self.proc, str(pid), "cgroup").read_text()
        except OSError:
            return None
        v2_path, v1_path = parse_proc_cgroup(text)
        unified = self.unified
        pressure = self._pressure_file(unified, v2_path)
        if v1_path is not None and (self.root / "memory").is_dir():
            found = self._binding(self.root / "memory", v1_path, "memory.limit_in_bytes")
            own = _join(self.root / "memory", v1_path)
            return None if found is None else Container(1, found, pressure, v1_path, own)
        if v2_path is not None and unified is not None:
            found = self._binding(unified, v2_path, "memory.max")
            if found is None or not (found / "memory.current").exists():
                return None  # the root cgroup, or no memory controller on this path
            own_pressure = found / "memory.pressure"
            return Container(2, found, own_pressure if own_pressure.exists() else pressure,
                             v2_path, _join(unified, v2_path))
        return None

    def _binding(self, base: Path, path: str, limit_name: str) -> Path | None:
        """The nearest cgroup up from ``path`` that has a limit, else ``path`` itself."""
        if path.startswith("/.."):
            return None  # outside this namespace's view
        parts = [part for part in path.split("/") if part]
        own = _join(base, path)
        if not own.is_dir():
            return None
        for depth in range(len(parts), -1, -1):
            directory = base.joinpath(*parts[:depth])
            try:
                limit = parse_limit((directory / limit_name).read_text())
            except OSError:
                continue
            if limit is not None:
                return directory
        return own

    def _pressure_file(self, unified: Path | None, v2_path: str | None) -> Path | None:
        if unified is not None and v2_path is not None and not v2_path.startswith("/.."):
            candidate = unified.joinpath(*[p for p in v2_path.split("/") if p], "memory.pressure")
            if candidate.exists():
                return candidate
        system = Path(self.proc, "pressure", "memory")
        return system if system.exists() else None

    def read(self, container: Container) -> ContainerReading | None:
        """The container's figures now; None if its cgroup went away."""
        d = container.directory
        try:
            if container.version == 2:
                usage = int((d / "memory.current").read_text())
                limit = _tightest(d, self.unified, "memory.max")
                high = parse_limit(_read(d / "memory.high") or "max")
                raw = parse_keyed(_read(container.own / "memory.events") or "")
                events = {key: raw.get(key, 0) for key in ("oom", "oom_kill", "high", "max")}
            else:
                usage = int((d / "memory.usage_in_bytes").read_text())
                limit = _tightest(d, self.root / "memory", "memory.limit_in_bytes")
                high = None
                control = parse_keyed(_read(container.own / "memory.oom_control") or "")
                failcnt = int(_read(d / "memory.failcnt") or 0)
                events = {"oom": control.get("oom_kill", 0), "oom_kill": control.get("oom_kill", 0),
                          "high": 0, "max": failcnt}
            stat = parse_keyed(_read(d / "memory.stat") or "")
        except (OSError, ValueError):
            return None
        pressure = None
        if container.pressure_file is not None:
            pressure = parse_pressure(_read(container.pressure_file) or "")
        return ContainerReading(usage=usage, working_set=working_set(usage, stat, container.version),
                                limit=limit, high=high, events=events, pressure=pressure)

    def oom_kills(self, pid: int | str = "self") -> int | None:
        """The kernel's count of OOM kills among a process's cgroup (its own cgroup's, which
        counts its processes whatever killer chose them), else the system's (/proc/vmstat)
        where no cgroup of its own is readable; None where neither is."""
        container = self.find(pid)
        if container is not None:
            name = "memory.events" if container.version == 2 else "memory.oom_control"
            counters = parse_keyed(_read(container.own / name) or "")
            if "oom_kill" in counters:
                return counters["oom_kill"]
        return parse_keyed(_read(Path(self.proc, "vmstat")) or "").get("oom_kill")

    def memory_limit(self, pid: int | str = "self") -> int | None:
        """The tightest memory limit on the path of a process's cgroup (v2 or v1)."""
        try:
            text = Path(self.proc, str(pid), "cgroup").read_text()
        except OSError:
            return None
        return cgroup_memory_limit(text, self.root)


def _join(base: Path, path: str) -> Path:
    return base.joinpath(*[part for part in path.split("/") if part])


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _tightest(directory: Path, base: Path | None, name: str) -> int | None:
    """The lowest limit from ``directory`` up to ``base``: a parent's limit binds too."""
    found: list[int] = []
    current = directory
    while True:
        limit = parse_limit(_read(current / name) or "max")
        if limit is not None:
            found.append(limit)
        if base is None or current in (base, current.parent):
            break
        current = current.parent
    return min(found) if found else None


def cgroup_memory_limit(proc_cgroup: str, root: Path) -> int | None:
    """The tightest memory limit on the path of a cgroup, for cgroup v2 and v1.

    ``proc_cgroup`` is the text of /proc/PID/cgroup; ``root`` is where the hierarchy is
    mounted. Limits are looked up from the cgroup up to the root, since a parent's limit
    binds its children too; in a container with its own cgroup namespace the path is "/".
    """
    found: list[int] = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [part for part in path.strip().split("/") if part]
        for depth in range(len(parts), -1, -1):
            limit = parse_limit(_read(base.joinpath(*parts[:depth], name)) or "max")
            if limit is not None:
                found.append(limit)
    return min(found) if found else None
