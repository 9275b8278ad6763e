"""The daemon loop driven by a scripted process table and a manual clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from celery_memguard import config
from celery_memguard.actions import Actor
from celery_memguard.daemon import Daemon
from celery_memguard.inbox import Datagram
from celery_memguard.model import Decision, ProcId, Reason
from celery_memguard.protocol import grants, messages, rules, settings
from tests.fakes import Clock, FakeProcs, MiB

MAIN, KID0, KID1 = 10, 11, 12


def dgram(message: messages.Message, sender: int | None = None) -> Datagram:
    return Datagram(data=messages.encode(message), pid=message.pid if sender is None else sender,
                    uid=0, truncated=False)


def hello(kids: tuple[tuple[int, int], ...] = ((KID0, 0), (KID1, 1)), **kw: Any) -> messages.WorkerHello:
    values: dict[str, Any] = {"pid": MAIN, "node": "w@h", "pool": "prefork", "concurrency": 2,
                                  "max_tasks": None, "max_memory_kib": None, "recycle_signal": 38,
                                  "kids": kids, "agent": "t"}
    values.update(kw)
    return messages.WorkerHello(**values)


def task_end(pid: int, rss_mib: float, tasks: int = 1, index: int | None = None) -> messages.TaskEnd:
    return messages.TaskEnd(pid=pid, ppid=MAIN, index=index if index is not None else pid - KID0,
                        task="app.leak", id=f"id-{pid}-{tasks}", rss_before=0,
                        rss=int(rss_mib * MiB), tasks=tasks, ok=True)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def procs() -> FakeProcs:
    fake = FakeProcs()
    fake.add(MAIN, 1, cmdline=("celery", "worker"))
    fake.add(KID0, MAIN)
    fake.add(KID1, MAIN)
    return fake


@pytest.fixture(autouse=True)
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """Each daemon here keeps its socket's neighbours (grant files) in the test's own directory."""
    global _SOCKET
    _SOCKET = tmp_path / "run" / "agent.sock"
    _SOCKET.parent.mkdir()
    yield _SOCKET.parent
    _SOCKET = None


_SOCKET: Path | None = None


def make(procs: FakeProcs, clock: Clock | None = None, **sections: Any) -> Daemon:
    """A daemon over the fake table; no jitter and no minimum lifetime unless a test sets them."""
    data: dict[str, Any] = {"limits": {"soft": "100MiB", "hard": "200MiB"},
                            "recycle": {"jitter": 0, "min_lifetime": 0},
                            "agent": {"socket": str(_SOCKET)}}
    for key, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(key, {}).update(values)
        else:
            data[key] = values
    cfg = config.parse(data, memory_total=16 * 1024 * MiB, env={})
    return Daemon(cfg, procs=procs, clock=clock or Clock(), log=structlog.get_logger())


def test_a_task_end_over_the_limit_is_acted_on_at_once(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """No tick is needed: the report that crosses the limit triggers the request."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(task_end(KID0, 99)), 0.0)
    assert procs.signals == []
    daemon.receive(dgram(task_end(KID0, 101, tasks=2)), 0.1)
    assert procs.signals == [(KID0, 38)]
    assert daemon.state.recycles[("w@h", "soft")] == 1
    [event] = [e for e in logs if e["event"] == "recycle_requested"]
    assert event | {"worker": "w@h", "index": 0, "pid": KID0, "reason": "soft",
                    "measured_bytes": 101 * MiB, "threshold_bytes": 100 * MiB} == event
    assert b'celery_memguard_recycles_total{reason="soft",worker="w@h"} 1.0' in daemon.metrics.render()


def test_the_same_child_is_asked_only_once(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    for n in range(1, 5):
        daemon.receive(dgram(task_end(KID0, 100 + n, tasks=n)), 0.1 * n)
    daemon.tick(1.0)
    assert procs.signals == [(KID0, 38)]


def test_a_datagram_claiming_another_pid_is_dropped_as_forged(procs: FakeProcs) -> None:
    """The kernel's sender pid must match the message: one process cannot steer another."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(task_end(KID0, 150), sender=KID1), 0.0)
    daemon.receive(dgram(hello(), sender=KID1), 0.0)
    assert procs.signals == []
    assert daemon.state.dropped["forged_sender"] == 2


def test_a_message_from_a_process_that_is_not_the_named_child_is_dropped(procs: FakeProcs) -> None:
    procs.add(99, 1)  # an unrelated process, not a child of MAIN
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.TaskEnd(pid=99, ppid=MAIN, index=5, task="t", id="i", rss_before=0,
                                      rss=500 * MiB, tasks=1, ok=True)), 0.0)
    daemon.tick(0.5)
    assert procs.signals == []
    assert daemon.state.dropped["not_a_child"] == 1


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"), (b"{", "not_json"), (b'{"v":1,"t":"q"}', "unknown_type"),
    (b'{"v":9}', "bad_version"),
])
def test_malformed_datagrams_are_counted_and_change_nothing(procs: FakeProcs, data: bytes,
                                                          reason: str) -> None:
    daemon = make(procs)
    daemon.receive(Datagram(data=data, pid=KID0, uid=0, truncated=False), 0.0)
    daemon.tick(0.0)
    assert daemon.state.dropped[reason] == 1
    assert f'celery_memguard_messages_dropped_total{{reason="{reason}"}} 1.0'.encode() in \
        daemon.metrics.render()


def test_a_truncated_datagram_is_counted_as_oversized(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(Datagram(data=b"{}", pid=KID0, uid=0, truncated=True), 0.0)
    assert daemon.state.dropped["oversized"] == 1


def test_the_tick_samples_rss_and_recycles_idle_children(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.ChildHello(pid=KID1, ppid=MAIN, index=1, tasks=3, rss=50 * MiB)), 0.0)
    procs.table[KID1].rss = 130 * MiB
    daemon.tick(1.0)
    assert procs.signals == []  # seen over on the tick: recycle.grace (2 s) must pass first
    daemon.tick(2.0)
    assert procs.signals == []
    daemon.tick(3.0)
    assert procs.signals == [(KID1, 38)]


def test_a_vanished_child_is_not_an_error_and_loses_its_series(procs: FakeProcs,
                                                              logs: list[dict[str, Any]]) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert b'celery_memguard_child_rss_bytes{index="1",worker="w@h"}' in daemon.metrics.render()
    del procs.table[KID1]
    daemon.tick(1.0)
    text = daemon.metrics.render()
    assert b'index="1"' not in text
    assert b'celery_memguard_child_rss_bytes{index="0",worker="w@h"}' in text
    assert any(e["event"] == "child_gone" and e["pid"] == KID1 for e in logs)


def test_a_replacement_child_takes_the_slot_index_not_the_pid(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    del procs.table[KID1]
    procs.add(13, MAIN)
    daemon.receive(dgram(messages.ChildHello(pid=13, ppid=MAIN, index=1, tasks=0, rss=50 * MiB)), 0.5)
    daemon.tick(1.0)
    text = daemon.metrics.render().decode()
    assert 'celery_memguard_child_tasks{index="1",worker="w@h"} 0.0' in text
    assert "13" not in [line.split('"')[1] for line in text.splitlines() if "index=" in line]


def test_dry_run_counts_once_per_child_and_sends_nothing(procs: FakeProcs,
                                                        logs: list[dict[str, Any]]) -> None:
    daemon = make(procs, recycle={"dry_run": True})
    daemon.receive(dgram(hello()), 0.0)
    for n in range(3):
        daemon.receive(dgram(task_end(KID0, 150, tasks=n + 1)), float(n))
        daemon.tick(float(n))
    assert procs.signals == []
    assert daemon.state.dry_run_recycles[("w@h", "soft")] == 1
    assert daemon.state.recycles == {}
    assert [e["event"] for e in logs].count("recycle_would_request") == 1


def test_an_agentless_worker_found_by_the_scan_is_shown_and_only_held(
        logs: list[dict[str, Any]]) -> None:
    procs = FakeProcs()
    procs.add(20, 1, name="plain@h")
    procs.add(21, 20, rss=300 * MiB)
    procs.add(22, 20)
    daemon = make(procs)
    daemon.tick(0.0)
    daemon.tick(1.0)
    assert procs.signals == []
    doc = daemon.view.snapshot.workers
    assert [(w.name, w.agent, [c.index for c in w.children]) for w in doc] == [
        ("plain@h", False, [0, 1])]
    held = [e for e in logs if e["event"] == "recycle_held"]
    assert len(held) == 1  # logged once, not every tick
    assert held[0]["held_by"] == "no_agent"


def test_a_worker_that_is_gone_is_dropped_with_its_children(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    for pid in (MAIN, KID0, KID1):
        del procs.table[pid]
    daemon.tick(1.0)
    assert daemon.view.snapshot.workers == ()
    assert b"child_rss_bytes{" not in daemon.metrics.render()


def test_worker_bye_forgets_the_worker(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.WorkerBye(pid=MAIN)), 0.1)
    assert daemon.state.workers == {}


def test_the_rate_limit_holds_requests_past_max_per_minute(procs: FakeProcs) -> None:
    for pid in range(13, 19):
        procs.add(pid, MAIN)
    kids = tuple((pid, pid - KID0) for pid in range(KID0, 19))
    daemon = make(procs, recycle={"max_per_minute": 2, "max_share": 1.0})
    daemon.receive(dgram(hello(kids=kids, concurrency=8)), 0.0)
    for pid in range(KID0, 19):
        daemon.receive(dgram(task_end(pid, 150)), 1.0)
    assert len(procs.signals) == 2


def test_a_reused_pid_is_never_signalled(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Between the decision and the action the pid now names another process: dropped."""
    daemon = make(procs)
    actor = Actor(procs, daemon.state, structlog.get_logger(), dry_run=False)
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
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(task_end(KID0, 150)), 0.0)
    assert [e["why"] for e in logs if e["event"] == "recycle_failed"] == ["permission_denied"]
    assert daemon.state.recycles == {}


def test_uss_is_read_only_for_children_near_the_limit(procs: FakeProcs) -> None:
    procs.table[KID0].rss, procs.table[KID0].uss = 150 * MiB, 60 * MiB
    procs.table[KID1].rss, procs.table[KID1].uss = 50 * MiB, 40 * MiB
    daemon = make(procs, limits={"measure": "uss"})
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    children = {c.index: c for c in daemon.view.snapshot.workers[0].children}
    assert children[0].uss == 60 * MiB
    assert children[1].uss is None  # far under the limit by RSS: never read
    assert procs.signals == []  # USS 60 MiB is under the soft limit


def test_reload_applies_a_valid_config_and_keeps_the_old_one_on_error(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    daemon = make(procs)
    results: list[Any] = [config.ConfigError("limits.soft", "bad"),
                          config.parse({"limits": {"soft": "50MiB", "hard": "200MiB"}}, env={})]

    def reload() -> config.Config:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result  # type: ignore[no-any-return]

    daemon._reload = reload
    daemon.handle_reload()
    assert daemon.config.limits.soft == 100 * MiB
    assert [e["key"] for e in logs if e["event"] == "config_reload_refused"] == ["limits.soft"]
    daemon.handle_reload()
    assert daemon.config.limits.soft == 50 * MiB


def test_healthz_turns_unhealthy_when_the_loop_stops_ticking(procs: FakeProcs) -> None:
    clock = Clock(0.0)
    daemon = make(procs, clock=clock)
    daemon.tick(clock())
    assert daemon.healthy()
    clock.advance(30)
    assert not daemon.healthy()


def test_an_interrupted_task_is_counted_by_name_and_logged_with_its_id(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.TaskInterrupted(pid=KID0, ppid=MAIN, index=0, task="app.big",
                                              id="t-1", rss=210 * MiB, limit=200 * MiB)), 0.0)
    daemon.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=1, reason="hard")), 0.1)
    daemon.tick(0.2)
    text = daemon.metrics.render().decode()
    assert 'celery_memguard_interrupted_tasks_total{reason="hard",task="app.big",worker="w@h"} 1.0' in text
    assert 'celery_memguard_recycles_total{reason="hard",worker="w@h"} 1.0' in text
    [event] = [e for e in logs if e["event"] == "task_interrupted"]
    assert (event["task_id"], event["rss_bytes"], event["limit_bytes"]) == ("t-1", 210 * MiB, 200 * MiB)


def test_task_names_beyond_the_bound_are_counted_as_other(procs: FakeProcs) -> None:
    daemon = make(procs, metrics={"max_task_names": 2})
    daemon.receive(dgram(hello()), 0.0)
    for n in range(4):
        daemon.receive(dgram(messages.TaskInterrupted(pid=KID0, ppid=MAIN, index=0, task=f"app.t{n}",
                                                  id=str(n), rss=1, limit=1)), 0.0)
    assert {task for _, task, _ in daemon.state.interrupted} == {"app.t0", "app.t1", "other"}


def test_a_sigkill_we_did_not_send_is_an_oom_kill(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.TaskStart(pid=KID0, ppid=MAIN, index=0, task="app.huge", id="x-9",
                                        rss=900 * MiB)), 0.0)
    assert daemon.state.interrupted == {}
    del procs.table[KID0]
    daemon.tick(1.0)  # the child is gone from /proc before its parent reports the exit code
    daemon.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9)), 1.1)
    daemon.receive(dgram(messages.ChildDied(pid=MAIN, child=KID1, index=1, exitcode=155)), 1.2)
    assert daemon.state.oom_kills == {"w@h": 1}
    assert daemon.state.interrupted == {("w@h", "app.huge", "oom"): 1}
    [event] = [e for e in logs if e["event"] == "child_oom_killed"]
    assert (event["task"], event["task_id"], event["pid"]) == ("app.huge", "x-9", KID0)


def test_our_own_sigkill_is_not_counted_as_an_oom_kill(procs: FakeProcs) -> None:
    clock = Clock(0.0)
    daemon = make(procs, clock=clock, limits={"kill_after": "1s"}, sampling={"interval": "1s"})
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.ChildHello(pid=KID0, ppid=MAIN, index=0, tasks=0, rss=50 * MiB)), 0.0)
    procs.table[KID0].rss = 250 * MiB
    for _ in range(4):
        daemon.tick(clock())
        clock.advance(1.0)
    assert [sig for pid, sig in procs.signals if pid == KID0] == [15, 9]  # TERM, KILL, no grace
    assert daemon.state.recycles[("w@h", "kill")] == 1
    daemon.receive(dgram(messages.ChildDied(pid=MAIN, child=KID0, index=0, exitcode=-9)), clock())
    assert daemon.state.oom_kills == {}


def test_the_hard_limit_is_published_for_the_agents(procs: FakeProcs, tmp_path: Any) -> None:
    """The children read their limits, and the rules under which they may leave on their own,
    from a file beside the socket."""
    daemon = make(procs, agent={"socket": str(tmp_path / "a.sock")},
                  limits={"watch_interval": "20ms"},
                  recycle={"min_lifetime": "3s", "skip_within_tasks": 4, "dry_run": True},
                  workers=[{"match": "big@*", "limits": {"soft": "150MiB", "measure": "uss"}}])
    daemon._publish_settings()
    data = (tmp_path / "a.sock.settings.json").read_bytes()
    assert settings.decode(data) == settings.AgentSettings(
        hard=200 * MiB, watch_interval=0.02, soft=100 * MiB, jitter=0.0, max_share=0.5,
        dry_run=True, min_lifetime=3.0, skip_within_tasks=4,
        workers=(("big@*", 200 * MiB, 150 * MiB, "uss"),))


def test_worker_total_reads_uss_only_when_the_rss_sum_is_over(procs: FakeProcs) -> None:
    procs.table[KID0].rss, procs.table[KID0].uss = 80 * MiB, 60 * MiB
    procs.table[KID1].rss, procs.table[KID1].uss = 80 * MiB, 80 * MiB
    daemon = make(procs, limits={"worker_total": "170MiB"})
    daemon.receive(dgram(hello()), 0.0)
    for pid, index in ((KID0, 0), (KID1, 1)):
        daemon.receive(dgram(messages.ChildHello(pid=pid, ppid=MAIN, index=index, tasks=3,
                                             rss=80 * MiB)), 0.0)
    daemon.tick(0.0)
    assert [c.uss for c in daemon.view.snapshot.workers[0].children] == [None, None]  # 160 MiB RSS
    procs.table[KID0].rss = procs.table[KID1].rss = 95 * MiB
    daemon.tick(1.0)  # RSS 190 MiB >= 170: USS read, 140 MiB: under
    assert [c.uss for c in daemon.view.snapshot.workers[0].children] == [60 * MiB, 80 * MiB]
    assert procs.signals == []
    procs.table[KID0].uss = 95 * MiB
    daemon.tick(2.0)  # over from here: recycle.grace (2 s) must pass
    assert procs.signals == []
    daemon.tick(4.0)
    assert procs.signals == [(KID0, 38)]
    assert daemon.state.recycles[("w@h", "worker_total")] == 1


def test_the_memory_total_and_its_source_are_exported(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.tick(0.0)
    assert b'celery_memguard_memory_total_bytes{source="host"} 1.7179869184e+10' in \
        daemon.metrics.render()


def test_task_growth_is_a_histogram_by_task_name_and_ranked_in_status(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    for n in range(10):
        daemon.receive(dgram(messages.TaskEnd(pid=KID0, ppid=MAIN, index=0, task="app.leak", id=str(n),
                                          rss_before=50 * MiB + n * 2 * MiB,
                                          rss=52 * MiB + n * 2 * MiB, tasks=n + 1, ok=True)), 0.0)
        daemon.receive(dgram(messages.TaskEnd(pid=KID1, ppid=MAIN, index=1, task="app.noop", id=f"x{n}",
                                          rss_before=50 * MiB, rss=50 * MiB, tasks=n + 1, ok=True)),
                       0.0)
    daemon.tick(1.0)
    text = daemon.metrics.render().decode()
    assert 'celery_memguard_task_memory_growth_bytes_count{task="app.leak"} 10.0' in text
    assert "celery_memguard_task_memory_growth_bytes_sum{task=\"app.leak\"} 2.097152e+07" in text
    assert 'celery_memguard_task_memory_growth_bytes_bucket{le="4.194304e+06",task="app.leak"} 10.0' in text
    assert 'celery_memguard_task_memory_growth_bytes_bucket{le="1.048576e+06",task="app.leak"} 0.0' in text
    from celery_memguard.metrics import status_document  # noqa: PLC0415

    tasks = status_document(daemon.view)["tasks"]
    assert [(t["task"], t["leaky"]) for t in tasks] == [("app.leak", True), ("app.noop", False)]


def _leak_reports(daemon: Daemon, pid: int, index: int, n: int, step: int, start: int = 50 * MiB,
                  every: float = 0.1) -> None:
    for i in range(n):
        rss = start + (i + 1) * step
        daemon.receive(dgram(messages.TaskEnd(pid=pid, ppid=MAIN, index=index, task="app.leak",
                                          id=f"{pid}-{i}", rss_before=rss - step, rss=rss,
                                          tasks=i + 1, ok=True)), i * every)


def test_a_steady_leak_is_exported_with_its_rate_time_to_limit_and_advice(procs: FakeProcs) -> None:
    daemon = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.ChildHello(pid=KID1, ppid=MAIN, index=1, tasks=0, rss=50 * MiB)), 0.0)
    _leak_reports(daemon, KID0, 0, 60, 1 * MiB)  # 1 MiB a task, 10 tasks a second
    procs.table[KID0].rss = 110 * MiB  # what the tick reads: where the reports left it
    daemon.tick(6.0)
    text = daemon.metrics.render().decode()
    leak = next(c for c in daemon.view.snapshot.workers[0].children if c.index == 0).leak
    assert leak is not None
    assert leak.trend.leaking
    assert abs(leak.trend.bytes_per_task - MiB) < 0.05 * MiB
    assert abs(leak.trend.bytes_per_second - 10 * MiB) < 0.5 * MiB
    assert leak.tasks_to_soft is not None
    assert leak.tasks_to_soft == pytest.approx(512 - 110)
    assert 'celery_memguard_child_leaking{index="0",worker="w@h"} 1.0' in text
    assert 'celery_memguard_child_seconds_to_limit{index="0",worker="w@h"}' in text
    # a fresh child holds 50 MiB; at 1 MiB a task, 461 tasks stay under 512 MiB
    assert 'celery_memguard_recommended_max_tasks_per_child{worker="w@h"} 461.0' in text


def test_a_leaking_childs_uss_is_read_now_and_then_and_every_tick_near_a_limit(
        procs: FakeProcs, monkeypatch: pytest.MonkeyPatch) -> None:
    """USS of a leaking child is only shown: read every LEAKING_USS_EVERY, kept between. Where
    it decides (measure uss near the soft limit), it is read on every tick."""
    from celery_memguard.daemon import LEAKING_USS_EVERY  # noqa: PLC0415

    reads: list[int] = []
    original = procs.uss_pss
    monkeypatch.setattr(procs, "uss_pss", lambda pid: reads.append(pid) or original(pid))
    daemon = make(procs, limits={"soft": "512MiB", "hard": "1GiB", "measure": "uss"})
    daemon.receive(dgram(hello()), 0.0)
    _leak_reports(daemon, KID0, 0, 60, 1 * MiB)
    procs.table[KID0].rss, procs.table[KID0].uss = 110 * MiB, 100 * MiB
    daemon.tick(6.0)  # the trend says leaking from this tick on
    assert reads == []
    ticks = [7.0 + n for n in range(int(LEAKING_USS_EVERY) + 2)]
    for now in ticks:
        daemon.tick(now)
        text = daemon.metrics.render().decode()
        assert 'celery_memguard_child_uss_bytes{index="0",worker="w@h"} 1.048576e+08' in text
    assert reads.count(KID0) == 2  # at 7 s and again at 17 s, not on the ticks between
    assert KID1 not in reads  # neither leaking nor near a limit
    reads.clear()
    procs.table[KID0].rss = 600 * MiB  # past soft by RSS: USS (100 MiB) decides now
    for now in (ticks[-1] + 1, ticks[-1] + 2, ticks[-1] + 3):
        daemon.tick(now)
    assert reads.count(KID0) == 3


def test_a_child_that_stopped_growing_is_not_leaking_and_has_no_time_to_limit(procs: FakeProcs) -> None:
    daemon = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    daemon.receive(dgram(hello()), 0.0)
    _leak_reports(daemon, KID0, 0, 15, 2 * MiB)  # warm-up: 30 MiB over 15 tasks
    for i in range(15, 60):
        daemon.receive(dgram(messages.TaskEnd(pid=KID0, ppid=MAIN, index=0, task="app.cache", id=str(i),
                                          rss_before=80 * MiB, rss=80 * MiB, tasks=i + 1, ok=True)),
                       i * 0.1)
    daemon.tick(6.0)
    text = daemon.metrics.render().decode()
    assert 'celery_memguard_child_leaking{index="0",worker="w@h"} 0.0' in text
    assert "celery_memguard_child_seconds_to_limit{" not in text
    assert "celery_memguard_recommended_max_tasks_per_child{" not in text


def test_the_report_names_the_leaking_task_and_the_advice(procs: FakeProcs) -> None:
    from rich.console import Console  # noqa: PLC0415

    from celery_memguard.metrics import status_document  # noqa: PLC0415
    from celery_memguard.render import report_tables  # noqa: PLC0415

    daemon = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(messages.ChildHello(pid=KID1, ppid=MAIN, index=1, tasks=0, rss=50 * MiB)), 0.0)
    _leak_reports(daemon, KID0, 0, 60, 1 * MiB)
    daemon.tick(6.0)
    console = Console(width=200, record=True)
    report_tables(status_document(daemon.view), console)
    out = console.export_text()
    assert "leaking task: app.leak" in out
    assert "--max-tasks-per-child 461" in out
    assert "leaking" in out.split("Child trends")[1]


def test_a_storm_is_warned_once_with_its_figures(procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    for pid in (KID0, KID1):
        procs.table[pid].rss = 150 * MiB
    for t in range(4):
        daemon.tick(float(t))
    storms = [e for e in logs if e["event"] == "recycle_storm"]
    assert len(storms) == 1
    assert storms[0]["rss_bytes"] == [150 * MiB, 150 * MiB]
    assert storms[0]["soft_bytes"] == 100 * MiB
    procs.table[KID0].rss = 50 * MiB
    daemon.tick(5.0)
    procs.table[KID0].rss = 150 * MiB
    daemon.tick(6.0)
    assert len([e for e in logs if e["event"] == "recycle_storm"]) == 2  # calmed, then again


def test_a_storm_is_not_warned_again_when_the_pool_is_empty_between_recycles(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Both children gone a moment before their replacements: the pool has not calmed down."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    for pid in (KID0, KID1):
        procs.table[pid].rss = 150 * MiB
    daemon.tick(0.0)
    for pid in (KID0, KID1):
        del procs.table[pid]
    daemon.tick(1.0)
    procs.add(13, MAIN, rss=150 * MiB)
    daemon.receive(dgram(messages.ChildHello(pid=13, ppid=MAIN, index=0, tasks=1, rss=150 * MiB)), 1.5)
    daemon.tick(2.0)
    assert [c.pid for w in daemon.view.snapshot.workers for c in w.children] == [13]
    assert len([e for e in logs if e["event"] == "recycle_storm"]) == 1


def batch(pid: int, first: int, *ends: tuple[str, float, float, int], index: int | None = None,
          ) -> messages.TaskBatch:
    """A child's batch of task ends: (task name, RSS before and after in MiB, age in ms)."""
    names = tuple(dict.fromkeys(name for name, *_ in ends))
    return messages.TaskBatch(
        pid=pid, ppid=MAIN, index=index if index is not None else pid - KID0, first=first,
        names=names, ends=tuple((names.index(name), int(before * MiB), int(after * MiB), 1, age)
                                for name, before, after, age in ends))


def test_a_batch_of_task_ends_is_folded_in_task_order(procs: FakeProcs) -> None:
    """Each end counts: the task count, the growth by name, the leak history at its own time."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(batch(KID0, 1, ("app.a", 50, 52, 300), ("app.b", 52, 52, 200),
                               ("app.a", 52, 54, 0))), 10.0)
    child = daemon.state.workers[MAIN].children[KID0]
    assert (child.tasks, child.rss, child.reported_end) == (3, 54 * MiB, True)
    assert list(child.growth) == [2 * MiB, 0, 2 * MiB]
    assert (daemon.state.growth["app.a"].count, daemon.state.growth["app.b"].count) == (2, 1)
    assert child.history.last_at == 10.0
    assert len(child.history) == 3
    assert daemon.state.messages["task_batch"] == 1


def test_ages_that_would_put_a_batch_before_the_last_one_keep_the_history_in_order(
        procs: FakeProcs) -> None:
    """Two batches read at different delays: the history never goes back in time."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(batch(KID0, 1, ("app.a", 50, 52, 0))), 10.0)
    daemon.receive(dgram(batch(KID0, 2, ("app.a", 52, 54, 500))), 10.2)
    child = daemon.state.workers[MAIN].children[KID0]
    assert len(child.history) == 2
    assert child.history.last_at == 10.0


def test_a_running_task_is_shown_until_a_batch_ends_it_and_a_late_announcement_is_stale(
        procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    running = messages.TaskRunning(pid=KID0, ppid=MAIN, index=0, task="app.slow", id="t6",
                               rss=60 * MiB, tasks=5)
    daemon.receive(dgram(running), 1.0)
    assert daemon.state.workers[MAIN].children[KID0].task == "app.slow"
    daemon.receive(dgram(batch(KID0, 6, ("app.slow", 60, 61, 0))), 2.0)
    assert daemon.state.workers[MAIN].children[KID0].task is None
    daemon.receive(dgram(running), 2.1)  # its task ended already: the announcement came late
    assert daemon.state.workers[MAIN].children[KID0].task is None


def test_a_batch_that_ends_over_the_limit_is_acted_on_at_once(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(batch(KID0, 1, ("app.a", 98, 99, 20), ("app.a", 99, 101, 0))), 0.1)
    assert procs.signals == [(KID0, 38)]


def _grant_file(daemon: Daemon) -> dict[str, Any]:
    import json  # noqa: PLC0415

    path = Path(f"{daemon.config.agent.socket}.grant.{MAIN}")
    return dict(json.loads(path.read_text()))


def test_the_tick_publishes_each_agent_workers_grant(procs: FakeProcs) -> None:
    """Two children, half the pool may go at once: one unit, for the worker by pid and start."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert _grant_file(daemon) == {"v": 1, "worker": [MAIN, MAIN * 10], "grant": 1, "taken": []}


def test_no_grant_is_published_in_a_dry_run(procs: FakeProcs) -> None:
    daemon = make(procs, recycle={"dry_run": True})
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert _grant_file(daemon)["grant"] == 0


def test_an_agentless_worker_gets_no_grant_file(socket_dir: Path) -> None:
    procs = FakeProcs()
    procs.add(20, 1, name="plain@h")
    procs.add(21, 20)
    make(procs).tick(0.0)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_unit_a_child_took_counts_as_one_recycle_by_the_agent(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Collected from the grant file on the tick, then announced by the child's exit: once."""

    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    path = f"{daemon.config.agent.socket}.grant.{MAIN}"
    assert grants.take(path, KID0, (MAIN, MAIN * 10), "soft")
    assert not grants.take(path, KID1, (MAIN, MAIN * 10), "soft")
    daemon.tick(1.0)
    assert daemon.state.recycles[("w@h", "soft")] == 1
    assert daemon.state.workers[MAIN].children[KID0].requested_at == 1.0
    assert _grant_file(daemon)["grant"] == 0  # KID0 is still on its way out
    daemon.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=9, reason="soft")), 1.2)
    assert daemon.state.recycles[("w@h", "soft")] == 1
    assert _grant_file(daemon)["grant"] == 1  # it left: the next unit is out at once
    assert procs.signals == []
    [event] = [e for e in logs if e["event"] == "recycle_requested"]
    assert event | {"worker": "w@h", "pid": KID0, "reason": "soft", "by": "agent"} == event


def test_an_exit_under_a_grant_seen_first_is_counted_and_the_file_later_is_not(
        procs: FakeProcs) -> None:

    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    path = f"{daemon.config.agent.socket}.grant.{MAIN}"
    assert grants.take(path, KID1, (MAIN, MAIN * 10), "predicted")
    daemon.receive(dgram(messages.ChildExit(pid=KID1, ppid=MAIN, index=1, tasks=9,
                                        reason="predicted")), 0.5)
    daemon.tick(1.0)
    assert daemon.state.recycles == {("w@h", "predicted"): 1}
    assert daemon.state.requests["w@h"] == deque([0.5])


def test_a_gone_worker_s_grant_file_is_removed(procs: FakeProcs, socket_dir: Path) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert [p.name for p in socket_dir.glob("*.grant.*")] == [f"agent.sock.grant.{MAIN}"]
    for pid in (MAIN, KID0, KID1):
        del procs.table[pid]
    daemon.tick(1.0)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_child_first_seen_less_than_min_lifetime_ago_is_held(procs: FakeProcs,
                                                               logs: list[dict[str, Any]]) -> None:
    daemon = make(procs, recycle={"min_lifetime": "5s"})
    daemon.receive(dgram(hello()), 0.0)
    daemon.receive(dgram(task_end(KID0, 150, tasks=1)), 1.0)
    assert procs.signals == []
    assert [e["held_by"] for e in logs if e["event"] == "recycle_held"] == ["min_lifetime"]
    daemon.receive(dgram(task_end(KID0, 152, tasks=2)), 5.0)
    assert procs.signals == [(KID0, 38)]


def test_a_recycle_a_child_did_on_its_own_is_exported_at_once(procs: FakeProcs) -> None:
    """Not at the next tick: its exit is published with the counters it changed."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    daemon.receive(dgram(messages.ChildExit(pid=KID0, ppid=MAIN, index=0, tasks=9, reason="soft")), 0.5)
    assert b'celery_memguard_recycles_total{reason="soft",worker="w@h"} 1.0' in daemon.metrics.render()


def _take(daemon: Daemon, pid: int, reason: str = "soft") -> None:

    path = f"{daemon.config.agent.socket}.grant.{MAIN}"
    assert grants.take(path, pid, (MAIN, MAIN * 10), reason)


def test_a_unit_taken_by_a_child_already_gone_is_still_counted(procs: FakeProcs) -> None:
    """Its exit message lost (a daemon restarting, say), the grant file still tells."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    _take(daemon, KID0)
    del procs.table[KID0]
    daemon.tick(1.0)
    assert daemon.state.recycles == {("w@h", "soft"): 1}


def test_the_daemon_does_not_signal_a_child_that_took_a_unit_meanwhile(
        procs: FakeProcs, logs: list[dict[str, Any]]) -> None:
    """Idle and over soft on the tick: the daemon would ask it, but it is leaving on its own."""
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    procs.table[KID0].rss = 150 * MiB
    daemon.receive(dgram(messages.ChildHello(pid=KID0, ppid=MAIN, index=0, tasks=3, rss=150 * MiB)), 0.0)
    daemon.tick(0.0)
    daemon.tick(1.0)
    _take(daemon, KID0)
    daemon.tick(3.0)  # recycle.grace has passed: the tick would act now
    assert procs.signals == []
    assert daemon.state.recycles == {("w@h", "soft"): 1}
    assert [e.get("by") for e in logs if e["event"] == "recycle_requested"] == ["agent"]


def test_a_hard_exit_and_a_unit_taken_for_the_same_child_count_one_recycle(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    _take(daemon, KID1)
    daemon.receive(dgram(messages.ChildExit(pid=KID1, ppid=MAIN, index=1, tasks=4, reason="hard")), 0.5)
    daemon.tick(1.0)
    assert daemon.state.recycles == {("w@h", "hard"): 1}


def test_a_worker_saying_goodbye_takes_its_grant_file_with_it(procs: FakeProcs,
                                                              socket_dir: Path) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert list(socket_dir.glob("*.grant.*"))
    daemon.receive(dgram(messages.WorkerBye(pid=MAIN)), 0.5)
    assert list(socket_dir.glob("*.grant.*")) == []


def test_a_reload_to_a_dry_run_withdraws_the_grants_at_once(procs: FakeProcs) -> None:
    daemon = make(procs)
    daemon.receive(dgram(hello()), 0.0)
    daemon.tick(0.0)
    assert _grant_file(daemon)["grant"] == 1
    dry = daemon.config.model_copy(update={"recycle": daemon.config.recycle.model_copy(
        update={"dry_run": True})})
    daemon._reload = lambda: dry
    daemon.handle_reload()
    assert _grant_file(daemon)["grant"] == 0


def test_a_child_older_than_min_lifetime_when_first_seen_is_not_held(procs: FakeProcs) -> None:
    """A restarted daemon takes a child's age from its start, not from when it first saw it."""
    procs.age = lambda start: 60.0  # type: ignore[method-assign]
    daemon = make(procs, recycle={"min_lifetime": "30s"})
    daemon.receive(dgram(hello()), 100.0)
    daemon.receive(dgram(task_end(KID0, 150, tasks=7)), 100.1)
    assert procs.signals == [(KID0, 38)]


@pytest.mark.parametrize("concurrency", [2, 8])
def test_the_daemon_jitters_a_child_only_where_its_pool_recycles_two_at_once(
        procs: FakeProcs, concurrency: int) -> None:
    """The same child at 1 % under the limit: at concurrency 2 (one child at a time under the
    default share) it stays, and the over-soft clock does not start; in a pool of 8 its
    jittered threshold is under that figure (this pid's share is known) and it is asked."""
    daemon = make(procs, recycle={"jitter": "20%"})
    start = procs.table[KID0].start
    threshold = rules.jittered(100 * MiB, 0.2, KID0, start)
    assert threshold < 99 * MiB  # the fixture's pid and start time draw a share over 5 %
    daemon.receive(dgram(hello(concurrency=concurrency)), 0.0)
    daemon.receive(dgram(task_end(KID0, 99)), 0.0)
    asked = procs.signals == [(KID0, 38)]
    assert asked is (concurrency == 8)
    child = next(iter(daemon.state.workers.values())).children[KID0]
    assert (child.over_soft_since is not None) is (concurrency == 8)
