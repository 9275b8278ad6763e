"""The daemon's real loop on a real socket: routine reports are read in batches, the bell
cuts the wait short."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_memguard.daemon import config
from celery_memguard.daemon.loop import Daemon
from celery_memguard.protocol import messages, paths
from tests.builders import hello
from tests.fakes import FakeProcs
from tests.support import daemon_on_a_thread, free_port, wait_for

GAP = 5.0  # long enough that a report read before it ends was read because of the bell


def _hello(node: str) -> bytes:
    """This test process's hello, as a worker's main process with no children yet."""
    return messages.encode(hello((), pid=os.getpid(), node=node, concurrency=1))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    procs = FakeProcs()
    procs.add(os.getpid(), os.getppid())  # the test process speaks as a worker's main process
    cfg = config.parse({"agent": {"socket": str(tmp_path / "agent.sock")},
                        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
                        "sampling": {"interval": "10s", "scan_interval": "1h"}}, env={})
    with daemon_on_a_thread(cfg, procs, batch_gap=GAP) as daemon:
        yield daemon


def _hellos(daemon: Daemon) -> int:
    return daemon.supervisor.state.messages["worker_hello"]


def test_routine_reports_wait_for_the_batch_and_the_bell_reads_them_at_once(
        daemon: Daemon, tmp_path: Path) -> None:
    """After a read the next report waits for the batch gap; a ring has it read at once."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as agent, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bell:
        agent.connect(path)
        agent.send(_hello("a@h"))
        wait_for(lambda: _hellos(daemon) == 1, 2, "the first report was not read")
        agent.send(_hello("b@h"))
        time.sleep(0.5)
        assert _hellos(daemon) == 1, "a routine report was read before the batch gap ended"
        rang = time.monotonic()
        bell.sendto(b"!", paths.bell_path(path))
        wait_for(lambda: _hellos(daemon) == 2, GAP / 2, "the bell did not have the report read")
        assert time.monotonic() - rang < GAP / 2
    assert daemon.supervisor.state.workers[os.getpid()].name == "b@h"
