"""The agent inside a real prefork worker: what it reports and how a child leaves."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_memguard.daemon import policy
from celery_memguard.daemon.config import Config
from celery_memguard.daemon.inbox import Inbox
from celery_memguard.daemon.procs import Procs
from celery_memguard.protocol import messages, paths, rules, settings
from celery_memguard.protocol.signals import RECYCLE_SIGNAL
from tests.support import Worker

pytestmark = pytest.mark.slow


@pytest.fixture
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    """The daemon's end of the socket, read by the test, and the settings a daemon publishes
    beside it (no limits): a child starts its watch thread once it has read them."""
    box = Inbox(tmp_path / "sock" / "agent.sock")
    box.open()
    Path(paths.settings_path(str(box.path))).write_bytes(
        settings.encode(settings.AgentSettings(hard=0, watch_interval=0.01)))
    yield box
    box.close()


def collect(box: Inbox, until: Callable[[list[messages.Message]], bool], timeout: float = 10.0,
            seen: list[messages.Message] | None = None) -> list[messages.Message]:
    got = seen if seen is not None else []
    deadline = time.monotonic() + timeout
    while not until(got):
        assert time.monotonic() < deadline, f"timed out; got {got}"
        for datagram in box.drain(100):
            got.append(messages.decode(datagram.data))
        time.sleep(0.01)
    return got


def test_agent_reports_worker_children_and_tasks(inbox: Inbox,
                                                 start_worker: Callable[..., Worker]) -> None:
    """Hellos name the pool slots; a task's end is reported with its RSS before and after."""
    worker = start_worker(socket_path=inbox.path, extra_args=("--max-tasks-per-child", "50"))
    got = collect(inbox, lambda m: any(isinstance(x, messages.WorkerHello) for x in m))
    hello = next(m for m in got if isinstance(m, messages.WorkerHello))
    assert hello.pid == worker.pid
    assert hello.node == worker.name
    assert hello.pool == "prefork"
    assert hello.concurrency == 2
    assert hello.max_tasks == 50
    assert sorted(index for _, index in hello.kids) == [0, 1]
    assert {pid for pid, _ in hello.kids} == {c.pid for c in Procs().children(worker.pid)}

    result = worker.send("keep", 8)
    child_pid = result.get(timeout=20)
    got = collect(inbox, lambda m: any(isinstance(x, messages.TaskBatch) for x in m), seen=got)
    batch = next(m for m in got if isinstance(m, messages.TaskBatch))
    assert batch.pid == child_pid
    assert batch.first == 1
    assert batch.names == ("tests.apps.leaky.keep",)
    [(name, before, after, ok, age)] = batch.ends
    assert (name, ok) == (0, 1)
    assert after - before >= 8 * 1024 * 1024  # the 8 MiB it kept
    assert 0 <= age <= 1000
    assert not any(isinstance(m, messages.TaskRunning) for m in got)  # too short to announce


def test_a_long_task_is_announced_while_it_runs_and_short_ones_are_batched(
        inbox: Inbox, start_worker: Callable[..., Worker]) -> None:
    """One message per batch of short tasks; a task still running after a moment is named."""
    worker = start_worker(socket_path=inbox.path, concurrency=1)
    assert all(r.get(timeout=20) for r in [worker.send("noop") for _ in range(30)])
    slow = worker.send("sleep_then_keep", 0.5, 1)
    got = collect(inbox, lambda m: any(isinstance(x, messages.TaskRunning) for x in m))
    running = next(m for m in got if isinstance(m, messages.TaskRunning))
    assert (running.task, running.id, running.tasks) == (
        "tests.apps.leaky.sleep_then_keep", slow.id, 30)
    assert slow.get(timeout=20)
    got = collect(inbox, lambda m: sum(len(x.ends) for x in m
                                            if isinstance(x, messages.TaskBatch)) == 31,
                       seen=got)
    batches = [m for m in got if isinstance(m, messages.TaskBatch)]
    assert [b.first for b in batches] == sorted(b.first for b in batches)
    assert batches[-1].names == ("tests.apps.leaky.sleep_then_keep",)
    assert len(batches) < 30 / 2  # batched, not one message per task
    kinds = [type(m).__name__ for m in got if isinstance(m, messages.TaskBatch | messages.TaskRunning)]
    assert kinds[-2:] == ["TaskRunning", "TaskBatch"]  # the announcement came before its end


def test_one_job_is_one_task_whatever_it_runs_inside_and_failures_are_marked(
        inbox: Inbox, start_worker: Callable[..., Worker]) -> None:
    """A task that runs another in-process with apply() is reported once, under its own
    name, with what it kept; a task that raises is reported as failed."""
    worker = start_worker(socket_path=inbox.path, concurrency=1)
    nested = worker.send("nested", 8)
    assert nested.get(timeout=20)
    failed = worker.send("boom")
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=20)
    got = collect(inbox, lambda m: sum(len(x.ends) for x in m
                                            if isinstance(x, messages.TaskBatch)) >= 2)
    ends = [(batch.names[slot], before, after, ok)
            for batch in got if isinstance(batch, messages.TaskBatch)
            for slot, before, after, ok, _age in batch.ends]
    assert [(name, ok) for name, *_, ok in ends] == [
        ("tests.apps.leaky.nested", 1), ("tests.apps.leaky.boom", 0)]
    _, before, after, _ = ends[0]
    assert after - before >= 8 * 1024 * 1024
    time.sleep(0.5)  # nothing more comes: no second end for the task run inside
    assert sum(len(m.ends) for m in [messages.decode(d.data) for d in inbox.drain(100)]
               if isinstance(m, messages.TaskBatch)) == 0


def test_an_idle_child_asked_to_recycle_leaves_at_once_and_its_slot_is_refilled(
        inbox: Inbox, start_worker: Callable[..., Worker]) -> None:
    """Celery's children block reading the next job; the handler leaves from there, losing nothing."""
    worker = start_worker(socket_path=inbox.path)
    got = collect(inbox, lambda m: sum(isinstance(x, messages.ChildHello) for x in m) >= 2)
    first = next(m for m in got if isinstance(m, messages.ChildHello))
    asked = time.monotonic()
    os.kill(first.pid, RECYCLE_SIGNAL)
    got = collect(inbox, lambda m: any(isinstance(x, messages.ChildExit) for x in m), seen=got)
    left_after = time.monotonic() - asked
    assert left_after < 1.0
    exit_message = next(m for m in got if isinstance(m, messages.ChildExit))
    assert (exit_message.pid, exit_message.index, exit_message.reason) == (
        first.pid, first.index, "requested")
    got = collect(inbox, lambda m: any(isinstance(x, messages.ChildHello) and x.pid != first.pid
                                            and x.index == first.index for x in m),
                       seen=got)
    deadline = time.monotonic() + 10
    while Procs().stat(first.pid) is not None:
        assert time.monotonic() < deadline, "the recycled child never exited"
        time.sleep(0.05)
    results = [worker.send("noop") for _ in range(20)]
    assert all(r.get(timeout=20) for r in results)
    assert len(worker.runs()) == 20


def test_a_busy_child_finishes_its_task_before_leaving(inbox: Inbox,
                                                      start_worker: Callable[..., Worker]) -> None:
    """The request arrives mid-task; the task still succeeds, then the child leaves."""
    worker = start_worker(socket_path=inbox.path, concurrency=1)
    result = worker.send("sleep_then_keep", 1.0, 1)
    got = collect(inbox, lambda m: any(isinstance(x, messages.TaskRunning) for x in m))
    busy = next(m for m in got if isinstance(m, messages.TaskRunning)).pid
    os.kill(busy, RECYCLE_SIGNAL)
    assert result.get(timeout=20) == busy
    got = collect(inbox, lambda m: any(isinstance(x, messages.TaskBatch) and x.pid == busy
                                            for x in m), seen=got)
    [exit_message] = [m for m in got if isinstance(m, messages.ChildExit)]
    [batch] = [m for m in got if isinstance(m, messages.TaskBatch) and m.pid == busy]
    assert (exit_message.pid, exit_message.tasks, exit_message.reason) == (busy, 1, "requested")
    assert (batch.first, len(batch.ends)) == (1, 1)  # the task it finished before leaving
    assert worker.send("noop").get(timeout=20) != busy


def test_no_daemon_listening_changes_nothing(tmp_path: Path, start_worker: Callable[..., Worker]) -> None:
    """Without a daemon the sends fail silently and every task runs as usual."""
    worker = start_worker(socket_path=tmp_path / "nobody" / "here.sock")
    results = [worker.send("keep", 1) for _ in range(20)]
    assert all(r.get(timeout=20) for r in results)
    assert "Traceback" not in worker.output()
    assert len(worker.runs()) == len(set(worker.runs())) == 20


def test_a_child_that_left_is_replaced_at_once(tmp_path: Path,
                                               start_worker: Callable[..., Worker]) -> None:
    """One child recycled every 4 tasks by --max-tasks-per-child: each exit leaves the pool
    empty until the replacement, and none waits for Celery's 5 s maintain_pool timer. (The
    same worker without the agent: a longest gap of 5.03 s, celery/celery#9588.)"""
    worker = start_worker(socket_path=tmp_path / "nobody" / "here.sock", concurrency=1,
                          extra_args=("--max-tasks-per-child", "4"))
    results = [worker.send("noop") for _ in range(60)]
    pids = [r.get(timeout=120) for r in results]
    assert len(set(pids)) == 15
    done = sorted(r.date_done for r in results)
    longest = max((b - a).total_seconds() for a, b in itertools.pairwise(done))
    assert longest < 1.0, f"a replacement waited {longest:.2f} s"


@pytest.mark.parametrize("concurrency", [2, 4])
def test_children_take_the_jitter_only_where_two_may_recycle_at_once(
        concurrency: int, inbox: Inbox, start_worker: Callable[..., Worker]) -> None:
    """With the default share (half the pool), a pool of 2 recycles one child at a time: its
    children keep the soft limit itself. A pool of 4 may recycle two at once: each child is
    lowered by its own share of the jitter. Either way each child's figure is the one the
    daemon computes from the worker's hello (policy.soft_threshold)."""
    config = Config.model_validate({"limits": {"soft": "150MiB", "hard": "1GiB"},
                                    "recycle": {"jitter": "20%"}})
    soft = config.limits.soft
    Path(paths.settings_path(str(inbox.path))).write_bytes(settings.encode(settings.AgentSettings(
        hard=config.limits.hard, watch_interval=0.01, soft=soft, jitter=config.recycle.jitter,
        max_share=config.recycle.max_share)))
    worker = start_worker(socket_path=inbox.path, concurrency=concurrency)
    got = collect(inbox, lambda m: any(isinstance(x, messages.WorkerHello) for x in m))
    hello = next(m for m in got if isinstance(m, messages.WorkerHello))
    assert hello.concurrency == concurrency

    results = [worker.send("threshold", 0.4) for _ in range(3 * concurrency)]
    thresholds = dict(r.get(timeout=30) for r in results)
    assert len(thresholds) == concurrency  # every child answered
    procs = Procs()
    for pid, threshold in thresholds.items():
        stat = procs.stat(pid)
        assert stat is not None
        daemon_side = policy.threshold_of(config.limits, config.recycle, stat.proc,
                                            hello.concurrency)
        assert threshold == daemon_side
        if concurrency == 2:
            assert threshold == soft
        else:
            assert threshold == rules.jittered(soft, 0.2, pid, stat.proc.start)
    if concurrency == 4:
        assert len(set(thresholds.values())) == 4  # spread: no two children in lock-step


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_is_the_users_choice_and_reaches_every_child(
        inbox: Inbox, start_worker: Callable[..., Worker], freeze: bool) -> None:
    """install(app, freeze=True) freezes the main process's objects before the first fork:
    the children's collector skips them. Without it nothing is frozen."""
    worker = start_worker(socket_path=inbox.path,
                          extra_env={"MEMGUARD_TEST_FREEZE": "1" if freeze else "0"})
    counts = {worker.send("frozen").get(timeout=20) for _ in range(4)}
    if freeze:
        assert min(counts) > 10_000  # Celery, kombu, the app: everything loaded by then
    else:
        assert counts == {0}
