"""What the daemon makes of its agents: workers known only from their children, missing hooks,
the pool size both sides compute the jitter for, and messages it cannot attach to a worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from celery_memguard.daemon.status import status_document
from celery_memguard.daemon.supervisor import HELLO_GRACE
from celery_memguard.protocol import hooks, messages, paths, room, rules
from tests.builders import KID0, KID1, MAIN, MiB, child_hello, dgram, hello, task_end
from tests.daemon.harness import make
from tests.fakes import FakeProcs


def named_hello(pid: int, node: str = "w@h", pool: int = 2,
                missing: tuple[str, ...] = ()) -> messages.ChildHello:
    """A fresh child's hello that names its worker (the main process said none)."""
    return child_hello(pid, rss_mib=40, node=node, jitter_pool=pool, missing=missing)


def info_line(sup: Any, worker: str = "w@h") -> str:
    [line] = [line for line in sup.metrics.render().decode().splitlines()
              if line.startswith('celery_memguard_worker_info{agent="') and worker in line]
    return line


def test_a_worker_whose_main_process_never_said_hello_is_named_by_its_children(
        procs: FakeProcs) -> None:
    """An embedded worker without the consumer step: its children's hellos name it, and it
    is shown and supervised, as degraded, instead of hidden."""
    sup = make(procs)
    sup.receive(dgram(named_hello(KID0)), 0.0)
    sup.receive(dgram(named_hello(KID1)), 0.0)
    sup.receive(dgram(task_end(KID0, 150)), 0.1)
    sup.tick(0.5)
    [worker] = status_document(sup.view)["workers"]
    assert (worker["name"], worker["pid"], len(worker["children"])) == ("w@h", MAIN, 2)
    assert procs.signals == [(KID0, 38)]  # over its soft limit: recycled all the same
    # While a worker starts its children may speak before its main process: no alarm yet.
    assert (worker["agent_state"], worker["missing_hooks"]) == ("full", [])
    sup.tick(HELLO_GRACE + 0.1)
    [worker] = status_document(sup.view)["workers"]
    assert (worker["agent_state"], worker["missing_hooks"]) == ("degraded", [hooks.HELLO])
    assert 'agent="true",agent_state="degraded"' in info_line(sup)


def test_a_worker_known_only_from_children_without_a_nodename_is_shown_under_its_pid(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    sup = make(procs)
    sup.receive(dgram(named_hello(KID0, node="")), 0.0)
    sup.tick(1.0)
    assert status_document(sup.view)["workers"] == []  # a hello may still come
    sup.tick(4.5)
    [worker] = status_document(sup.view)["workers"]
    assert worker["name"] == f"pid-{MAIN}"
    [event] = [e for e in logs if e["event"] == "worker_without_hello"]
    assert event["pid"] == MAIN
    sup.receive(dgram(hello()), 5.0)  # it speaks after all: its own name
    sup.tick(5.5)
    assert [w["name"] for w in status_document(sup.view)["workers"]] == ["w@h"]


@pytest.mark.parametrize(("worker_missing", "child_missing", "state", "recycled"), [
    ((), (), "full", True),
    ((hooks.PROCESS_DOWN,), (), "degraded", True),
    ((), (hooks.PREPARE_RESULT,), "degraded", True),  # ends from task_postrun: still leaves
    ((), (hooks.WAIT_FOR_JOB,), "degraded", False),  # no safe point to leave: not asked
    ((), (hooks.POOL_WORKER,), "degraded", False),
])
def test_missing_hooks_make_a_worker_degraded_and_hold_what_cannot_be_done_safely(
        procs: FakeProcs, worker_missing: tuple[str, ...], child_missing: tuple[str, ...],
        state: str, recycled: bool) -> None:
    sup = make(procs)
    sup.receive(dgram(hello(missing=worker_missing)), 0.0)
    sup.receive(dgram(named_hello(KID0, missing=child_missing)), 0.0)
    sup.receive(dgram(task_end(KID0, 150)), 0.1)
    sup.tick(0.5)
    assert status_document(sup.view)["workers"][0]["agent_state"] == state
    assert f'agent="true",agent_state="{state}"' in info_line(sup)
    text = sup.metrics.render().decode()
    for hook in (*worker_missing, *child_missing):
        assert f'celery_memguard_agent_hook_missing{{hook="{hook}",worker="w@h"}} 1.0' in text
    assert (procs.signals == [(KID0, 38)]) is recycled


def test_an_observe_only_worker_shows_agent_none(procs: FakeProcs) -> None:
    procs.table[MAIN].name = "w@h"  # found by the scan; its app has no agent
    sup = make(procs)
    sup.tick(0.0)
    assert 'agent="false",agent_state="none"' in info_line(sup)


def test_the_jitter_follows_the_autoscalers_maximum_on_the_daemons_side(procs: FakeProcs) -> None:
    """With --autoscale=4,1 shrunk to one child, the daemon computes that child's threshold for
    a pool of 4, as the child does: the figure does not move as the pool grows and shrinks."""
    sup = make(procs, recycle={"jitter": "20%"})
    sup.receive(dgram(hello(kids=((KID0, 0),), concurrency=1, max_concurrency=4)), 0.0)
    stat = procs.stat(KID0)
    assert stat is not None
    shared = rules.child_threshold(100 * MiB, 0.2, 0.5, 4, KID0, stat.start)
    assert shared < 100 * MiB  # two of four may recycle at once: the jitter applies
    just_under = shared - 1
    sup.receive(dgram(task_end(KID0, just_under / MiB)), 0.1)
    assert procs.signals == []
    sup.receive(dgram(task_end(KID0, (shared + MiB) / MiB, tasks=2)), 0.2)
    assert procs.signals == [(KID0, 38)]


@pytest.mark.parametrize(("message", "reason"), [
    (messages.WorkerBye(pid=77), "unknown_worker"),
    (messages.ChildDied(pid=77, child=78, index=0, exitcode=-9), "unknown_worker"),
    (messages.ChildHello(pid=77, ppid=MAIN, index=0, tasks=0, rss=1), "not_a_child"),
    (messages.ChildHello(pid=77, ppid=12345, index=0, tasks=0, rss=1), "not_a_child"),
    (messages.ChildHello(pid=79, ppid=80, index=0, tasks=0, rss=1), "gone"),  # its parent left
])
def test_a_message_no_worker_can_be_attached_to_is_counted_and_its_sender_logged_once(
        procs: FakeProcs, logs: list[dict[str, Any]], message: messages.Message,
        reason: str) -> None:
    procs.add(77, 1)  # a process that is no worker's child
    procs.add(79, 80)  # a child whose parent (80) is gone from the table
    sup = make(procs)
    for n in range(3):
        sup.receive(dgram(message), 0.1 * n)
    sup.tick(1.0)
    assert sup.state.dropped == {reason: 3}
    assert f'celery_memguard_messages_dropped_total{{reason="{reason}"}} 3.0' in \
        sup.metrics.render().decode()
    [event] = [e for e in logs if e["event"] == "message_dropped"]
    assert (event["reason"], event["sender_pid"], event["message"]) == \
        (reason, message.pid, message.EVENT)
    assert status_document(sup.view)["workers"] == []


def test_a_child_the_hello_does_not_list_as_a_pool_slot_is_not_shown(procs: FakeProcs) -> None:
    """Under spawn billiard starts a semaphore tracker beside the pool: the scan, before any
    hello, gave it a slot; the worker's hello, which lists the pool's slots, takes it back."""
    procs.table[MAIN].name = "w@h"
    procs.add(13, MAIN)  # the tracker
    sup = make(procs)
    sup.tick(0.0)
    assert len(status_document(sup.view)["workers"][0]["children"]) == 3
    sup.receive(dgram(hello()), 0.5)
    sup.tick(1.0)
    shown = status_document(sup.view)["workers"][0]["children"]
    assert sorted((c["pid"], c["index"]) for c in shown) == [(KID0, 0), (KID1, 1)]


def test_the_room_file_is_made_at_the_first_childs_hello(procs: FakeProcs) -> None:
    """A fresh worker's children can take tasks before its main process's hello: the room
    through which they share what their tasks need is made as soon as the first child speaks."""
    sup = make(procs)
    path = Path(paths.room_path(str(sup.config.agent.socket), MAIN))
    assert not path.exists()
    sup.receive(dgram(child_hello(KID0)), 0.0)
    assert room.read(str(path), (MAIN, MAIN * 10)) is not None
