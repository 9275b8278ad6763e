"""The memory cgroups: a worker's container read as the kernel judges it (v2 and v1), and the
limit that configured percentages resolve against."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from celery_memguard.daemon import config
from celery_memguard.daemon.procs import Procs
from celery_memguard.protocol.cgroups import (
    Cgroups,
    ContainerReading,
    Pressure,
    cgroup_memory_limit,
    parse_limit,
    parse_pressure,
)
from tests.builders import MiB
from tests.support import MemoryCgroup

GiB = 1024**3


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_v2_limit_in_our_own_cgroup(tmp_path: Path) -> None:
    write(tmp_path, "kubepods/pod1/memory.max", f"{2 * GiB}\n")
    assert cgroup_memory_limit("0::/kubepods/pod1\n", tmp_path) == 2 * GiB


def test_v2_the_tightest_limit_up_the_path_wins(tmp_path: Path) -> None:
    write(tmp_path, "a/memory.max", f"{GiB}\n")
    write(tmp_path, "a/b/memory.max", "max\n")
    assert cgroup_memory_limit("0::/a/b\n", tmp_path) == GiB


def test_v2_in_a_cgroup_namespace_reads_the_root(tmp_path: Path) -> None:
    write(tmp_path, "memory.max", f"{3 * GiB}\n")
    assert cgroup_memory_limit("0::/\n", tmp_path) == 3 * GiB


def test_v2_unlimited_is_none(tmp_path: Path) -> None:
    write(tmp_path, "memory.max", "max\n")
    assert cgroup_memory_limit("0::/\n", tmp_path) is None


def test_v1_memory_controller_limit(tmp_path: Path) -> None:
    write(tmp_path, "memory/docker/abc/memory.limit_in_bytes", f"{512 * 1024**2}\n")
    write(tmp_path, "memory/memory.limit_in_bytes", "9223372036854771712\n")
    text = "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    assert cgroup_memory_limit(text, tmp_path) == 512 * 1024**2


def test_v1_unlimited_is_none(tmp_path: Path) -> None:
    write(tmp_path, "memory/x/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_memory_limit("4:memory:/x\n", tmp_path) is None


def test_no_memory_hierarchy_is_none(tmp_path: Path) -> None:
    assert cgroup_memory_limit("3:cpuset:/\n", tmp_path) is None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_percentages_in_the_config_resolve_against_the_container(tmp_path: Path, version: str) -> None:
    """A Procs over a fixture /proc and cgroup tree gives the total that config percentages use."""
    proc = tmp_path / "proc"
    cgroup = tmp_path / "cgroup"
    if version == "v2":
        write(proc, "self/cgroup", "0::/pod\n")
        write(cgroup, "pod/memory.max", f"{4 * GiB}\n")
    else:
        write(proc, "self/cgroup", "4:memory:/pod\n")
        write(cgroup, "memory/pod/memory.limit_in_bytes", f"{4 * GiB}\n")
    procs = Procs(root=str(proc), cgroup_root=str(cgroup))
    assert procs.memory_limit() == (4 * GiB, "cgroup")
    cfg = config.parse({"limits": {"soft": "25%", "hard": "50%"}},
                       memory_total=procs.memory_total(), env={})
    assert (cfg.limits.soft, cfg.limits.hard) == (GiB, 2 * GiB)


def test_without_a_cgroup_limit_the_host_memory_is_used(tmp_path: Path) -> None:
    import psutil  # noqa: PLC0415

    write(tmp_path / "proc", "self/cgroup", "0::/\n")
    write(tmp_path / "cgroup", "memory.max", "max\n")
    procs = Procs(root=str(tmp_path / "proc"), cgroup_root=str(tmp_path / "cgroup"))
    assert procs.memory_limit() == (psutil.virtual_memory().total, "host")


# -- a worker's container, found from its own /proc/PID/cgroup ---------------------------------

V2_EVENTS = "low 0\nhigh 3\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n"
PSI = ("some avg10=12.50 avg60=3.00 avg300=1.00 total=4000000\n"
       "full avg10=2.00 avg60=1.00 avg300=0.50 total=1500000\n")


def v2_tree(tmp_path: Path) -> Cgroups:
    """A pod whose worker container has a 1 GiB limit, seen from a sidecar in the same pod."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write(root, "cgroup.controllers", "cpu memory io\n")
    write(proc, "42/cgroup", "0::/kubepods/pod1/worker\n")
    write(root, "kubepods/pod1/memory.max", "max\n")
    write(root, "kubepods/pod1/worker/memory.current", f"{600 * MiB}\n")
    write(root, "kubepods/pod1/worker/memory.max", f"{GiB}\n")
    write(root, "kubepods/pod1/worker/memory.high", "max\n")
    write(root, "kubepods/pod1/worker/memory.events", V2_EVENTS)
    write(root, "kubepods/pod1/worker/memory.stat", f"anon 1\ninactive_file {100 * MiB}\nactive_file 5\n")
    write(root, "kubepods/pod1/worker/memory.pressure", PSI)
    return Cgroups(root=str(root), proc=str(proc))


def test_v2_a_worker_container_is_read_from_the_workers_own_cgroup(tmp_path: Path) -> None:
    """Usage, the working set without inactive cache, limit, events and its own pressure."""
    cgroups = v2_tree(tmp_path)
    container = cgroups.find(42)
    assert container is not None
    assert (container.version, container.path) == (2, "/kubepods/pod1/worker")
    reading = cgroups.read(container)
    assert reading == ContainerReading(
        usage=600 * MiB, working_set=500 * MiB, limit=GiB, high=None,
        events={"oom": 2, "oom_kill": 1, "high": 3, "max": 7},
        pressure=Pressure(some_avg10=0.125, full_avg10=0.02, some_total=4.0, full_total=1.5))


def test_v2_a_limit_set_on_a_parent_binds_and_its_cgroup_is_read(tmp_path: Path) -> None:
    """A worker in a cgroup without a limit under a pod with one is judged by the pod's."""
    cgroups = v2_tree(tmp_path)
    root = tmp_path / "cgroup"
    write(root, "kubepods/pod1/worker/memory.max", "max\n")
    write(root, "kubepods/pod1/memory.max", f"{2 * GiB}\n")
    write(root, "kubepods/pod1/memory.current", f"{700 * MiB}\n")
    container = cgroups.find(42)
    assert container is not None
    assert container.directory == root / "kubepods" / "pod1"
    reading = cgroups.read(container)
    assert reading is not None
    assert (reading.usage, reading.limit) == (700 * MiB, 2 * GiB)


def test_a_cgroup_outside_this_namespace_or_a_gone_process_is_not_found(tmp_path: Path) -> None:
    """In another cgroup namespace /proc shows the path as /../..; it cannot be read here."""
    cgroups = v2_tree(tmp_path)
    write(tmp_path / "proc", "43/cgroup", "0::/../../pod2/worker\n")
    assert cgroups.find(43) is None
    assert cgroups.find(44) is None


def test_v1_memory_controller_with_the_v2_hierarchy_for_pressure(tmp_path: Path) -> None:
    """The hybrid layout: memory in v1, per-cgroup pressure from the v2 mount; v1's OOM
    counter is in memory.oom_control and its limit hits in memory.failcnt."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write(proc, "42/cgroup", "4:memory:/docker/abc\n0::/docker/abc\n")
    write(root, "unified/cgroup.controllers", "\n")
    write(root, "unified/docker/abc/memory.pressure", PSI)
    base = "memory/docker/abc/"
    write(root, base + "memory.limit_in_bytes", f"{512 * MiB}\n")
    write(root, base + "memory.usage_in_bytes", f"{300 * MiB}\n")
    write(root, base + "memory.failcnt", "9\n")
    write(root, base + "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    write(root, base + "memory.stat", f"inactive_file 1\ntotal_inactive_file {50 * MiB}\n")
    write(root, "memory/memory.limit_in_bytes", "9223372036854771712\n")
    cgroups = Cgroups(root=str(root), proc=str(proc))
    container = cgroups.find(42)
    assert container is not None
    reading = cgroups.read(container)
    assert reading is not None
    assert (container.version, reading.limit, reading.working_set) == (1, 512 * MiB, 250 * MiB)
    assert reading.events == {"oom": 4, "oom_kill": 4, "high": 0, "max": 9}
    assert reading.pressure is not None
    assert reading.pressure.some_avg10 == 0.125


def test_the_system_pressure_stands_in_where_the_cgroup_has_none(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write(proc, "42/cgroup", "4:memory:/x\n")
    write(proc, "pressure/memory", PSI)
    write(root, "memory/x/memory.limit_in_bytes", f"{GiB}\n")
    container = Cgroups(root=str(root), proc=str(proc)).find(42)
    assert container is not None
    assert container.pressure_file == proc / "pressure" / "memory"


@pytest.mark.parametrize(("text", "limit"), [
    ("max\n", None), ("9223372036854771712\n", None), ("1073741824\n", GiB), ("", None),
])
def test_limit_files(text: str, limit: int | None) -> None:
    assert parse_limit(text) == limit


def test_pressure_lines_parse_to_shares_and_seconds() -> None:
    assert parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n") == Pressure(
        0.0, 0.0, 0.0, 0.0)
    assert parse_pressure("garbage\n") is None


HOLD = "import sys, time; block = b'x' * int(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def test_a_real_v1_cgroup_is_read_and_its_oom_kill_is_counted_once(
        memory_cgroup: Callable[[int], MemoryCgroup]) -> None:
    """A process holding 32 MiB in a 128 MiB cgroup is seen in its usage; one that asks for
    256 MiB is OOM-killed (the kernel kills the largest process, here that one), and the
    kernel's counter, read through the other's pid, says 1."""
    group = memory_cgroup(128 * MiB)
    cgroups = Cgroups()
    holder = subprocess.Popen(group.command([sys.executable, "-c", HOLD, str(32 * MiB)]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        container = cgroups.find(holder.pid)
        assert container is not None
        assert container.directory == group.path
        reading = cgroups.read(container)
        assert reading is not None
        assert reading.limit == 128 * MiB
        assert 32 * MiB < reading.usage < 128 * MiB
        assert reading.events["oom_kill"] == 0
        hog = subprocess.run(group.command([sys.executable, "-c", HOLD, str(256 * MiB)]),
                             capture_output=True, timeout=60, check=False)
        assert hog.returncode == -signal.SIGKILL
        after = cgroups.read(container)
        assert after is not None
        assert after.events["oom_kill"] == 1 == group.oom_kills()
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
