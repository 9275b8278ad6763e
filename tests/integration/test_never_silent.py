"""Never silent: a hook the agent cannot join is named, shown and diagnosed while every task
still runs; a message the daemon cannot attach to a worker is counted and its sender logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable

import pytest

from celery_memguard.protocol import hooks, messages
from tests.support import ROOT, Daemon, Worker, wait_for

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery_memguard", *args], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_billiard_without_the_method_the_agent_wraps_degrades_loudly_and_loses_no_task(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """billiard's pool worker as a release that renamed prepare_result would have it: the
    agent says so once in the worker's log, takes task ends from Celery's task_postrun, and
    children still leave past their soft limit with every task run once; /metrics and status
    show the worker degraded, and doctor fails naming the hook and the fix."""
    daemon = start_daemon(limits={"soft": "100MiB", "hard": "1GiB"},
                          sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path,
                          extra_env={"MEMGUARD_TEST_BREAK_HOOK": "prepare_result"})
    results = [worker.send("keep", 4) for _ in range(60)]
    for result in results:
        result.get(timeout=60)
    runs = Counter(worker.runs())
    assert [runs[r.id] for r in results] == [1] * 60
    wait_for(lambda: daemon.metric("celery_memguard_recycles_total", worker=worker.name,
                                   reason="soft") >= 1, 10, daemon.output())
    assert worker.output().count(f"missing hook {hooks.PREPARE_RESULT}") == 1, worker.output()

    wait_for(lambda: daemon.metric("celery_memguard_worker_info", worker=worker.name,
                                   agent="true", agent_state="degraded") == 1, 10,
             daemon.output())
    assert daemon.metric("celery_memguard_agent_hook_missing", worker=worker.name,
                         hook=hooks.PREPARE_RESULT) == 1
    [mine] = [w for w in daemon.status()["workers"] if w["pid"] == worker.pid]
    assert (mine["agent_state"], mine["missing_hooks"]) == ("degraded", [hooks.PREPARE_RESULT])

    status = cli("status", "--url", daemon.url)
    assert status.returncode == 0, status.stderr
    assert f"{worker.name}: agent degraded: {hooks.PREPARE_RESULT} missing" in \
        " ".join(status.stdout.split())

    doctor = cli("doctor", "--url", daemon.url, "--json")
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    [failed] = [c for c in json.loads(doctor.stdout)["checks"]
                if c["subject"] == worker.name and c["level"] == "fail"]
    assert hooks.PREPARE_RESULT in failed["what"]
    assert "pin billiard<4.4" in failed["fix"]
    plain = cli("doctor", "--url", daemon.url)
    assert plain.returncode == 1
    assert f"FAIL  {worker.name}" in plain.stdout


SENDER = textwrap.dedent("""
    import os, socket, sys
    from celery_memguard.protocol import messages
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(sys.argv[1])
        for _ in range(5):  # a main process the daemon never heard of, saying goodbye
            sock.send(messages.encode(messages.WorkerBye(pid=os.getpid())))
""")


def test_messages_from_a_process_whose_worker_is_unknown_are_counted_with_their_reason(
        start_daemon: Callable[..., Daemon]) -> None:
    """This process and one it starts send what no worker of theirs explains: each message
    is counted under messages_dropped_total by its reason, and each sender logged once."""
    daemon = start_daemon(sampling={"interval": "250ms"})
    me = os.getpid()
    sent = [messages.ChildDied(pid=me, child=me + 1, index=0, exitcode=-9),  # no such worker
            messages.ChildHello(pid=me, ppid=1, index=0, tasks=0, rss=1),  # 1 is not its parent
            messages.TaskBatch(pid=me, ppid=1, index=0, first=1, names=("t",),
                               ends=((0, 1, 2, 1, 0),))]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket_path))
        for message in sent * 4:
            sock.send(messages.encode(message))
    done = subprocess.run([sys.executable, "-c", SENDER, str(daemon.socket_path)], check=False,
                          cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    def counted() -> bool:
        return (daemon.metric("celery_memguard_messages_dropped_total", reason="unknown_worker")
                == 4 + 5
                and daemon.metric("celery_memguard_messages_dropped_total",
                                  reason="not_a_child") == 8)

    wait_for(counted, 10, daemon.get("/metrics"))
    logged = [(e["sender_pid"] == me, e["reason"], e["message"]) for e in daemon.events()
              if e.get("event") == "message_dropped"]
    assert logged == [(True, "unknown_worker", "child_died"),  # once per sender
                      (False, "unknown_worker", "worker_bye")]
    assert not [w for w in daemon.status()["workers"] if w["pid"] in (me, 1)]
