"""Leak forensics in the daemon, over the scripted process table: what it asks of which
child, what it makes of the reports, what it keeps and shows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from celery_memguard.daemon.status import status_document
from celery_memguard.daemon.supervisor import Supervisor
from celery_memguard.protocol import forensics, messages, paths
from celery_memguard.protocol.signals import TRACE_SIGNAL
from tests.builders import KID0, KID1, MAIN, MiB, batch, child_hello, dgram, hello
from tests.daemon.harness import make
from tests.fakes import Clock, FakeProcs

HELPER = ("app/helpers.py", 12, "")


def _leaking(sup: Supervisor, pid: int = KID0, task: str = "app.leak", n: int = 6,
             first: int = 1, now: float = 0.0) -> None:
    """``n`` calls of ``task`` in child ``pid``, each leaving 1 MiB."""
    ends = tuple((task, 50 + i, 51 + i, 0) for i in range(n))
    sup.receive(dgram(batch(pid, first, *ends)), now)


WALL = time.time()  # the wall clock when the test clock reads 0

def _ready(procs: FakeProcs, clock: Clock, **sections: Any) -> Supervisor:
    """A daemon with a worker and its two children; its results are dated by the test's
    clock (three results within one real millisecond would have no order)."""
    sup = make(procs, clock, **sections)
    sup.forensics.wall = lambda: WALL + clock()
    sup.receive(dgram(hello()), clock())
    for pid in (KID0, KID1):
        sup.receive(dgram(child_hello(pid)), clock())
    return sup


def _request(sup: Supervisor) -> forensics.Request | None:
    path = Path(paths.trace_path(str(sup.config.agent.socket), MAIN))
    if not path.exists():
        return None
    return forensics.decode(path.read_bytes(), (MAIN, MAIN * 10))

def _tracing(procs: FakeProcs, clock: Clock,
             **sections: Any) -> tuple[Supervisor, forensics.Request]:
    """A daemon whose first tick asked child KID0 to trace app.leak, which leaked 6 calls."""
    sup = _ready(procs, clock, **sections)
    _leaking(sup)
    sup.tick(clock())
    request = _request(sup)
    assert request is not None
    return sup, request


def _report(sup: Supervisor, request: forensics.Request, calls: int, done: bool,
            pid: int = KID0, size: int = MiB, reason: str = "done", now: float = 0.0) -> None:
    """What the child sends after a traced call: its site, then its figures."""
    sup.receive(dgram(messages.LeakSite(
        pid=pid, ppid=MAIN, index=pid - KID0, trace=request.id, rank=0, filename=HELPER[0],
        lineno=HELPER[1], function="", code="_store.append(b)", frames=(HELPER,),
        size=calls * size, blocks=calls, grew=calls)), now)
    sup.receive(dgram(messages.LeakTrace(
        pid=pid, ppid=MAIN, index=pid - KID0, trace=request.id, task=request.task,
        tool="tracemalloc", calls=calls, wanted=request.calls, rss_growth=calls * size,
        traced_growth=calls * size, sites=1, tracer_bytes=4096, done=done,
        reason=reason if done else "tracing")), now)


def _traces(sup: Supervisor) -> list[dict[str, Any]]:
    return list(status_document(sup.view)["forensics"]["traces"])


def test_a_leaking_task_is_traced_in_the_child_that_ran_it(procs: FakeProcs) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    assert (request.task, request.child, request.calls, request.frames, request.tool) == (
        "app.leak", (KID0, KID0 * 10), 20, 10, "tracemalloc")
    assert procs.signals == [(KID0, TRACE_SIGNAL)]
    [trace] = _traces(sup)
    assert (trace["state"], trace["task"], trace["index"], trace["on_demand"]) == (
        "tracing", "app.leak", 0, False)


def test_a_task_that_does_not_leak_is_not_traced(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock)
    sup.receive(dgram(batch(KID0, 1, *(("app.flat", 50, 50, 0),) * 10)), clock())
    sup.tick(clock())
    assert _request(sup) is None
    assert procs.signals == []


def test_the_final_report_becomes_a_result_logged_kept_and_shown(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=3, done=False)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["calls"]) == ("tracing", 3)
    [under_way] = [t for t in status_document(sup.view)["tasks"] if t["task"] == "app.leak"]
    assert (under_way["trace"]["reason"], under_way["sites"][0]["lineno"]) == ("tracing", 12)
    assert status_document(sup.view)["leak_sites"] == [], "no result yet"
    _report(sup, request, calls=20, done=True)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert trace["state"] == "done"
    document = status_document(sup.view)
    [task] = [t for t in document["tasks"] if t["task"] == "app.leak"]
    [site] = task["sites"]
    assert (site["filename"], site["lineno"], site["bytes_per_call"], site["share"]) == (
        "app/helpers.py", 12, MiB, 1.0)
    assert task["untraced_share"] == 0.0
    assert document["leak_sites"][0]["task"] == "app.leak"
    [event] = [e for e in logs if e["event"] == "leak_sites"]
    assert (event["task"], event["calls"], event["complete"]) == ("app.leak", 20, True)
    assert event["sites"] == [{"site": "app/helpers.py:12", "code": "_store.append(b)",
                               "bytes_per_call": MiB, "share": 1.0}]
    [kept] = sup.config.forensics_dir.glob("*.json")
    assert json.loads(kept.read_text())["sites"][0]["lineno"] == 12
    assert event["file"] == str(kept)
    assert _request(sup) is None, "the request is withdrawn"


def test_one_trace_per_task_name_per_cooldown(procs: FakeProcs) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock, forensics={"cooldown": "1h"})
    _report(sup, request, calls=20, done=True)
    _leaking(sup, first=7)
    clock.advance(1800)
    sup.tick(clock())
    assert _request(sup) is None
    clock.advance(1801)
    sup.tick(clock())
    again = _request(sup)
    assert again is not None
    assert again.id != request.id


def test_one_tracing_child_per_worker_at_a_time(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock)
    _leaking(sup, KID0, "app.a")
    _leaking(sup, KID1, "app.b")
    sup.tick(clock())
    first = _request(sup)
    assert first is not None
    assert len(procs.signals) == 1
    assert [t["state"] for t in _traces(sup)] == ["tracing"]
    _report(sup, first, calls=20, done=True, pid=first.child[0])
    sup.tick(clock())
    second = _request(sup)
    assert second is not None
    assert {first.task, second.task} == {"app.a", "app.b"}


def test_a_child_killed_mid_trace_leaves_its_last_report_as_the_result(procs: FakeProcs) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=7, done=False)
    del procs.table[KID0]
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["result"]["calls"], trace["result"]["reason"]) == (
        "done", 7, "child gone")
    assert trace["result"]["complete"] is False


def test_a_child_gone_before_its_first_traced_call_is_replaced(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock)
    _leaking(sup, KID0)
    _leaking(sup, KID1)
    procs.table[KID1].rss = 40 * MiB  # the lighter child is asked first
    sup.tick(clock())
    first = _request(sup)
    assert first is not None
    assert first.child[0] == KID1
    del procs.table[KID1]
    sup.tick(clock())
    second = _request(sup)
    assert second is not None
    assert (second.id, second.child[0]) == (first.id, KID0)


def test_a_leaving_childs_report_is_the_result(procs: FakeProcs) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=4, done=True, reason="leaving")
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["result"]["reason"], trace["result"]["complete"]) == (
        "done", "leaving", False)


def test_a_child_that_runs_no_traced_call_in_time_fails_the_trace(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock, forensics={"timeout": "60s"})
    _leaking(sup)
    sup.tick(clock())
    clock.advance(60 + 31)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert trace["state"] == "failed"
    assert trace["reason"] == "the chosen child (w@h, index 0) ran no call of app.leak in time"
    assert _request(sup) is None


def _ask(sup: Supervisor, task: str = "app.report", worker: str | None = None,
         calls: int | None = 5, timeout_ms: int = 30000, rid: str = "cli-1") -> None:
    """What ``celery-memguard trace`` sends, from its own process (pid 4242)."""
    sup.receive(dgram(messages.TraceRequest(pid=4242, id=rid, task=task, calls=calls,
                                            worker=worker, timeout_ms=timeout_ms)), sup.clock())


def test_a_trace_asked_for_goes_to_any_child_when_none_ran_the_task(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock)
    _ask(sup)
    sup.tick(clock())
    request = _request(sup)
    assert request is not None
    assert (request.id, request.task, request.calls) == ("cli-1", "app.report", 5)
    [trace] = _traces(sup)
    assert (trace["on_demand"], trace["state"]) == (True, "tracing")


def test_a_trace_asked_for_in_no_worker_fails_with_the_reason(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock)
    _ask(sup, worker="nobody@*", timeout_ms=5000)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["reason"]) == ("waiting", "no worker named nobody@* is supervised")
    clock.advance(6)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["reason"]) == ("failed", "no worker named nobody@* is supervised")


def test_with_forensics_off_nothing_is_traced_and_a_request_says_why(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock, forensics={"enabled": False})
    _leaking(sup)
    _ask(sup)
    sup.tick(clock())
    assert procs.signals == []
    [trace] = _traces(sup)
    assert (trace["state"], trace["reason"]) == (
        "failed", "forensics.enabled is false in the daemon's config")


def test_without_auto_only_asked_traces_run(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock, forensics={"auto": False})
    _leaking(sup)
    sup.tick(clock())
    assert procs.signals == []
    _ask(sup, task="app.leak")
    sup.tick(clock())
    assert procs.signals == [(KID0, TRACE_SIGNAL)]


def test_the_newest_results_per_task_are_kept_and_read_back_after_a_restart(
        procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock, forensics={"keep": 2, "cooldown": "10s"})
    ids = []
    for round_ in range(3):
        _leaking(sup, first=1 + 6 * round_)
        sup.tick(clock())
        request = _request(sup)
        assert request is not None
        ids.append(request.id)
        _report(sup, request, calls=20, done=True)
        clock.advance(11)
    kept = sorted(sup.config.forensics_dir.glob("*.json"))
    assert [json.loads(p.read_text())["id"] for p in kept] == ids[1:]

    restarted = _ready(procs, clock, forensics={"keep": 2, "cooldown": "1h"})
    _leaking(restarted)
    restarted.tick(clock())
    assert [d["id"] for d in restarted.view.leak_sites] == [ids[2]]
    assert _request(restarted) is None, "traced 11 s ago by the previous daemon: cooling down"


def test_the_last_report_of_a_previous_daemons_trace_is_taken(procs: FakeProcs) -> None:
    clock = Clock()
    sup = _ready(procs, clock, forensics={"auto": False})
    sup.tick(clock())
    earlier = forensics.Request(id="before-restart", task="app.leak", child=(KID0, KID0 * 10),
                                calls=20, frames=10, tool="tracemalloc", until=0.0)
    _report(sup, earlier, calls=20, done=True)
    sup.tick(clock())
    assert [d["id"] for d in sup.view.leak_sites] == ["before-restart"]


def test_a_report_from_a_child_the_trace_no_longer_counts_on_is_ignored(procs: FakeProcs) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=20, done=True, pid=KID1)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert trace["state"] == "tracing"


@pytest.mark.parametrize("reason", ["error: ModuleNotFoundError: No module named 'memray'",
                                    "expired"])
def test_a_trace_with_no_call_fails_with_the_childs_reason(procs: FakeProcs, reason: str) -> None:
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=0, done=True, reason=reason)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert trace["state"] == "failed"
    assert reason in trace["reason"]


def test_a_trace_whose_child_never_gets_the_task_again_moves_to_one_that_does(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """A pool may hand one task name to the same child again and again: the chosen child ran
    it once, and then ten calls go to the other. The trace moves there, and the first child,
    signalled again, finds no request naming it."""
    clock = Clock()
    sup = _ready(procs, clock)
    _leaking(sup, KID0, n=3)
    _leaking(sup, KID1, n=3)
    sup.tick(clock())
    first = _request(sup)
    assert first is not None
    assert first.child == (KID0, KID0 * 10)  # the least memory
    _leaking(sup, KID1, n=9, first=4)
    sup.tick(clock())
    assert _request(sup) == first, "nine calls elsewhere: it waits"
    _leaking(sup, KID1, n=1, first=13)
    sup.tick(clock())
    moved = _request(sup)
    assert moved is not None
    assert (moved.id, moved.child) == (first.id, (KID1, KID1 * 10))
    assert procs.signals == [(KID0, TRACE_SIGNAL), (KID1, TRACE_SIGNAL), (KID0, TRACE_SIGNAL)]
    [event] = [e for e in logs if e["event"] == "trace_moved"]
    assert (event["pid"], event["to_pid"]) == (KID0, KID1)
    _report(sup, moved, calls=1, done=True, pid=KID0, reason="cancelled")  # the first child
    _report(sup, moved, calls=20, done=True, pid=KID1)
    sup.tick(clock())
    [trace] = _traces(sup)
    assert (trace["state"], trace["pid"], trace["calls"]) == ("done", KID1, 20)


def test_a_trace_under_way_is_not_moved(procs: FakeProcs) -> None:
    """Once its child has traced a call, the calls others run do not move it."""
    clock = Clock()
    sup, request = _tracing(procs, clock)
    _report(sup, request, calls=1, done=False)
    _leaking(sup, KID1, n=30)
    sup.tick(clock())
    assert _request(sup) == request
    assert procs.signals == [(KID0, TRACE_SIGNAL)]
