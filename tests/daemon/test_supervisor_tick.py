"""The supervisor's tick over a scripted process table: sampling, guards, holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import structlog

from celery_memguard.daemon.actions import Actor
from celery_memguard.daemon.containers import CONTAINER_CHECK_MIN
from celery_memguard.daemon.decision import Decision, Reason
from celery_memguard.daemon.readings import ProcId
from celery_memguard.protocol import messages, rules
from celery_memguard.protocol.cgroups import ContainerReading, Pressure
from celery_memguard.protocol.signals import CONTAINER_SIGNAL
from tests.builders import KID0, KID1, MAIN, MiB, batch, child_hello, dgram, hello, task_end
from tests.daemon.harness import make
from tests.fakes import FakeProcs


def test_the_tick_samples_rss_and_recycles_idle_children(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(child_hello(KID1, tasks=3)), 0.0)
    procs.table[KID1].rss = 130 * MiB
    sup.tick(1.0)
    assert procs.signals == []  # seen over on the tick: recycle.grace (2 s) must pass first
    sup.tick(2.0)
    assert procs.signals == []
    sup.tick(3.0)
    assert procs.signals == [(KID1, 38)]


def test_a_vanished_child_is_not_an_error_and_loses_its_series(procs: FakeProcs,
                                                              logs: list[dict[str, Any]]) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    assert b'celery_memguard_child_rss_bytes{index="1",worker="w@h"}' in sup.metrics.render()
    del procs.table[KID1]
    sup.tick(1.0)
    text = sup.metrics.render()
    assert b'index="1"' not in text
    assert b'celery_memguard_child_rss_bytes{index="0",worker="w@h"}' in text
    assert any(e["event"] == "child_gone" and e["pid"] == KID1 for e in logs)


def test_a_replacement_child_takes_the_slot_index_not_the_pid(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    del procs.table[KID1]
    procs.add(13, MAIN)
    sup.receive(dgram(child_hello(13, index=1)), 0.5)
    sup.tick(1.0)
    text = sup.metrics.render().decode()
    assert 'celery_memguard_child_tasks{index="1",worker="w@h"} 0.0' in text
    assert "13" not in [line.split('"')[1] for line in text.splitlines() if "index=" in line]


def test_dry_run_counts_once_per_child_and_sends_nothing(procs: FakeProcs,
                                                        logs: list[dict[str, Any]]) -> None:
    sup = make(procs, recycle={"dry_run": True})
    sup.receive(dgram(hello()), 0.0)
    for n in range(3):
        sup.receive(dgram(task_end(KID0, 150, tasks=n + 1)), float(n))
        sup.tick(float(n))
    assert procs.signals == []
    assert sup.state.dry_run_recycles[("w@h", "soft")] == 1
    assert sup.state.recycles == {}
    assert [e["event"] for e in logs].count("recycle_would_request") == 1


def test_an_agentless_worker_found_by_the_scan_is_shown_and_only_held(
        logs: list[dict[str, Any]]) -> None:
    procs = FakeProcs()
    procs.add(20, 1, name="plain@h")
    procs.add(21, 20, rss=300 * MiB)
    procs.add(22, 20)
    sup = make(procs)
    sup.tick(0.0)
    sup.tick(1.0)
    assert procs.signals == []
    doc = sup.view.snapshot.workers
    assert [(w.name, w.agent, [c.index for c in w.children]) for w in doc] == [
        ("plain@h", False, [0, 1])]
    held = [e for e in logs if e["event"] == "recycle_held"]
    assert len(held) == 1  # logged once, not every tick
    assert held[0]["held_by"] == "no_agent"


def test_a_worker_that_is_gone_is_dropped_with_its_children(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    for pid in (MAIN, KID0, KID1):
        del procs.table[pid]
    sup.tick(1.0)
    assert sup.view.snapshot.workers == ()
    assert b"child_rss_bytes{" not in sup.metrics.render()


def _pool_of_eight(procs: FakeProcs) -> Any:
    """A worker of eight children, two recycles a minute, no share cap."""
    for pid in range(13, 19):
        procs.add(pid, MAIN)
    kids = tuple((pid, pid - KID0) for pid in range(KID0, 19))
    sup = make(procs, recycle={"max_per_minute": 2, "max_share": 1.0})
    sup.receive(dgram(hello(kids=kids, concurrency=8)), 0.0)
    return sup


def test_the_rate_limit_holds_requests_past_max_per_minute(procs: FakeProcs) -> None:
    sup = _pool_of_eight(procs)
    for pid in range(KID0, 19):
        sup.receive(dgram(task_end(pid, 150)), 1.0)
    assert len(procs.signals) == 2


def test_a_reused_pid_is_never_signalled(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Between the decision and the action the pid now names another process: dropped."""
    sup = make(procs)
    actor = Actor(procs, sup.state, structlog.get_logger(), dry_run=False)
    stale = Decision(worker="w@h", worker_pid=MAIN, index=0, proc=ProcId(KID0, 1), ppid=MAIN,
                     measured=150 * MiB, threshold=100 * MiB, reason=Reason.SOFT, signal=38)
    actor.carry_out([stale], 0.0)
    wrong_parent = Decision(worker="w@h", worker_pid=MAIN, index=0,
                            proc=ProcId(KID0, procs.table[KID0].start), ppid=1,
                            measured=150 * MiB, threshold=100 * MiB, reason=Reason.SOFT, signal=38)
    actor.carry_out([wrong_parent], 0.0)
    assert procs.signals == []
    assert [e["why"] for e in logs if e["event"] == "recycle_dropped"] == [
        "not_a_verified_pool_child"] * 2


def test_permission_denied_is_reported_not_raised(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    procs.denied.add(KID0)
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(task_end(KID0, 150)), 0.0)
    assert [e["why"] for e in logs if e["event"] == "recycle_failed"] == ["permission_denied"]
    assert sup.state.recycles == {}


def test_uss_is_read_only_for_children_near_the_limit(procs: FakeProcs) -> None:
    procs.table[KID0].rss, procs.table[KID0].uss = 150 * MiB, 60 * MiB
    procs.table[KID1].rss, procs.table[KID1].uss = 50 * MiB, 40 * MiB
    sup = make(procs, limits={"measure": "uss"})
    sup.receive(dgram(hello()), 0.0)
    sup.tick(0.0)
    children = {c.index: c for c in sup.view.snapshot.workers[0].children}
    assert children[0].uss == 60 * MiB
    assert children[1].uss is None  # far under the limit by RSS: never read
    assert procs.signals == []  # USS 60 MiB is under the soft limit


def test_worker_total_reads_uss_only_when_the_rss_sum_is_over(procs: FakeProcs) -> None:
    procs.table[KID0].rss, procs.table[KID0].uss = 80 * MiB, 60 * MiB
    procs.table[KID1].rss, procs.table[KID1].uss = 80 * MiB, 80 * MiB
    sup = make(procs, limits={"worker_total": "170MiB"})
    sup.receive(dgram(hello()), 0.0)
    for pid, index in ((KID0, 0), (KID1, 1)):
        sup.receive(dgram(child_hello(pid, tasks=3, rss_mib=80, index=index)), 0.0)
    sup.tick(0.0)
    assert [c.uss for c in sup.view.snapshot.workers[0].children] == [None, None]  # 160 MiB RSS
    procs.table[KID0].rss = procs.table[KID1].rss = 95 * MiB
    sup.tick(1.0)  # RSS 190 MiB >= 170: USS read, 140 MiB: under
    assert [c.uss for c in sup.view.snapshot.workers[0].children] == [60 * MiB, 80 * MiB]
    assert procs.signals == []
    procs.table[KID0].uss = 95 * MiB
    sup.tick(2.0)  # over from here: recycle.grace (2 s) must pass
    assert procs.signals == []
    sup.tick(4.0)
    assert procs.signals == [(KID0, 38)]
    assert sup.state.recycles[("w@h", "worker_total")] == 1


def test_the_memory_total_and_its_source_are_exported(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.tick(0.0)
    assert b'celery_memguard_memory_total_bytes{source="host"} 1.7179869184e+10' in \
        sup.metrics.render()


def test_a_storm_is_warned_once_with_its_figures(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    for pid in (KID0, KID1):
        procs.table[pid].rss = 150 * MiB
    for t in range(4):
        sup.tick(float(t))
    storms = [e for e in logs if e["event"] == "recycle_storm"]
    assert len(storms) == 1
    assert storms[0]["rss_bytes"] == [150 * MiB, 150 * MiB]
    assert storms[0]["soft_bytes"] == 100 * MiB
    procs.table[KID0].rss = 50 * MiB
    sup.tick(5.0)
    procs.table[KID0].rss = 150 * MiB
    sup.tick(6.0)
    assert len([e for e in logs if e["event"] == "recycle_storm"]) == 2  # calmed, then again


def test_a_storm_is_not_warned_again_when_the_pool_is_empty_between_recycles(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Both children gone a moment before their replacements: the pool has not calmed down."""
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    for pid in (KID0, KID1):
        procs.table[pid].rss = 150 * MiB
    sup.tick(0.0)
    for pid in (KID0, KID1):
        del procs.table[pid]
    sup.tick(1.0)
    procs.add(13, MAIN, rss=150 * MiB)
    sup.receive(dgram(child_hello(13, tasks=1, rss_mib=150, index=0)), 1.5)
    sup.tick(2.0)
    assert [c.pid for w in sup.view.snapshot.workers for c in w.children] == [13]
    assert len([e for e in logs if e["event"] == "recycle_storm"]) == 1


def test_a_child_first_seen_less_than_min_lifetime_ago_is_held(procs: FakeProcs,
                                                               logs: list[dict[str, Any]]) -> None:
    sup = make(procs, recycle={"min_lifetime": "5s"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(task_end(KID0, 150, tasks=1)), 1.0)
    assert procs.signals == []
    assert [e["held_by"] for e in logs if e["event"] == "recycle_held"] == ["min_lifetime"]
    sup.receive(dgram(task_end(KID0, 152, tasks=2)), 5.0)
    assert procs.signals == [(KID0, 38)]


def test_a_child_older_than_min_lifetime_when_first_seen_is_not_held(procs: FakeProcs) -> None:
    """A restarted daemon takes a child's age from its start, not from when it first saw it."""
    procs.age = lambda start: 60.0  # type: ignore[method-assign]
    sup = make(procs, recycle={"min_lifetime": "30s"})
    sup.receive(dgram(hello()), 100.0)
    sup.receive(dgram(task_end(KID0, 150, tasks=7)), 100.1)
    assert procs.signals == [(KID0, 38)]


@pytest.mark.parametrize("concurrency", [2, 8])
def test_the_daemon_jitters_a_child_only_where_its_pool_recycles_two_at_once(
        procs: FakeProcs, concurrency: int) -> None:
    """The same child at 1 % under the limit: at concurrency 2 (one child at a time under the
    default share) it stays, and the over-soft clock does not start; in a pool of 8 its
    jittered threshold is under that figure (this pid's share is known) and it is asked."""
    sup = make(procs, recycle={"jitter": "20%"})
    start = procs.table[KID0].start
    threshold = rules.jittered(100 * MiB, 0.2, KID0, start)
    assert threshold < 99 * MiB  # the fixture's pid and start time draw a share over 5 %
    sup.receive(dgram(hello(concurrency=concurrency)), 0.0)
    sup.receive(dgram(task_end(KID0, 99)), 0.0)
    asked = procs.signals == [(KID0, 38)]
    assert asked is (concurrency == 8)
    child = next(iter(sup.state.workers.values())).children[KID0]
    assert (child.over_soft_since is not None) is (concurrency == 8)


def test_the_workers_container_is_exported_and_its_oom_counter_tells_oom_from_sigkill(
        procs: FakeProcs) -> None:
    """Read on the tick (the daemon sees the worker's cgroup), the kernel's counter is what a
    later child death is matched against: the agent's hello carried none."""
    procs.containers[MAIN] = ContainerReading(
        usage=300 * MiB, working_set=250 * MiB, limit=512 * MiB, high=None,
        events={"oom": 0, "oom_kill": 7, "high": 0, "max": 2},
        pressure=Pressure(some_avg10=0.05, full_avg10=0.01, some_total=1.5, full_total=0.5))
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.tick(1.0)
    text = sup.metrics.render().decode()
    for line in ('celery_memguard_container_memory_working_set_bytes{worker="w@h"} 2.62144e+08',
                 'celery_memguard_container_memory_limit_bytes{worker="w@h"} 5.36870912e+08',
                 'celery_memguard_container_memory_events_total{event="oom_kill",worker="w@h"} 7.0',
                 'celery_memguard_container_memory_pressure{kind="some",worker="w@h"} 0.05',
                 # the lines, at 85% and 95% of the limit by default
                 'celery_memguard_limit_bytes{level="container_soft",worker="w@h"} 4.56340275e+08',
                 'celery_memguard_limit_bytes{level="container_hard",worker="w@h"} 5.10027366e+08'):
        assert line in text
    assert "container_memory_high_bytes{" not in text  # unset: no series
    procs.containers[MAIN] = dataclasses.replace(
        procs.containers[MAIN], events={**procs.containers[MAIN].events, "oom_kill": 8})
    sup.tick(2.0)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9,
                                         task="app.t", id="t")), 2.1)
    sup.receive(dgram(messages.ChildDied(pid=MAIN, child=KID1, index=1, exitcode=-9,
                                         task="app.t", id="u")), 2.2)
    assert sup.state.interrupted == {("w@h", "app.t", "oom"): 1, ("w@h", "app.t", "killed"): 1}


def test_a_container_the_daemon_cannot_see_is_known_from_the_workers_hello(
        procs: FakeProcs) -> None:
    """A sidecar with a cgroup namespace of its own cannot read the worker's cgroup; the
    worker's agent reads its own and says it in its hello, every 2 s."""
    sup = make(procs)
    sup.receive(dgram(hello(oom_kills=0, container_usage=700 * MiB,
                            container_working_set=650 * MiB, container_limit=1024 * MiB)), 0.0)
    sup.tick(1.0)
    text = sup.metrics.render().decode()
    assert 'celery_memguard_container_memory_working_set_bytes{worker="w@h"} 6.815744e+08' in text
    assert 'celery_memguard_limit_bytes{level="container_soft",worker="w@h"}' in text


def test_two_workers_in_two_containers_are_each_judged_by_their_own(procs: FakeProcs) -> None:
    """Past its soft line for recycle.grace, a container's fastest-growing child is recycled;
    the other worker's children, in a container with room, are left alone."""
    procs.add(20, 1, cmdline=("celery", "worker"))
    procs.add(21, 20, rss=300 * MiB)
    procs.table[KID0].rss = 300 * MiB
    full = ContainerReading(usage=950 * MiB, working_set=900 * MiB, limit=1000 * MiB, high=None,
                            events={}, pressure=None)
    roomy = dataclasses.replace(full, usage=500 * MiB, working_set=450 * MiB)
    procs.containers.update({MAIN: full, 20: roomy})
    sup = make(procs, limits={"soft": "1GiB", "hard": "2GiB"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(hello(((21, 0),), pid=20, node="other@h")), 0.0)
    for kid, parent, index, tasks in ((KID0, MAIN, 0, 5), (KID1, MAIN, 1, 0), (21, 20, 0, 5)):
        sup.receive(dgram(child_hello(kid, tasks, ppid=parent, index=index)),
                    0.0)  # KID1: a fresh child
    for now in (1.0, 2.0, 3.5):
        sup.tick(now)
    assert procs.signals == [(KID0, 38)]
    assert sup.state.recycles == {("w@h", "container"): 1}


def test_a_cgroup_is_read_once_for_all_its_workers_and_the_watch_that_follows_the_tick(
        procs: FakeProcs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several workers in one container (a VM's slice, a pod with two workers): one read of
    its files serves them all in a tick, and the watch right after the tick uses it too; a
    watch a full closest look later reads again."""
    procs.add(20, 1, cmdline=("celery", "worker"))
    procs.add(21, 20, rss=60 * MiB)
    procs.containers[MAIN] = ContainerReading(
        usage=300 * MiB, working_set=250 * MiB, limit=8192 * MiB, high=None, events={},
        pressure=None)
    shared = procs.container(MAIN)
    monkeypatch.setattr(procs, "container", lambda pid: shared)  # both workers live in it
    reads: list[object] = []
    real = procs.read_container
    monkeypatch.setattr(procs, "read_container",
                        lambda container: reads.append(container) or real(container))
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(hello(((21, 0),), pid=20, node="other@h")), 0.0)
    sup.tick(1.0)
    assert len(reads) == 1
    sup.watch_containers(1.0 + CONTAINER_CHECK_MIN / 4)
    assert len(reads) == 1
    sup.watch_containers(1.0 + CONTAINER_CHECK_MIN)
    assert len(reads) == 2
    text = sup.metrics.render().decode()
    for worker in ("w@h", "other@h"):
        assert (f'celery_memguard_container_memory_working_set_bytes{{worker="{worker}"}} '
                '2.62144e+08') in text


def test_recycles_of_children_grown_by_a_leak_leave_the_rate_for_a_storm(procs: FakeProcs) -> None:
    """Children that grew from a fresh 40 MiB past the limit over 30 tasks are each recycled
    and none of them counts towards max_per_minute: the grant is still there afterwards."""
    sup = _pool_of_eight(procs)
    for pid in range(KID0, 19):
        sup.receive(dgram(child_hello(pid, rss_mib=40)), 0.0)
    for pid in range(KID0, 19):
        sup.receive(dgram(task_end(pid, 150, tasks=30)), 1.0)
    assert len(procs.signals) == 8
    assert list(sup.state.requests.get("w@h", ())) == []


def test_a_stall_reads_the_container_at_once_and_interrupts_the_growing_task_past_hard(
        procs: FakeProcs) -> None:
    """The trigger of the file the worker's container's pressure is read from fired: its
    container is read now (it crossed its hard line since the tick), the stall is counted, and
    the task that grew is interrupted without waiting for the next tick. A trigger of another
    file changes nothing."""
    psi = Path("/fake/psi")
    procs.pressure_file = psi
    procs.containers[MAIN] = ContainerReading(usage=600 * MiB, working_set=500 * MiB,
                                              limit=1000 * MiB, high=None, events={},
                                              pressure=None)
    sup = make(procs, limits={"soft": "2GiB", "hard": "3GiB"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(batch(KID0, 1, ("app.big", 50, 50, 0))), 0.5)  # idle at 50 MiB
    procs.table[KID0].rss = 400 * MiB  # its next task has grown 350 MiB
    sup.tick(1.0)
    assert sup.containers.stall_files(sup.state.workers.values()) == {psi: 0.4}
    assert procs.signals == []
    procs.containers[MAIN] = dataclasses.replace(procs.containers[MAIN], working_set=960 * MiB)
    sup.on_stall([Path("/fake/other")], 1.2)
    assert (procs.signals, sup.state.stalls) == ([], {})
    sup.on_stall([psi], 1.3)
    assert sup.state.stalls == {"w@h": 1}
    assert procs.signals == [(KID0, CONTAINER_SIGNAL)]
