"""Load on loopback, bounded in time: 10,000 agent messages a second while the daemon samples
1,000 children at a 1 s tick, without falling behind or dropping anything."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Daemon, kill_group

pytestmark = pytest.mark.slow

CHILDREN = 1000
RATE = 10_000
SECONDS = 3

# A stand-in worker main (its command line reads "celery ... worker", so the scan finds it):
# 1,000 idle children to sample, and on request one more child that speaks as a pool child.
MAIN = """
import subprocess, sys, time
kids = [subprocess.Popen(["sleep", "300"]) for _ in range(int(sys.argv[4]))]
print("ready", flush=True)
sys.stdin.readline()
sender = subprocess.Popen([sys.executable, "-c", sys.argv[5], sys.argv[6], sys.argv[7], sys.argv[8]],
                          stdout=subprocess.PIPE, text=True)
print(sender.communicate()[0].strip(), flush=True)
time.sleep(300)
"""

SENDER = """
import os, socket, sys, time
from celery_memguard.protocol import messages
path, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # as the agent sets it
sock.connect(path)
sock.setblocking(False)
pid, ppid, sent, refused = os.getpid(), os.getppid(), 0, 0
start = time.monotonic()
total = int(rate * seconds)
while sent + refused < total:
    due = min(total, int((time.monotonic() - start) * rate) + 1)
    while sent + refused < due:
        n = sent + refused
        data = messages.encode(messages.TaskEnd(pid=pid, ppid=ppid, index=0, task="load.task", id=str(n),
                                        rss_before=50 << 20, rss=50 << 20, tasks=n + 1, ok=True))
        try:
            sock.send(data)
            sent += 1
        except BlockingIOError:
            refused += 1
    time.sleep(0.002)
print(sent, refused, round(time.monotonic() - start, 3))
"""


def test_ten_thousand_messages_a_second_with_a_thousand_children(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(sampling={"interval": "1s", "scan_interval": "1s"},
                          limits={"soft": "1GiB", "hard": "2GiB"}, log={"level": "info"})
    script = tmp_path / "celery"
    script.write_text(MAIN)
    main = subprocess.Popen(
        [sys.executable, str(script), "-A", "load", "worker", str(CHILDREN), SENDER,
         str(daemon.socket_path), str(RATE), str(SECONDS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert main.stdout is not None
        assert main.stdin is not None
        assert main.stdout.readline().strip() == "ready"

        def seen() -> int:
            return sum(len(w["children"]) for w in daemon.status()["workers"] if w["pid"] == main.pid)

        deadline = time.monotonic() + 20
        while seen() < CHILDREN:
            assert time.monotonic() < deadline, f"only {seen()} children seen"
            time.sleep(0.2)
        ticks_before = daemon.metric("celery_memguard_tick_seconds_count")
        main.stdin.write("go\n")
        main.stdin.flush()
        sent, refused, took = main.stdout.readline().split()
        caught_up = time.monotonic()
        while daemon.metric("celery_memguard_messages_total", type="task_end") < int(sent):
            assert time.monotonic() - caught_up < 2.0, "the daemon fell behind the messages"
            time.sleep(0.05)
        ticks = daemon.metric("celery_memguard_tick_seconds_count") - ticks_before
        tick_sum = daemon.metric("celery_memguard_tick_seconds_sum")
        print(f"load: sent {sent} in {took}s, refused {refused}, ticks {ticks:.0f}, "
              f"mean tick {tick_sum / daemon.metric('celery_memguard_tick_seconds_count') * 1e3:.1f} ms")
        assert int(refused) == 0, "the socket overflowed: the daemon did not keep up"
        assert int(sent) == RATE * SECONDS
        assert float(took) < SECONDS * 1.3
        assert daemon.metric("celery_memguard_messages_dropped_total") == 0
        assert ticks >= SECONDS - 1  # the tick kept its pace while the messages flowed
        assert daemon.healthy()
    finally:
        kill_group(main, grace=2)
