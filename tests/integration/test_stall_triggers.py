"""Memory stall triggers for real: the kernel wakes the daemon when tasks stall on memory.

A process in a small cgroup v1 memory cgroup reads a file mapped into memory that is larger
than the cgroup, page after page, again and again: the pages it needs are evicted and read back,
and the time it waits for them is memory stall (PSI ``some``), which the system's
``/proc/pressure/memory`` counts. Where PSI or a cgroup is not available, the tests skip saying
why.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_memguard.daemon import config
from celery_memguard.daemon.pressure import RETRY_SECONDS, StallTriggers
from celery_memguard.protocol import messages
from celery_memguard.protocol.cgroups import ContainerReading
from tests.builders import MiB, hello
from tests.fakes import FakeProcs
from tests.support import MemoryCgroup, daemon_on_a_thread, free_port, wait_for

pytestmark = pytest.mark.slow

SYSTEM = Path("/proc/pressure/memory")
THRASH = """
import mmap, os, sys
path = sys.argv[1]
with open(path, "wb") as f:
    for _ in range(96):
        f.write(os.urandom(1 << 20))
with open(path, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    total = 0
    for _ in range(400):
        for i in range(0, len(m), 4096):
            total += m[i]
"""


@pytest.fixture
def thrash(memory_cgroup: Callable[[int], MemoryCgroup], tmp_path: Path,
           ) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts a process that stalls on memory in a 48 MiB cgroup; it is killed at the end."""
    if not SYSTEM.exists():
        pytest.skip("this kernel has no PSI (/proc/pressure/memory): boot it with psi=1")
    group = memory_cgroup(48 * MiB)
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(group.command([sys.executable, "-c", THRASH,
                                               str(tmp_path / "mapped.bin")]))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


def _armed_or_skip(triggers: StallTriggers, share: float) -> None:
    failed = triggers.arm({SYSTEM: share}, 0.0)
    if failed:
        pytest.skip(f"no stall trigger on {SYSTEM}: {failed[0][1]}")


def test_a_trigger_fires_when_tasks_stall_on_memory(
        thrash: Callable[[], subprocess.Popen[bytes]]) -> None:
    triggers = StallTriggers()
    poll = select.epoll()
    try:
        _armed_or_skip(triggers, 0.05)
        assert list(triggers.armed()) == [str(SYSTEM)]
        [(fd, (path, _serial))] = triggers.descriptors().items()
        assert path == SYSTEM
        poll.register(fd, select.EPOLLPRI)
        poll.poll(0)  # a stall elsewhere on this host before now may have fired it already
        proc = thrash()
        deadline = time.monotonic() + 30
        fired = []
        while not fired and time.monotonic() < deadline and proc.poll() is None:
            fired = poll.poll(0.2)
        assert fired == [(fd, select.EPOLLPRI)], "the stall did not fire the trigger"
    finally:
        poll.close()
        triggers.close()


def test_a_file_without_psi_is_said_unavailable_once_and_tried_again_now_and_then(
        tmp_path: Path) -> None:
    """A cgroup's pressure file that takes no trigger (here: none there yet) is said once,
    tried again every RETRY_SECONDS while a worker still needs it, and forgotten when none
    does."""
    triggers = StallTriggers()
    try:
        missing = tmp_path / "memory.pressure"
        [(path, why)] = triggers.arm({missing: 0.4}, 0.0)
        assert path == missing
        assert "cannot open it" in why
        assert triggers.arm({missing: 0.4}, 1.0) == []  # not said again
        missing.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
        assert triggers.arm({missing: 0.4}, 2.0) == []  # not tried again yet
        assert triggers.unavailable == {missing: why}
        assert triggers.arm({missing: 0.4}, RETRY_SECONDS + 1) == []  # tried again: there now
        assert triggers.unavailable == {}
        assert list(triggers.armed()) == [str(missing)]  # (a plain file takes any write)
        assert triggers.arm({}, RETRY_SECONDS + 2) == []
        assert triggers.armed() == {}
        assert triggers.arm({tmp_path / "gone" / "memory.pressure": 0.4}, 0.0) != []
        assert triggers.arm({}, 1.0) == []
        assert triggers.unavailable == {}  # no worker needs it any more: forgotten
    finally:
        triggers.close()


def test_a_stall_wakes_the_daemon_and_its_workers_container_is_read_at_once(
        thrash: Callable[[], subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """The loop arms a trigger on the pressure file of each worker's container once a tick has
    found it; the stall wakes the loop, which reads that container there and then, counts the
    stall for the worker and decides for it (only a trigger counts a stall)."""
    procs = FakeProcs()
    procs.add(os.getpid(), os.getppid())  # the test process speaks as a worker's main process
    procs.containers[os.getpid()] = ContainerReading(
        usage=100 * MiB, working_set=90 * MiB, limit=1024 * MiB, high=None, events={},
        pressure=None)
    procs.pressure_file = SYSTEM
    cfg = config.parse({"agent": {"socket": str(tmp_path / "agent.sock")},
                        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                        "limits": {"container_pressure": "5%"},
                        "sampling": {"interval": "1s", "scan_interval": "1h"}}, env={})
    with daemon_on_a_thread(cfg, procs) as daemon:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as agent:
            agent.connect(str(tmp_path / "agent.sock"))
            agent.send(messages.encode(hello((), pid=os.getpid(), node="w@h", concurrency=1)))
            wait_for(lambda: any(daemon.supervisor.view.stall_triggers.values()), 5,
                     "no tick armed a trigger for the worker's container")
        if daemon.triggers.unavailable:
            pytest.skip(f"no stall trigger here: {daemon.triggers.unavailable}")
        assert list(daemon.supervisor.view.stall_triggers["armed"]) == [str(SYSTEM)]
        thrash()
        wait_for(lambda: daemon.supervisor.state.stalls["w@h"] >= 1, 30,
                 "the stall did not wake the daemon")
        wait_for(lambda: 'celery_memguard_container_memory_stalls_total{worker="w@h"}'
                 in daemon.supervisor.metrics.render().decode(), 5,
                 "the stall was not exported with the next tick's view")
