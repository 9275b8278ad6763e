"""A pid reused by an unrelated process between a sample and an action, with real processes:
the kernel is made to hand a reaped child's pid to a new process (through
/proc/sys/kernel/ns_last_pid), and a recycle aimed at the old process goes through the real
Actor and the real process table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from celery_memguard.daemon.actions import Actor
from celery_memguard.daemon.decision import Decision, Reason
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.state import State
from celery_memguard.protocol import signals
from tests.builders import MiB
from tests.support import ROOT

pytestmark = pytest.mark.slow

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
REUSE_WITHIN = 10.0  # seconds to get the pid back; other processes may fork in between
# Records every signal it is sent; says it is ready once its handlers are in place.
RECORDER = """
import signal, sys, time
record = open(sys.argv[1], "a", buffering=1)
def note(signum, frame):
    record.write(f"{signum}\\n")
for signum in signal.valid_signals():
    if signum not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD):
        try:
            signal.signal(signum, note)
        except (OSError, ValueError):
            pass
open(sys.argv[2], "w").close()
while True:
    time.sleep(3600)
"""
IN_NAMESPACE = """
import json, sys
from pathlib import Path
from tests.integration.test_pid_reuse import act_on_a_reused_pid
print(json.dumps(act_on_a_reused_pid(Path(sys.argv[1]), [])))
"""
UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
           "--kill-child"]


def _kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def _spawn_with_pid(pid: int, argv: list[str], started: list[subprocess.Popen[Any]]
                    ) -> subprocess.Popen[Any]:
    """Start ``argv`` as process ``pid`` (free, and reaped): the kernel hands out the pid after
    the last one it gave, which ns_last_pid sets. Retried while others take it first."""
    deadline = time.monotonic() + REUSE_WITHIN
    while time.monotonic() < deadline:
        NS_LAST_PID.write_text(str(pid - 1))
        proc = subprocess.Popen(argv)
        started.append(proc)
        if proc.pid == pid:
            return proc
        _kill(proc)
    raise AssertionError(f"pid {pid} was not handed out again within {REUSE_WITHIN}s")


def _signals(record: Path) -> list[int]:
    return [int(line) for line in record.read_text().split()] if record.exists() else []


def act_on_a_reused_pid(workdir: Path, started: list[subprocess.Popen[Any]]) -> dict[str, Any]:
    """Sample a child, let it exit and be reaped, give its pid to a new process that records the
    signals it gets, then carry out a recycle decided on the old sample; report what happened."""
    procs = Procs()
    record, ready = workdir / "signals", workdir / "ready"
    try:
        old = subprocess.Popen(["sleep", "60"])
        started.append(old)
        sampled = procs.stat(old.pid)
        assert sampled is not None
        time.sleep(5 / os.sysconf("SC_CLK_TCK"))  # start times are in clock ticks: differ
        _kill(old)
        assert procs.stat(old.pid) is None
        new = _spawn_with_pid(old.pid, [sys.executable, "-c", RECORDER, str(record), str(ready)],
                              started)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "the recorder did not start"
            time.sleep(0.01)
        now_there = procs.stat(new.pid)
        assert now_there is not None
        decision = Decision(worker="reuse@test", worker_pid=os.getpid(), index=0,
                            proc=sampled.proc, ppid=sampled.ppid, measured=200 * MiB,
                            threshold=100 * MiB, reason=Reason.SOFT, signal=signals.RECYCLE_SIGNAL)
        state = State(procs.stat)
        with capture_logs() as events:
            Actor(procs, state, structlog.get_logger(), dry_run=False).carry_out(
                [decision], time.monotonic())
        time.sleep(0.3)  # a signal sent would have been handled by now
        received, alive = _signals(record), new.poll() is None
        # The recorder does record a signal sent to it, so none recorded means none sent.
        procs.send_signal(new.pid, signals.RECYCLE_SIGNAL)
        deadline = time.monotonic() + 10
        while not _signals(record) and time.monotonic() < deadline:
            time.sleep(0.01)
        return {
            "sampled": [sampled.pid, sampled.ppid, sampled.start],
            "now_there": [now_there.pid, now_there.ppid, now_there.start],
            "received": received, "alive": alive, "control": _signals(record),
            "events": [{k: v for k, v in e.items() if k in ("event", "why", "pid")} for e in events],
            "recycles": sorted([*key, n] for key, n in state.recycles.items()),
        }
    finally:
        for proc in started:
            _kill(proc)


def _in_namespaces(workdir: Path, started: list[subprocess.Popen[Any]]) -> dict[str, Any]:
    """The same in a new user and pid namespace, where an ordinary user is root enough to write
    ns_last_pid (and no other process competes for pids)."""
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=30,
                           check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a user and pid namespace: {probe.stderr.strip()}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*UNSHARE, sys.executable, "-c", IN_NAMESPACE, str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    started.append(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def _may_set_last_pid() -> bool:
    """Whether this process holds CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, which writing
    ns_last_pid takes (the file's mode says everyone may)."""
    status = Path("/proc/self/status").read_text()
    effective = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    return bool(effective & (1 << 21 | 1 << 40))  # CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[Any]]]:
    """Processes a test starts; killed with their whole session afterwards, failed or not."""
    processes: list[subprocess.Popen[Any]] = []
    yield processes
    for proc in processes:
        if proc.poll() is None:
            try:
                if os.getpgid(proc.pid) == proc.pid:  # its own session: unshare and its child
                    os.killpg(proc.pid, signal.SIGKILL)  # the namespace dies with its init
            except ProcessLookupError:
                pass
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("where", ["this_process", "new_namespaces"])
def test_a_recycle_aimed_at_a_pid_another_process_now_holds_is_dropped(
        where: str, tmp_path: Path, started: list[subprocess.Popen[Any]]) -> None:
    """A recycle for a process whose pid now names another one is dropped: no signal, no count."""
    if where == "this_process":
        if not _may_set_last_pid():
            pytest.skip("writing /proc/sys/kernel/ns_last_pid needs root (CAP_SYS_ADMIN or "
                        "CAP_CHECKPOINT_RESTORE); the new_namespaces case does it unprivileged")
        seen = act_on_a_reused_pid(tmp_path, started)
    else:
        seen = _in_namespaces(tmp_path, started)
    (old_pid, old_ppid, old_start), (pid, ppid, start) = seen["sampled"], seen["now_there"]
    assert (pid, ppid) == (old_pid, old_ppid)  # same pid, same parent: only the start time differs
    assert start != old_start
    assert seen["received"] == [], "the process that took the pid over was signalled"
    assert seen["alive"]
    assert seen["events"] == [{"event": "recycle_dropped", "why": "not_a_verified_pool_child",
                               "pid": old_pid}]
    assert seen["recycles"] == []
    assert seen["control"] == [signals.RECYCLE_SIGNAL]
