"""Every way a worker starts is supervised: the daemon knows it, and a child past its soft limit
is recycled with every task run exactly once."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from celery_memguard.daemon.procs import Procs
from celery_memguard.protocol import rules
from tests.builders import MiB
from tests.environments import setproctitle_path
from tests.support import Daemon, Worker, wait_for

pytestmark = pytest.mark.slow

CALLS = 60  # of 4 MiB each, against a soft limit some 55 MiB above a fresh child
LIMITS = {"limits": {"soft": "100MiB", "hard": "1GiB"},
          "sampling": {"interval": "250ms", "scan_interval": "250ms"}}
HOST = socket.gethostname()


def mine(daemon: Daemon, worker: Worker) -> dict[str, Any]:
    """This test's worker in the daemon's /status (the host runs other people's too)."""
    found = [w for w in daemon.status()["workers"] if w["pid"] == worker.pid]
    assert len(found) == 1, daemon.status()["workers"]
    return found[0]


def recycle_run(daemon: Daemon, worker: Worker, name: str, calls: int = CALLS) -> None:
    """Leak past the soft limit: every task runs once, children are recycled, and the daemon
    shows the worker under ``name`` with its full agent."""
    results = [worker.send("keep", 4) for _ in range(calls)]
    for result in results:
        result.get(timeout=60)
    runs = Counter(worker.runs())
    assert [runs[r.id] for r in results] == [1] * calls, worker.output()
    wait_for(lambda: daemon.metric("celery_memguard_recycles_total", worker=name) >= 1, 10,
             f"no recycle of {name}: {daemon.output()}")
    entry = mine(daemon, worker)
    assert entry["name"] == name
    assert entry["agent_state"] == "full", entry
    wait_for(lambda: len(mine(daemon, worker)["children"]) == worker.concurrency, 10,
             f"children of {name}: {mine(daemon, worker)}")


@pytest.mark.parametrize("mode", ["cli", "multi", "worker_main", "app_worker", "workcontroller",
                                  "start_worker"])
def test_a_child_past_its_soft_limit_is_recycled_whichever_way_the_worker_starts(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
        mode: str) -> None:
    """The CLI, celery multi (detached), worker_main, app.Worker().start(), and a worker
    embedded in another program's process (a WorkController of its own, or start_worker): an
    embedded one never sends worker_ready, and is announced by the agent's consumer step."""
    daemon = start_daemon(**LIMITS)
    worker = start_worker(socket_path=daemon.socket_path, mode=mode)
    recycle_run(daemon, worker, worker.name)


def test_setproctitle_titles_neither_hide_the_worker_nor_make_its_children_workers(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """With setproctitle, the main process is titled [celeryd: NODE:MainProcess] and the
    children [celeryd: NODE:ForkPoolWorker-N]: one worker, found by the scan and by its hello;
    an embedded worker's titled children are not taken for workers either."""
    daemon = start_daemon(**LIMITS)
    env = {"PYTHONPATH": setproctitle_path()}
    worker = start_worker(socket_path=daemon.socket_path, extra_env=env)
    embedded = start_worker(socket_path=daemon.socket_path, extra_env=env, mode="workcontroller")
    for one in (worker, embedded):
        kids = Procs().children(one.pid)
        titles = [Procs().cmdline(kid.pid) for kid in kids]
        assert all(t and t[0].startswith(f"[celeryd: {one.name}:ForkPoolWorker-") for t in titles), \
            titles
    assert Procs().cmdline(worker.pid)[0].startswith(f"[celeryd: {worker.name}:MainProcess]")
    recycle_run(daemon, worker, worker.name)
    recycle_run(daemon, embedded, embedded.name)
    names = {w["name"] for w in daemon.status()["workers"]}
    assert not any(name.startswith((f"{worker.name}#", f"{embedded.name}#")) for name in names)


@pytest.mark.parametrize(("pattern", "expanded"), [
    ("mg-{queue}@%h", "mg-{queue}@" + HOST),
    ("{queue}@%n", "{queue}@" + HOST.split(".")[0]),
])
def test_a_nodename_with_host_placeholders_is_shown_expanded(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
        pattern: str, expanded: str) -> None:
    daemon = start_daemon(**LIMITS)
    queue = f"qn{int(time.monotonic() * 1000)}"
    worker = start_worker(socket_path=daemon.socket_path, queue=queue,
                          name=pattern.format(queue=queue))
    recycle_run(daemon, worker, expanded.format(queue=queue))


def test_autoscale_grows_and_shrinks_under_the_daemons_eyes_and_both_sides_agree(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """--autoscale=4,1: the daemon follows the pool's current size (its share cap and grants),
    while every child, whenever it was forked, computes its jitter for the pool's maximum, as
    the daemon does; children past the soft limit are recycled, every task once."""
    daemon = start_daemon(**(LIMITS | {"recycle": {"jitter": "20%"}}))
    worker = start_worker(socket_path=daemon.socket_path, concurrency=1,
                          extra_args=("--autoscale=4,1",), extra_env={"AUTOSCALE_KEEPALIVE": "2"})
    slow = [worker.send("sleep_then_keep", 1.5, 1) for _ in range(8)]
    wait_for(lambda: mine(daemon, worker)["concurrency"] == 4, 20, "the pool never grew to 4")
    assert mine(daemon, worker)["max_concurrency"] == 4
    for result in slow:
        result.get(timeout=30)
    wait_for(lambda: mine(daemon, worker)["concurrency"] < 4, 30, "the pool never shrank")
    recycle_run(daemon, worker, worker.name, calls=40)
    status = daemon.status()
    soft, jitter, share = 100 * MiB, 0.2, 0.5
    assert status["limits"]["soft"] == soft
    answers = [worker.send("threshold") for _ in range(4)]
    procs = Procs()
    for pid, threshold in (r.get(timeout=20) for r in answers):
        stat = procs.stat(pid)
        assert stat is not None
        assert threshold == rules.child_threshold(soft, jitter, share, 4, pid, stat.start)
    assert sorted(Counter(worker.runs()).values())[-1] == 1


def test_children_started_by_spawn_are_supervised_and_agree_on_their_thresholds(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """--pool-start-method spawn (Celery 5.7): the children inherit no agent state, and take
    the pool size their jitter is computed for from the environment their parent set."""
    daemon = start_daemon(**(LIMITS | {"recycle": {"jitter": "20%"}}))
    worker = start_worker(socket_path=daemon.socket_path, concurrency=4,
                          extra_args=("--pool-start-method", "spawn"))
    recycle_run(daemon, worker, worker.name, calls=80)
    procs = Procs()
    for pid, threshold in (r.get(timeout=20) for r in [worker.send("threshold", 0.3)
                                                       for _ in range(8)]):
        stat = procs.stat(pid)
        assert stat is not None
        assert threshold == rules.child_threshold(100 * MiB, 0.2, 0.5, 4, pid, stat.start)
