"""What the supervisor learns of leaks: per task name, per child, and the advice."""

from __future__ import annotations

import pytest

from celery_memguard.daemon.supervisor import Supervisor
from celery_memguard.protocol import messages
from tests.builders import KID0, KID1, MAIN, MiB, child_hello, dgram, hello
from tests.daemon.harness import make
from tests.fakes import FakeProcs


def test_task_growth_is_a_histogram_by_task_name_and_ranked_in_status(procs: FakeProcs) -> None:
    sup = make(procs)
    sup.receive(dgram(hello()), 0.0)
    for n in range(10):
        sup.receive(dgram(messages.TaskEnd(pid=KID0, ppid=MAIN, index=0, task="app.leak", id=str(n),
                                          rss_before=50 * MiB + n * 2 * MiB,
                                          rss=52 * MiB + n * 2 * MiB, tasks=n + 1, ok=True)), 0.0)
        sup.receive(dgram(messages.TaskEnd(pid=KID1, ppid=MAIN, index=1, task="app.noop", id=f"x{n}",
                                          rss_before=50 * MiB, rss=50 * MiB, tasks=n + 1, ok=True)),
                       0.0)
    sup.tick(1.0)
    text = sup.metrics.render().decode()
    assert 'celery_memguard_task_memory_growth_bytes_count{task="app.leak"} 10.0' in text
    assert "celery_memguard_task_memory_growth_bytes_sum{task=\"app.leak\"} 2.097152e+07" in text
    assert 'celery_memguard_task_memory_growth_bytes_bucket{le="4.194304e+06",task="app.leak"} 10.0' in text
    assert 'celery_memguard_task_memory_growth_bytes_bucket{le="1.048576e+06",task="app.leak"} 0.0' in text
    from celery_memguard.daemon.status import status_document  # noqa: PLC0415

    tasks = status_document(sup.view)["tasks"]
    assert [(t["task"], t["leaky"]) for t in tasks] == [("app.leak", True), ("app.noop", False)]


def _leak_reports(sup: Supervisor, pid: int, index: int, n: int, step: int, start: int = 50 * MiB,
                  every: float = 0.1) -> None:
    for i in range(n):
        rss = start + (i + 1) * step
        sup.receive(dgram(messages.TaskEnd(pid=pid, ppid=MAIN, index=index, task="app.leak",
                                          id=f"{pid}-{i}", rss_before=rss - step, rss=rss,
                                          tasks=i + 1, ok=True)), i * every)


def test_a_steady_leak_is_exported_with_its_rate_time_to_limit_and_advice(procs: FakeProcs) -> None:
    sup = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(child_hello(KID1)), 0.0)
    _leak_reports(sup, KID0, 0, 60, 1 * MiB)  # 1 MiB a task, 10 tasks a second
    procs.table[KID0].rss = 110 * MiB  # what the tick reads: where the reports left it
    sup.tick(6.0)
    text = sup.metrics.render().decode()
    leak = next(c for c in sup.view.snapshot.workers[0].children if c.index == 0).leak
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
    from celery_memguard.daemon.sampler import LEAKING_USS_EVERY  # noqa: PLC0415

    reads: list[int] = []
    original = procs.uss_pss
    monkeypatch.setattr(procs, "uss_pss", lambda pid: reads.append(pid) or original(pid))
    sup = make(procs, limits={"soft": "512MiB", "hard": "1GiB", "measure": "uss"})
    sup.receive(dgram(hello()), 0.0)
    _leak_reports(sup, KID0, 0, 60, 1 * MiB)
    procs.table[KID0].rss, procs.table[KID0].uss = 110 * MiB, 100 * MiB
    sup.tick(6.0)  # the trend says leaking from this tick on
    assert reads == []
    ticks = [7.0 + n for n in range(int(LEAKING_USS_EVERY) + 2)]
    for now in ticks:
        sup.tick(now)
        text = sup.metrics.render().decode()
        assert 'celery_memguard_child_uss_bytes{index="0",worker="w@h"} 1.048576e+08' in text
    assert reads.count(KID0) == 2  # at 7 s and again at 17 s, not on the ticks between
    assert KID1 not in reads  # neither leaking nor near a limit
    reads.clear()
    procs.table[KID0].rss = 600 * MiB  # past soft by RSS: USS (100 MiB) decides now
    for now in (ticks[-1] + 1, ticks[-1] + 2, ticks[-1] + 3):
        sup.tick(now)
    assert reads.count(KID0) == 3


def test_a_child_that_stopped_growing_is_not_leaking_and_has_no_time_to_limit(procs: FakeProcs) -> None:
    sup = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    sup.receive(dgram(hello()), 0.0)
    _leak_reports(sup, KID0, 0, 15, 2 * MiB)  # warm-up: 30 MiB over 15 tasks
    for i in range(15, 60):
        sup.receive(dgram(messages.TaskEnd(pid=KID0, ppid=MAIN, index=0, task="app.cache", id=str(i),
                                          rss_before=80 * MiB, rss=80 * MiB, tasks=i + 1, ok=True)),
                       i * 0.1)
    sup.tick(6.0)
    text = sup.metrics.render().decode()
    assert 'celery_memguard_child_leaking{index="0",worker="w@h"} 0.0' in text
    assert "celery_memguard_child_seconds_to_limit{" not in text
    assert "celery_memguard_recommended_max_tasks_per_child{" not in text


def test_the_report_names_the_leaking_task_and_the_advice(procs: FakeProcs) -> None:
    from rich.console import Console  # noqa: PLC0415

    from celery_memguard.cli.render import report_tables  # noqa: PLC0415
    from celery_memguard.daemon.status import status_document  # noqa: PLC0415

    sup = make(procs, limits={"soft": "512MiB", "hard": "1GiB"})
    sup.receive(dgram(hello()), 0.0)
    sup.receive(dgram(child_hello(KID1)), 0.0)
    _leak_reports(sup, KID0, 0, 60, 1 * MiB)
    sup.tick(6.0)
    console = Console(width=200, record=True)
    report_tables(status_document(sup.view), console)
    out = console.export_text()
    assert "leaking task: app.leak" in out
    assert "--max-tasks-per-child 461" in out
    assert "leaking" in out.split("Child trends")[1]
