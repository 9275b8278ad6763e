"""Agent reports folded into the supervisor: acted on at once, checked, counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from celery_memguard.daemon.inbox import Datagram
from celery_memguard.daemon.supervisor import Supervisor
from celery_memguard.protocol import messages, paths, quarantine
from tests.builders import KID0, KID1, MAIN, MiB, batch, child_hello, dgram, hello, task_end
from tests.daemon.harness import make
from tests.fakes import Clock, FakeProcs


def test_a_task_end_over_the_limit_is_acted_on_at_once(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """No tick is needed: the report that crosses the limit triggers the request."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(task_end(KID0, 99)), 0.0)
    assert procs.signals == []
    sup.receive(dgram(task_end(KID0, 101, tasks=2)), 0.1)
    assert procs.signals == [(KID0, 38)]
    assert sup.state.recycles[("w@h", "soft")] == 1
    [event] = [e for e in logs if e["event"] == "recycle_requested"]
    assert event | {"worker": "w@h", "index": 0, "pid": KID0, "reason": "soft",
                    "measured_bytes": 101 * MiB, "threshold_bytes": 100 * MiB} == event
    assert b'celery_memguard_recycles_total{reason="soft",worker="w@h"} 1.0' in sup.metrics.render()


def test_the_same_child_is_asked_only_once(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    for n in range(1, 5):
        sup.receive(dgram(task_end(KID0, 100 + n, tasks=n)), 0.1 * n)
    sup.tick(1.0)
    assert procs.signals == [(KID0, 38)]


def test_a_datagram_claiming_another_pid_is_dropped_as_forged(procs: FakeProcs) -> None:
    """The kernel's sender pid must match the message: one process cannot steer another."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(task_end(KID0, 150), sender=KID1), 0.0)
    sup.receive(dgram(hello(), sender=KID1), 0.0)
    assert procs.signals == []
    assert sup.state.dropped["forged_sender"] == 2


def test_a_message_from_a_process_that_is_not_the_named_child_is_dropped(procs: FakeProcs) -> None:
    procs.add(99, 1)  # an unrelated process, not a child of MAIN
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(messages.TaskEnd(pid=99, ppid=MAIN, index=5, task="t", id="i", rss_before=0,
                                      rss=500 * MiB, tasks=1, ok=True)), 0.0)
    sup.tick(0.5)
    assert procs.signals == []
    assert sup.state.dropped["not_a_child"] == 1


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"), (b"{", "not_json"), (b'{"v":1,"t":"z"}', "unknown_type"),
    (b'{"v":9}', "bad_version"),
])
def test_malformed_datagrams_are_counted_and_change_nothing(procs: FakeProcs, data: bytes,
                                                          reason: str) -> None:
    sup = make(procs)
    sup.receive(Datagram(data=data, pid=KID0, uid=0, truncated=False), 0.0)
    sup.tick(0.0)
    assert sup.state.dropped[reason] == 1
    assert f'celery_memguard_messages_dropped_total{{reason="{reason}"}} 1.0'.encode() in \
        sup.metrics.render()


def test_a_truncated_datagram_is_counted_as_oversized(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(Datagram(data=b"{}", pid=KID0, uid=0, truncated=True), 0.0)
    assert sup.state.dropped["oversized"] == 1


def test_worker_bye_forgets_the_worker(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(messages.WorkerBye(pid=MAIN)), 0.1)
    assert sup.state.workers == {}


def test_an_interrupted_task_is_counted_by_name_and_logged_with_its_id(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(messages.TaskInterrupted(pid=KID0, ppid=MAIN, index=0, task="app.big",
                                              id="t-1", rss=210 * MiB, limit=200 * MiB)), 0.0)
    sup.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=1, reason="hard")), 0.1)
    sup.tick(0.2)
    text = sup.metrics.render().decode()
    assert 'celery_memguard_interrupted_tasks_total{reason="hard",task="app.big",worker="w@h"} 1.0' in text
    assert 'celery_memguard_recycles_total{reason="hard",worker="w@h"} 1.0' in text
    [event] = [e for e in logs if e["event"] == "task_interrupted"]
    assert (event["task_id"], event["rss_bytes"], event["limit_bytes"]) == ("t-1", 210 * MiB, 200 * MiB)


def test_task_names_beyond_the_bound_are_counted_as_other(procs: FakeProcs) -> None:
    sup = make(procs, metrics={"max_task_names": 2})
    sup.receive(dgram(hello()), 0.0)
    for n in range(4):
        sup.receive(dgram(messages.TaskInterrupted(pid=KID0, ppid=MAIN, index=0, task=f"app.t{n}",
                                                  id=str(n), rss=1, limit=1)), 0.0)
    assert {task for _, task, _ in sup.state.interrupted} == {"app.t0", "app.t1", "other"}


def test_a_sigkill_the_kernel_counted_is_an_oom_kill_of_the_task_it_ran(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """The worker's hello gives the container's OOM counter; the child's death moved it by
    one: an OOM kill, counted with the task, whose name the pool's record of the job gives."""
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=3)), 0.0)
    sup.receive(dgram(messages.TaskStart(pid=KID0, ppid=MAIN, index=0, task="app.huge", id="x-9",
                                        rss=900 * MiB)), 0.0)
    assert sup.state.interrupted == {}
    del procs.table[KID0]
    sup.tick(1.0)  # the child is gone from /proc before its parent reports the exit code
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9,
                                         task="app.huge", id="x-9", oom_kills=4)), 1.1)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID1, index=1, exitcode=155)), 1.2)
    assert sup.state.oom_kills == {("w@h", "app.huge"): 1}
    assert sup.state.interrupted == {("w@h", "app.huge", "oom"): 1}
    [event] = [e for e in logs if e["event"] == "child_oom_killed"]
    assert (event["task"], event["task_id"], event["pid"]) == ("app.huge", "x-9", KID0)
    sup.tick(2.0)  # the next view shows it
    assert b'celery_memguard_oom_kills_total{task="app.huge",worker="w@h"} 1.0' in \
        sup.metrics.render()


def test_a_sigkill_the_kernel_did_not_count_is_a_kill_by_someone_else(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=3)), 0.0)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9,
                                         task="app.t", id="t-1", oom_kills=3)), 1.0)
    assert sup.state.oom_kills == {}
    assert sup.state.interrupted == {("w@h", "app.t", "killed"): 1}
    [event] = [e for e in logs if e["event"] == "child_killed"]
    assert (event["cause"], event["task_id"]) == ("killed", "t-1")


def test_two_children_killed_by_two_oom_kills_are_each_counted_once(procs: FakeProcs) -> None:
    """The counter moved by two before either death arrived (read on the worker's hello)."""
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=0)), 0.0)
    sup.receive(dgram(hello(oom_kills=2)), 0.5)
    for n, kid in enumerate((KID0, KID1)):
        sup.receive(dgram(messages.ChildDied(pid=MAIN, child=kid, index=n, exitcode=-9,
                                             task="app.t", id=f"t-{n}", oom_kills=2)), 1.0)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=13, index=0, exitcode=-9, task="app.t",
                                         id="t-3", oom_kills=2)), 1.5)
    assert sup.state.oom_kills == {("w@h", "app.t"): 2}
    assert sup.state.interrupted[("w@h", "app.t", "killed")] == 1


def test_an_oom_kill_no_child_claims_is_not_lent_to_a_later_sigkill(procs: FakeProcs) -> None:
    """Another process of the container (a task's own subprocess) was OOM-killed: no child
    died. A child killed by hand long after is not an OOM kill."""
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=5)), 0.0)
    sup.receive(dgram(hello(oom_kills=6)), 2.0)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9,
                                         oom_kills=6)), 30.0)
    assert sup.state.oom_kills == {}


def test_without_any_oom_counter_a_sigkill_is_reported_as_such(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """An agent that cannot read its container's counter (and a daemon that cannot either):
    neither an OOM kill nor a kill is claimed."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9,
                                         task="app.t", id="t-1")), 1.0)
    assert sup.state.oom_kills == {}
    assert sup.state.interrupted == {("w@h", "app.t", "sigkill"): 1}
    assert [e["cause"] for e in logs if e["event"] == "child_killed"] == ["sigkill"]


def test_our_own_sigkill_is_not_counted_as_an_oom_kill(procs: FakeProcs) -> None:
    clock = Clock(0.0)
    sup = make(procs, clock=clock, limits={"kill_after": "1s"}, sampling={"interval": "1s"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(child_hello(KID0)), 0.0)
    procs.table[KID0].rss = 250 * MiB
    for _ in range(4):
        sup.tick(clock())
        clock.advance(1.0)
    assert [sig for pid, sig in procs.signals if pid == KID0] == [15, 9]  # TERM, KILL, no grace
    assert sup.state.recycles[("w@h", "kill")] == 1
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9)), clock())
    assert sup.state.oom_kills == {}


def test_a_batch_of_task_ends_is_folded_in_task_order(procs: FakeProcs) -> None:
    """Each end counts: the task count, the growth by name, the leak history at its own time."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(batch(KID0, 1, ("app.a", 50, 52, 300), ("app.b", 52, 52, 200),
                               ("app.a", 52, 54, 0))), 10.0)
    child = sup.state.workers[MAIN].children[KID0]
    assert (child.tasks, child.rss, child.reported_end) == (3, 54 * MiB, True)
    assert list(child.growth) == [2 * MiB, 0, 2 * MiB]
    assert (sup.state.growth["app.a"].count, sup.state.growth["app.b"].count) == (2, 1)
    assert child.history.last_at == 10.0
    assert len(child.history) == 3
    assert sup.state.messages["task_batch"] == 1


def test_ages_that_would_put_a_batch_before_the_last_one_keep_the_history_in_order(
        procs: FakeProcs) -> None:
    """Two batches read at different delays: the history never goes back in time."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(batch(KID0, 1, ("app.a", 50, 52, 0))), 10.0)
    sup.receive(dgram(batch(KID0, 2, ("app.a", 52, 54, 500))), 10.2)
    child = sup.state.workers[MAIN].children[KID0]
    assert len(child.history) == 2
    assert child.history.last_at == 10.0


def test_a_running_task_is_shown_until_a_batch_ends_it_and_a_late_announcement_is_stale(
        procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    running = messages.TaskRunning(pid=KID0, ppid=MAIN, index=0, task="app.slow", id="t6",
                               rss=60 * MiB, tasks=5)
    sup.receive(dgram(running), 1.0)
    assert sup.state.workers[MAIN].children[KID0].task == "app.slow"
    sup.receive(dgram(batch(KID0, 6, ("app.slow", 60, 61, 0))), 2.0)
    assert sup.state.workers[MAIN].children[KID0].task is None
    sup.receive(dgram(running), 2.1)  # its task ended already: the announcement came late
    assert sup.state.workers[MAIN].children[KID0].task is None


def test_an_interrupted_task_is_the_running_one_though_it_was_never_announced(
        procs: FakeProcs) -> None:
    """A task stopped at the hard limit before its announcement: a kill escalation that follows
    is counted against it, and its end (task 6) clears it."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(batch(KID0, 1, *[("app.a", 50, 50, 0)] * 5)), 0.5)
    sup.receive(dgram(messages.TaskInterrupted(pid=KID0, ppid=MAIN, index=0, task="app.huge",
                                               id="t6", rss=300 * MiB, limit=200 * MiB)), 1.0)
    assert sup.state.task_killed("w@h", KID0) == ("app.huge", "t6")
    assert sup.state.interrupted[("w@h", "app.huge", "kill")] == 1
    sup.receive(dgram(batch(KID0, 6, ("app.huge", 50, 60, 0))), 2.0)
    assert sup.state.workers[MAIN].children[KID0].task is None


def test_a_batch_that_ends_over_the_limit_is_acted_on_at_once(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(batch(KID0, 1, ("app.a", 98, 99, 20), ("app.a", 99, 101, 0))), 0.1)
    assert procs.signals == [(KID0, 38)]


def _oom(sup: Supervisor, kid: int, task_id: str, counter: int, at: float) -> None:
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=kid, index=kid - KID0, exitcode=-9,
                                         task="app.huge", id=task_id, oom_kills=counter)), at)


def test_a_task_id_running_at_two_oom_kills_is_quarantined_for_the_children(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Its file beside the socket lists it (with why); a restarted daemon reads it back."""
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=0)), 0.0)
    _oom(sup, KID0, "t-1", 1, 1.0)
    _oom(sup, KID1, "other", 2, 2.0)
    assert sup.state.quarantined == {}
    _oom(sup, KID0, "t-1", 3, 30.0)
    assert list(sup.state.quarantined) == ["t-1"]
    path = Path(paths.quarantine_path(str(sup.config.agent.socket)))
    decoded = quarantine.decode(path.read_bytes())
    assert decoded is not None
    entries, after = decoded
    assert (after, entries["t-1"].task, entries["t-1"].oom_kills) == (2, "app.huge", 2)
    assert [e["task_id"] for e in logs if e["event"] == "task_quarantined"] == ["t-1"]
    assert make(procs).publisher.load_quarantine().keys() == {"t-1"}


def test_hard_interrupts_count_towards_the_quarantine_and_refusals_are_counted(
        procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    for n in range(2):
        sup.receive(dgram(messages.TaskInterrupted(
            pid=KID0, ppid=MAIN, index=0, task="app.runaway", id="r-1", rss=300 * MiB,
            limit=200 * MiB)), float(n))
    assert set(sup.state.quarantined) == {"r-1"}
    sup.receive(dgram(messages.TaskInterrupted(
        pid=KID1, ppid=MAIN, index=1, task="app.runaway", id="r-1", rss=50 * MiB, limit=0,
        reason="quarantined")), 3.0)
    assert sup.state.interrupted == {("w@h", "app.runaway", "hard"): 2,
                                     ("w@h", "app.runaway", "quarantined"): 1}


def test_quarantine_after_0_turns_it_off(procs: FakeProcs) -> None:
    sup = make(procs, quarantine={"after": 0})
    sup.receive(dgram(hello(oom_kills=0)), 0.0)
    for n in range(5):
        _oom(sup, KID0, "t-1", n + 1, float(n))
    assert sup.state.quarantined == {}
