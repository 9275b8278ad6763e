"""The OS seam against real processes and the real /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_memguard.daemon.procs import Procs, is_worker_cmdline, worker_name
from tests.builders import MiB
from tests.support import kill_group

HOLDER = ("import sys, time; x = b'\\x01' * (int(sys.argv[1]) * 1048576); "
          "print('ready', flush=True); time.sleep(60)")


@pytest.fixture
def holder() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, "64"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    kill_group(proc, grace=1)


def test_rss_of_a_process_holding_64_mib(holder: subprocess.Popen[str]) -> None:
    rss = Procs().rss(holder.pid)
    assert rss is not None
    assert 64 * MiB < rss < 120 * MiB


def test_uss_and_pss_are_read_and_bounded_by_rss(holder: subprocess.Popen[str]) -> None:
    procs = Procs()
    figures = procs.uss_pss(holder.pid)
    rss = procs.rss(holder.pid)
    assert figures is not None
    assert rss is not None
    uss, pss = figures
    assert 64 * MiB <= uss <= pss <= rss


def test_stat_gives_parent_and_a_start_time_that_identifies_the_process(
        holder: subprocess.Popen[str]) -> None:
    procs = Procs()
    stat = procs.stat(holder.pid)
    assert stat is not None
    assert stat.ppid == os.getpid()
    assert stat.start > 0
    assert procs.stat(holder.pid) == stat
    assert [c.pid for c in procs.children(os.getpid())].count(holder.pid) == 1


def test_a_vanished_process_reads_as_none_not_an_error(holder: subprocess.Popen[str]) -> None:
    procs = Procs()
    pid = holder.pid
    holder.kill()
    holder.wait()
    assert procs.stat(pid) is None
    assert procs.rss(pid) is None
    assert procs.uss_pss(pid) is None
    assert procs.children(pid) == []
    assert procs.send_signal(pid, signal.SIGTERM) is False


GROWER = ("import sys; kept = []\n"
          "for line in sys.stdin:\n"
          "    kept.append(b'\\x01' * (32 * 1048576)); print('grown', flush=True)\n")


def _open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}


def test_held_descriptor_reads_fresh_figures_and_is_closed_when_the_process_goes() -> None:
    """RSS read twice through the same held descriptor follows the process's growth; once the
    process is gone the read is None and its descriptor is closed."""
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdin is not None
    assert proc.stdout is not None
    procs = Procs()
    statm = f"/proc/{proc.pid}/statm"
    try:
        before = procs.rss(proc.pid)
        assert before is not None
        assert statm in _open_fds()  # held, not reopened at every read
        proc.stdin.write("grow\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "grown"
        after = procs.rss(proc.pid)
        assert after is not None
        assert after - before >= 30 * MiB
    finally:
        kill_group(proc, grace=1)
    assert procs.rss(proc.pid) is None
    assert statm not in _open_fds()


def test_sweep_closes_descriptors_of_processes_no_longer_read(holder: subprocess.Popen[str]) -> None:
    """A pid read before the last sweep but not since has its descriptor closed at the next."""
    procs = Procs()
    statm = f"/proc/{holder.pid}/statm"
    assert procs.rss(holder.pid)
    procs.sweep()
    assert statm in _open_fds()  # read in the period that sweep closed
    procs.sweep()
    assert statm not in _open_fds()
    assert procs.rss(holder.pid)  # reopened on demand


def test_a_fixture_tree_is_read_afresh_every_time(tmp_path: Path) -> None:
    """Under a root that is not procfs nothing is held, so a rewritten file is seen."""
    (tmp_path / "7").mkdir()
    statm = tmp_path / "7" / "statm"
    statm.write_text("100 10 5 1 0 50 0\n")
    procs = Procs(root=str(tmp_path))
    assert procs.rss(7) == 10 * procs.page_size
    statm.write_text("100 20 5 1 0 50 0\n")
    assert procs.rss(7) == 20 * procs.page_size
    assert str(statm) not in _open_fds()


def test_a_zombie_is_treated_as_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert Procs().stat(proc.pid) is None
    finally:
        proc.wait()


def test_scan_finds_a_worker_command_line_and_its_children(tmp_path: Path) -> None:
    """A process run as `python .../celery worker -n NAME` is found with its child."""
    script = tmp_path / "celery"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('ready', flush=True)\ntime.sleep(60)\n")
    procs = Procs()
    procs.scan_workers(full=True)  # remembers every command line before the worker exists
    proc = subprocess.Popen([sys.executable, str(script), "-A", "x", "worker", "-n", "scan@%h"],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        found = [w for w in procs.scan_workers(full=False) if w.stat.pid == proc.pid]
        assert len(found) == 1  # an incremental scan reads the command lines of new pids
        assert found[0].name.startswith("scan@")
        assert len(found[0].children) == 1
    finally:
        kill_group(proc, grace=1)


@pytest.mark.parametrize(("cmdline", "expected"), [
    (["celery", "-A", "app", "worker"], True),
    (["/venv/bin/celery", "worker", "-c", "4"], True),
    (["/usr/bin/python3", "-m", "celery", "-A", "app", "worker"], True),
    (["python3.11", "/venv/bin/celery", "-A", "app", "worker"], True),
    (["[celeryd: w1@host:MainProcess] -active- (worker)"], True),
    (["[celeryd:MainProcess] -active- (worker)"], True),
    (["[celeryd: w1@host:ForkPoolWorker-1]"], False),  # a pool child: its worker is its parent
    (["[celeryd: w1@host:SpawnPoolWorker-2]"], False),
    (["[celeryd: w1@host:ForkPoolWorker-1] tests.apps.leaky.keep(...)"], False),
    (["celery", "-A", "app", "beat"], False),
    (["timeout", "60", "celery", "-A", "app", "worker"], False),
    (["bash", "-c", "celery worker"], False),
    (["python3", "worker.py"], False),
    ([], False),
])
def test_worker_command_lines(cmdline: list[str], expected: bool) -> None:
    assert is_worker_cmdline(cmdline) is expected


@pytest.mark.parametrize(("cmdline", "expected"), [
    (["celery", "worker", "-n", "w1@box"], "w1@box"),
    (["celery", "worker", "--hostname=w2@box"], "w2@box"),
    (["celery", "worker", "-nw3@box"], "w3@box"),
    (["celery", "worker", "--hostname", "w4"], "celery@w4"),
    (["[celeryd: w5@box:MainProcess] -active-"], "w5@box"),
    (["[celeryd: w6@box.example:MainProcess] -active- (-A app worker -n x:y)"], "w6@box.example"),
])
def test_worker_names(cmdline: list[str], expected: str) -> None:
    assert worker_name(cmdline, 1) == expected


def test_default_worker_name_expands_the_host() -> None:
    import socket  # noqa: PLC0415

    assert worker_name(["celery", "worker"], 1) == f"celery@{socket.gethostname()}"
    assert worker_name(["celery", "worker", "-n", "a@%h"], 1) == f"a@{socket.gethostname()}"


def test_memory_total_is_positive_and_at_most_the_host() -> None:
    import psutil  # noqa: PLC0415

    total = Procs().memory_total()
    assert 0 < total <= psutil.virtual_memory().total


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_smaps_of_another_users_process_without_ptrace_reads_as_none_not_an_error() -> None:
    """A daemon without CAP_SYS_PTRACE over the workers' user falls back to RSS."""
    target = subprocess.Popen(["sleep", "30"], user=65534, group=65534)
    probe = (  # imports first: root's interpreter is not readable by the other user
        "import os, sys; from celery_memguard.daemon.procs import Procs; p = Procs();"
        "os.setgroups([]); os.setgid(65533); os.setuid(65533);"
        "print(p.uss_pss(int(sys.argv[1])), p.denied_smaps, p.rss(int(sys.argv[1])) > 0)")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(target.pid)], capture_output=True,
                              text=True, check=False, timeout=30)
    finally:
        target.kill()
        target.wait()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "1", "True"]


def test_the_age_of_a_process_comes_from_its_start_and_the_uptime() -> None:
    """A process started just now is young; this one has lived at least as long as the test."""
    procs = Procs()
    child = subprocess.Popen(["sleep", "5"])
    try:
        started = procs.stat(child.pid)
        me = procs.stat(os.getpid())
        assert started is not None
        assert me is not None
        young, old = procs.age(started.start), procs.age(me.start)
        assert young is not None
        assert old is not None
        assert 0.0 <= young < 2.0
        assert old >= young
    finally:
        child.kill()
        child.wait()
    assert Procs(root="/nonexistent").age(12345) is None
