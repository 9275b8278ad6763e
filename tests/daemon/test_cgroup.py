"""Percentages resolve against the cgroup memory limit (v2 and v1), else the host's memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from celery_memguard.daemon import config
from celery_memguard.daemon.procs import Procs, cgroup_memory_limit

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
