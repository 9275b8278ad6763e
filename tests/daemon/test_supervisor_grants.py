"""Grants: what the supervisor publishes for children to recycle themselves, and counts."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

from celery_memguard.protocol import grants, messages
from tests.builders import KID0, KID1, MAIN, MiB, child_hello, dgram, hello
from tests.daemon.harness import grant_file, make, take
from tests.fakes import FakeProcs


def test_the_tick_publishes_each_agent_workers_grant(procs: FakeProcs) -> None:
    """Two children, half the pool may go at once: one unit, for the worker by pid and start."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert grant_file(sup) == {"v": 1, "worker": [MAIN, MAIN * 10], "grant": 1, "taken": []}


def test_no_grant_is_published_in_a_dry_run(procs: FakeProcs) -> None:
    sup = make(procs, recycle={"dry_run": True})
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert grant_file(sup)["grant"] == 0


def test_an_agentless_worker_gets_nogrant_file(socket_dir: Path) -> None:
    procs = FakeProcs()
    procs.add(20, 1, name="plain@h")
    procs.add(21, 20)
    make(procs).tick(0.0)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_unit_a_child_took_counts_as_one_recycle_by_the_agent(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Collected from the grant file on the tick, then announced by the child's exit: once."""

    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    path = f"{sup.config.agent.socket}.grant.{MAIN}"
    assert grants.take(path, KID0, (MAIN, MAIN * 10), "soft")
    assert not grants.take(path, KID1, (MAIN, MAIN * 10), "soft")
    sup.tick(1.0)
    assert sup.state.recycles[("w@h", "soft")] == 1
    assert sup.state.workers[MAIN].children[KID0].requested_at == 1.0
    assert grant_file(sup)["grant"] == 0  # KID0 is still on its way out
    sup.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=9, reason="soft")), 1.2)
    assert sup.state.recycles[("w@h", "soft")] == 1
    assert grant_file(sup)["grant"] == 1  # it left: the next unit is out at once
    assert procs.signals == []
    [event] = [e for e in logs if e["event"] == "recycle_requested"]
    assert event | {"worker": "w@h", "pid": KID0, "reason": "soft", "by": "agent"} == event


def test_an_exit_under_a_grant_seen_first_is_counted_and_the_file_later_is_not(
        procs: FakeProcs) -> None:

    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    path = f"{sup.config.agent.socket}.grant.{MAIN}"
    assert grants.take(path, KID1, (MAIN, MAIN * 10), "predicted")
    sup.receive(dgram(messages.ChildExit(pid=KID1, ppid=MAIN, index=1, tasks=9,
                                        reason="predicted")), 0.5)
    sup.tick(1.0)
    assert sup.state.recycles == {("w@h", "predicted"): 1}
    assert sup.state.requests["w@h"] == deque([0.5])


def test_a_gone_worker_s_grant_file_is_removed(procs: FakeProcs, socket_dir: Path) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert [p.name for p in socket_dir.glob("*.grant.*")] == [f"agent.sock.grant.{MAIN}"]
    for pid in (MAIN, KID0, KID1):
        del procs.table[pid]
    sup.tick(1.0)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_recycle_a_child_did_on_its_own_is_exported_at_once(procs: FakeProcs) -> None:
    """Not at the next tick: its exit is published with the counters it changed."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    sup.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=9, reason="soft")), 0.5)
    assert b'celery_memguard_recycles_total{reason="soft",worker="w@h"} 1.0' in sup.metrics.render()


def test_a_unit_taken_by_a_child_already_gone_is_still_counted(procs: FakeProcs) -> None:
    """Its exit message lost (a daemon restarting, say), the grant file still tells."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    take(sup, KID0)
    del procs.table[KID0]
    sup.tick(1.0)
    assert sup.state.recycles == {("w@h", "soft"): 1}


def test_the_daemon_does_not_signal_a_child_that_took_a_unit_meanwhile(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Idle and over soft on the tick: the daemon would ask it, but it is leaving on its own."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    procs.table[KID0].rss = 150 * MiB
    sup.receive(dgram(child_hello(KID0, tasks=3, rss_mib=150)), 0.0)
    sup.tick(0.0)
    sup.tick(1.0)
    take(sup, KID0)
    sup.tick(3.0)  # recycle.grace has passed: the tick would act now
    assert procs.signals == []
    assert sup.state.recycles == {("w@h", "soft"): 1}
    assert [e.get("by") for e in logs if e["event"] == "recycle_requested"] == ["agent"]


def test_a_hard_exit_and_a_unit_taken_for_the_same_child_count_one_recycle(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    take(sup, KID1)
    sup.receive(dgram(messages.ChildExit(pid=KID1, ppid=MAIN, index=1, tasks=4, reason="hard")), 0.5)
    sup.tick(1.0)
    assert sup.state.recycles == {("w@h", "hard"): 1}


def test_a_worker_saying_goodbye_takes_its_grant_file_with_it(procs: FakeProcs,
                                                              socket_dir: Path) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert list(socket_dir.glob("*.grant.*"))
    sup.receive(dgram(messages.WorkerBye(pid=MAIN)), 0.5)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_reload_to_a_dry_run_withdraws_the_grants_at_once(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert grant_file(sup)["grant"] == 1
    dry = sup.config.model_copy(update={"recycle": sup.config.recycle.model_copy(
        update={"dry_run": True})})
    sup.reload(dry, publish=False)
    assert grant_file(sup)["grant"] == 0
