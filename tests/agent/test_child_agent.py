"""A pool child's verdict on its own task-end report: leave under a grant, ring, or nothing."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from celery_memguard.agent import job_loop
from celery_memguard.agent.child_agent import RETAKE_SECONDS, ChildAgent
from celery_memguard.agent.quarantine import Guard
from celery_memguard.errors import MemoryLimitExceeded
from celery_memguard.protocol import grants, messages, paths, quarantine, settings
from celery_memguard.protocol.signals import CONTAINER_SIGNAL, EX_RECYCLE
from tests.builders import MiB
from tests.fakes import RecordingSender


def _agent(tmp_path: Path, threshold_mib: float = 100, grant: int = 1, **settings: object) -> ChildAgent:
    """A child agent of this process with a soft threshold, and a grant file for its worker."""
    agent = ChildAgent(0, str(tmp_path / "agent.sock"))
    agent.soft_threshold = int(threshold_mib * MiB)
    agent.born = -1000.0  # old enough for any minimum lifetime
    for name, value in settings.items():
        setattr(agent, name, value)
    if grant >= 0:
        assert grants.exchange(agent.grant_path, agent.worker, grant) == []
    return agent


def _taken(agent: ChildAgent) -> list[tuple[int, str]] | None:
    return grants.exchange(agent.grant_path, agent.worker, 0)


def test_a_report_under_the_threshold_calls_for_nothing(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert [agent.verdict(n * MiB, 0.0) for n in range(90, 100)] == [None] * 10
    assert not agent.recycle_requested
    assert _taken(agent) == []


def test_past_the_threshold_with_a_grant_the_child_leaves_after_its_task(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    assert agent.verdict(100 * MiB, 0.0) == "self"
    assert agent.recycle_requested
    assert agent.exit_reason == "soft"
    assert _taken(agent) == [(os.getpid(), "soft")]


def test_with_the_grant_used_up_the_child_rings_once_then_retries_quietly(tmp_path: Path) -> None:
    """The daemon decides for a child it did not grant; a held child tries again now and then."""
    agent = _agent(tmp_path, grant=0)
    assert agent.verdict(101 * MiB, 0.0) == "ring"
    assert agent.verdict(102 * MiB, 0.0) is None  # too soon to try again
    assert agent.verdict(103 * MiB, RETAKE_SECONDS) is None  # tried, no grant: rung already
    assert not agent.recycle_requested
    assert grants.exchange(agent.grant_path, agent.worker, 1) == []
    assert agent.verdict(104 * MiB, 2 * RETAKE_SECONDS) == "self"


def test_a_missing_grant_file_means_the_daemon_decides(tmp_path: Path) -> None:
    agent = _agent(tmp_path, grant=-1)
    assert agent.verdict(150 * MiB, 0.0) == "ring"
    assert not agent.recycle_requested


def test_in_a_dry_run_the_child_never_leaves_on_its_own(tmp_path: Path) -> None:
    agent = _agent(tmp_path, dry_run=True)
    assert agent.verdict(150 * MiB, 0.0) == "ring"
    assert not agent.recycle_requested
    assert _taken(agent) == []


def test_with_uss_or_pss_as_the_measure_the_daemon_decides(tmp_path: Path) -> None:
    """RSS past the threshold says nothing certain about USS: the daemon reads it."""
    for measure in ("uss", "pss"):
        agent = _agent(tmp_path, measure=measure)
        assert agent.verdict(150 * MiB, 0.0) == "ring"
        assert not agent.recycle_requested


def test_a_young_child_does_not_leave_for_its_soft_limit_only_past_the_hard_one(
        tmp_path: Path) -> None:
    agent = _agent(tmp_path, min_lifetime=5.0, hard=200 * MiB)
    agent.born = 0.0
    assert agent.verdict(150 * MiB, 1.0) == "ring"
    assert not agent.recycle_requested
    assert agent.verdict(201 * MiB, 1.0 + RETAKE_SECONDS) == "self"


def test_a_child_that_max_tasks_will_recycle_soon_leaves_it_to_billiard(tmp_path: Path) -> None:
    agent = _agent(tmp_path, max_tasks=100, skip_within_tasks=2)
    agent.tasks = 98
    assert agent.verdict(150 * MiB, 0.0) == "ring"
    assert not agent.recycle_requested
    agent.tasks = 97
    assert agent.verdict(150 * MiB, RETAKE_SECONDS) == "self"


def test_predictive_recycling_leaves_before_the_crossing(tmp_path: Path) -> None:
    """With a look-ahead of two tasks of 2 MiB each, 97 MiB against 100 MiB is near enough."""
    agent = _agent(tmp_path, ahead=2)
    agent.left.recent.extend([2 * MiB] * 4)
    assert agent.verdict(95 * MiB, 0.0) is None  # 95 + 2 * 2 < 100
    assert agent.verdict(97 * MiB, 0.0) == "self"
    assert agent.exit_reason == "predicted"
    assert _taken(agent) == [(os.getpid(), "predicted")]


def test_without_a_published_soft_limit_nothing_is_called_for(tmp_path: Path) -> None:
    agent = _agent(tmp_path, threshold_mib=0)
    assert agent.verdict(2000 * MiB, 0.0) is None


def test_a_young_batch_is_sent_when_the_watch_parks(tmp_path: Path) -> None:
    """Nothing may wait for a next task that never comes."""
    agent = _agent(tmp_path)
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.begin("app.a", "t1", None)
    agent.end(True)
    assert sender.sent == []  # too young to go on its own
    agent.on_park()
    [batch] = sender.sent
    assert (batch.first, len(batch.ends)) == (1, 1)  # type: ignore[attr-defined]


def test_a_leaving_child_keeps_its_last_report_for_after_its_exit(tmp_path: Path) -> None:
    """The daemon must know the child is leaving before it reads the report that crossed."""
    agent = _agent(tmp_path)
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.begin("app.a", "t1", None)
    agent.rss_before = 0
    agent.soft_threshold = 1  # whatever it holds now is past it
    agent.end(True)
    assert agent.recycle_requested
    agent.on_park()
    agent._batch.opened -= 1.0  # an idle batch long due
    agent.on_poll()
    assert sender.sent == []
    with pytest.raises(SystemExit):
        agent.leave()
    assert [type(m).__name__ for m in sender.sent] == ["ChildExit", "TaskBatch", "str"]


def test_an_announcement_counts_the_tasks_ended_before_it(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    for n in range(3):
        agent.begin("app.a", f"t{n}", None)
        agent.end(True)
    agent.begin("app.slow", "t3", None)
    agent.task_started -= 1.0  # it has run a while
    agent.on_poll()
    batch, running = sender.sent
    assert (type(batch).__name__, running.tasks, running.task) == (  # type: ignore[attr-defined]
        "TaskBatch", 3, "app.slow")


def _job(name: object, task_id: str = "t1") -> tuple[int, tuple[object, ...]]:
    """A job as billiard reads it for Celery: (TASK, (job, i, fun, args, kwargs))."""
    return (2, (7, 0, print, (name, task_id, {}, b"", None, None), {}))


def _describe(job: tuple[int, tuple[object, ...]]) -> tuple[str, str, None]:
    args = job[1][3]
    assert isinstance(args, tuple)
    return str(args[0]), str(args[1]), None


def test_billiards_loop_marks_where_each_task_begins_and_ends(tmp_path: Path) -> None:
    """A job begins when it is read; it ends at prepare_result, ok unless Celery's trace
    function says the task failed; a job that raised ends at the next read, as failed."""
    agent = _agent(tmp_path)
    jobs = iter([_job("app.a", "t1"), _job("app.b", "t2"), _job("app.c", "t3"), None])
    wait = job_loop.wrap_wait_for_job(agent, lambda: next(jobs), _describe)
    prepare = job_loop.wrap_prepare_result(agent, lambda result: ("prepared", result))

    assert wait() == _job("app.a", "t1")
    assert (agent.running, agent.task_name, agent.task_id, agent.tasks) == (True, "app.a", "t1", 0)
    assert prepare((0, "result", 0.1)) == ("prepared", (0, "result", 0.1))
    assert (agent.running, agent.tasks) == (False, 1)
    wait()
    prepare((1, "ValueError()", 0.1))  # Celery's trace function: the task failed
    wait()  # app.c raised out of billiard's call: prepare_result never came
    assert wait() is None  # app.c ended here; no job, nothing begins
    assert (agent.running, agent.tasks) == (False, 3)
    batch = agent._batch
    assert [(batch.names[slot], ok) for slot, _before, _after, ok, _at in batch.ends] == [
        ("app.a", 1), ("app.b", 0), ("app.c", 0)]


def test_a_job_that_cannot_be_named_still_runs(tmp_path: Path) -> None:
    """The agent never raises into billiard's loop."""
    agent = _agent(tmp_path)

    def describe(job: object) -> tuple[str, str, None]:
        raise RuntimeError("unreadable")

    wait = job_loop.wrap_wait_for_job(agent, lambda: _job("app.a"), describe)
    assert wait() == _job("app.a")
    assert not agent.running
    assert job_loop.wrap_prepare_result(agent, lambda result: result)("r") == "r"
    assert agent.tasks == 0


def test_a_celery_job_is_named_from_its_trace_arguments() -> None:
    """Celery's prefork pool runs every task as trace(name, id, ...): the agent reads the name
    and id there, and the task body's code from the installed app's registry."""
    from celery import Celery  # noqa: PLC0415

    from celery_memguard import install  # noqa: PLC0415
    from celery_memguard.agent import pool_child  # noqa: PLC0415

    app = Celery("naming", broker="memory://")

    @app.task(name="app.job\x00name")
    def job() -> None:
        return None

    install(app, socket=str(Path("/nonexistent/agent.sock")))
    assert pool_child.describe(_job("app.job\x00name", "id-1")) == (
        "app.jobname", "id-1", job.run.__code__)
    assert pool_child.describe(_job("app.unknown", "id-2")) == ("app.unknown", "id-2", None)
    assert pool_child.describe((2, (7, 0, print, (), {}))) == ("unknown", "", None)
    assert pool_child.describe(_job(42)) == ("unknown", "", None)


def test_a_task_of_the_workers_current_app_is_named_even_if_another_was_installed() -> None:
    from celery import Celery  # noqa: PLC0415
    from celery._state import get_current_app  # noqa: PLC0415

    from celery_memguard.agent import pool_child  # noqa: PLC0415

    previous = get_current_app()
    current = Celery("current", broker="memory://")

    @current.task(name="app.only_in_the_current_app", shared=False)
    def elsewhere() -> None:
        return None

    current.set_current()
    try:
        assert pool_child.describe(_job("app.only_in_the_current_app", "id-3")) == (
            "app.only_in_the_current_app", "id-3", elsewhere.run.__code__)
    finally:
        previous.set_current()


def _task_body(x: int) -> int:
    return x + 1


def test_a_quarantined_task_fails_as_its_body_starts_and_others_run(tmp_path: Path) -> None:
    """The exception comes from inside the body, where autoretry_for and the result backend
    see it; the daemon hears of the refusal; the next task, not quarantined, runs."""
    agent = ChildAgent(0, str(tmp_path / "agent.sock"))
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.begin("app.huge", "bad-1", _task_body.__code__,
                refused="task bad-1 (app.huge) is quarantined: it was running at 2 OOM kills")
    with pytest.raises(MemoryLimitExceeded) as raised:
        _task_body(1)
    assert raised.value.reason == "quarantined"
    assert "bad-1" in str(raised.value)
    assert "2 OOM kills" in str(raised.value)
    agent.end(False)
    [refused] = [m for m in sender.sent if isinstance(m, messages.TaskInterrupted)]
    assert (refused.id, refused.reason) == ("bad-1", "quarantined")
    agent.begin("app.huge", "good-2", _task_body.__code__)
    assert _task_body(1) == 2
    agent.end(True)


def test_a_refusal_whose_body_never_starts_leaves_no_trace_behind(tmp_path: Path) -> None:
    agent = ChildAgent(0, str(tmp_path / "agent.sock"))
    agent.sender = RecordingSender()  # type: ignore[assignment]
    before = sys.gettrace()
    agent.begin("app.huge", "bad-1", _task_body.__code__, refused="quarantined")
    agent.end(False)  # Celery failed it before calling the body
    assert sys.gettrace() is before
    assert _task_body(1) == 2


def test_the_main_process_quarantines_a_task_it_saw_oom_killed_twice(tmp_path: Path) -> None:
    """Before the daemon hears of it: the kernel's counter moved at each death."""
    socket = str(tmp_path / "agent.sock")
    Path(paths.quarantine_path(socket)).write_bytes(quarantine.encode({}, 2))  # after: 2
    guard = Guard(socket)
    guard.oom.observe("self", 10, 0.0)
    guard.killed("t-1", "app.huge", 11, 1.0)
    assert guard.why("t-1", 1.0) is None
    guard.killed("t-1", "app.huge", 11, 2.0)  # a kill the kernel did not count: by hand
    assert guard.why("t-1", 2.0) is None
    guard.killed("t-1", "app.huge", 12, 3.0)
    assert guard.why("t-1", 3.0) == (
        "it was running at 2 OOM kills of its worker process (quarantine.after: 2)")
    assert guard.why("t-2", 3.0) is None


def test_the_main_process_also_follows_the_daemons_list(tmp_path: Path) -> None:
    socket = str(tmp_path / "agent.sock")
    guard = Guard(socket)
    assert guard.why("r-1", 0.0) is None
    Path(paths.quarantine_path(socket)).write_bytes(quarantine.encode(
        {"r-1": quarantine.Entry("app.runaway", 0, 3, 0.0)}, 3))
    assert guard.why("r-1", 1.0) == (
        "it was running at 3 memory interrupts of its worker process (quarantine.after: 3)")


def test_without_a_daemon_a_due_batch_is_dropped_unbuilt(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection and none to try yet: the batch is cleared, never built nor encoded; the
    next one numbers its tasks on from there, as after a batch sent."""
    agent = _agent(tmp_path, threshold_mib=0, grant=-1)
    agent.sender.send(messages.WorkerBye(pid=os.getpid()))  # the first attempt fails: retry later
    assert not agent.sender.can_send()
    encoded: list[object] = []
    monkeypatch.setattr(messages, "encode", lambda message: encoded.append(message) or b"")
    for n in range(3):
        agent.begin("app.a", f"t{n}", None)
        agent.end(True)
    agent.on_park()
    assert encoded == []
    assert agent._batch.ends == []
    agent.begin("app.a", "t3", None)
    agent.end(True)
    assert agent._batch.first == 4


def test_a_child_leaves_before_a_task_that_would_take_it_past_its_threshold(
        tmp_path: Path) -> None:
    """By what the task names it runs left behind in their recent runs here (9 in 10 runs of
    one kept 2 MiB, the other kept nothing): at 99 MiB of 100 it leaves before reading the
    next job, under a unit of the grant."""
    agent = _agent(tmp_path)
    for n in range(10):
        agent.left.add("app.keep", 2 * MiB if n else 0)
        agent.left.add("app.noop", 0)
    assert agent.left.likely() == 2 * MiB
    assert not agent.left.would_cross(97 * MiB, agent.soft_threshold)
    assert agent.left.would_cross(99 * MiB, agent.soft_threshold)
    assert agent.leave_before(99 * MiB)
    assert (agent.recycle_requested, agent.exit_reason) == (True, "soft")
    assert _taken(agent) == [(os.getpid(), "soft")]


def test_what_runs_here_is_learnt_as_it_runs(tmp_path: Path) -> None:
    """The prediction follows each run (kept until the next one ends)."""
    agent = _agent(tmp_path)
    for _ in range(6):  # a first run, then five
        agent.left.add("app.a", 1 * MiB)
    assert agent.left.likely() == 1 * MiB
    for _ in range(5):
        agent.left.add("app.b", 3 * MiB)
    assert agent.left.likely() == 1 * MiB, "app.b: a first run and four predict nothing yet"
    agent.left.add("app.b", 3 * MiB)
    assert agent.left.likely() == 3 * MiB


def test_a_first_run_that_warms_a_cache_predicts_nothing(tmp_path: Path) -> None:
    """A name whose first run here kept 4 MiB (a cache, filled once) and whose later runs keep
    nothing is not expected to leave 4 MiB again: the child does not leave early for it."""
    agent = _agent(tmp_path)
    agent.left.add("app.warm", 4 * MiB)
    for _ in range(6):
        agent.left.add("app.warm", 0)
    assert agent.left.likely() == 0
    assert not agent.leave_before(99 * MiB)


@pytest.mark.parametrize(("runs", "why"), [
    ([2 * MiB] * 5, "a first run and four more predict nothing yet"),
    ([0] * 10 + [50 * MiB], "one run in ten that kept memory is not the 90th percentile"),
    ([-(300 * MiB)] * 10, "a spike given back leaves nothing"),
])
def test_no_leave_before_a_task_whose_growth_does_not_predict_a_crossing(
        tmp_path: Path, runs: list[int], why: str) -> None:
    agent = _agent(tmp_path)
    for grew in runs:
        agent.left.add("app.t", grew)
    assert not agent.leave_before(99 * MiB), why
    assert not agent.recycle_requested


def test_without_a_unit_of_the_grant_the_task_runs(tmp_path: Path) -> None:
    agent = _agent(tmp_path, grant=0)
    for _ in range(10):
        agent.left.add("app.keep", 2 * MiB)
    assert not agent.leave_before(99 * MiB)
    assert not agent.recycle_requested


def _growing_task(agent: ChildAgent) -> None:
    """A task's own code: the container signal arrives while it runs."""
    agent.on_container_signal(CONTAINER_SIGNAL, sys._getframe())


def test_the_container_signal_interrupts_the_task_in_its_own_code_and_the_child_leaves_after(
        tmp_path: Path) -> None:
    """The daemon's container interrupt: MemoryLimitExceeded (reason container) where the
    task's own code runs; its end reports the interrupt, and the child leaves after it."""
    agent = _agent(tmp_path)
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.begin("app.big", "t1", _growing_task.__code__)
    with pytest.raises(MemoryLimitExceeded) as raised:
        _growing_task(agent)
    assert raised.value.reason == "container"
    assert agent.recycle_requested
    agent.end(False)
    [report] = sender.of(messages.TaskInterrupted)
    assert (report.task, report.id, report.reason) == ("app.big", "t1", "container")


def test_the_container_signal_outside_the_tasks_code_only_asks_the_child_to_leave(
        tmp_path: Path) -> None:
    """Arriving in Celery's or billiard's bookkeeping (not the task's code), it raises
    nothing there: the child leaves after the task, as for a recycle."""
    agent = _agent(tmp_path)
    agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.begin("app.big", "t1", _growing_task.__code__)
    agent.on_container_signal(CONTAINER_SIGNAL, sys._getframe())  # this test's frame
    assert agent.recycle_requested
    assert agent.container_hit is None


def test_an_idle_child_given_the_container_signal_leaves_at_once(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    agent.sender = RecordingSender()  # type: ignore[assignment]
    agent.waiting = True  # blocked in billiard's read of the next job
    with pytest.raises(SystemExit) as exited:
        agent.on_container_signal(CONTAINER_SIGNAL, sys._getframe())
    assert exited.value.code == EX_RECYCLE


@pytest.mark.parametrize(("dry_run", "hold"), [(False, 30.0), (True, 0.0)])
def test_in_a_dry_run_a_child_never_waits_for_its_container(
        tmp_path: Path, dry_run: bool, hold: float) -> None:
    """A dry run acts on nothing: the published wait for room is taken as zero."""
    agent = _agent(tmp_path)
    Path(paths.settings_path(agent.socket_path)).write_bytes(settings.encode(
        settings.AgentSettings(hard=0, watch_interval=0.05, container_soft=0.85,
                               container_hold=30.0, dry_run=dry_run)))
    agent.load_settings()
    assert agent.dry_run is dry_run
    assert agent.headroom.hold_max == hold


def test_a_child_that_would_cross_waits_a_moment_for_a_unit_its_sibling_just_used_up(
        tmp_path: Path) -> None:
    """No unit left (a sibling took the last one and is leaving): the daemon grants the worker
    again once the sibling's exit reaches it, and the child leaves before the task instead of
    after it. Once in its life: with none coming, it runs the task as before."""
    agent = _agent(tmp_path, grant=0)
    for n in range(10):
        agent.left.add("app.keep", 2 * MiB if n else 0)
    agent.last_rss = 99 * MiB
    granted = threading.Timer(0.1, lambda: grants.exchange(agent.grant_path, agent.worker, 1))
    granted.start()
    started = time.monotonic()
    assert job_loop._leave_before_next(agent)
    assert 0.09 <= time.monotonic() - started < job_loop.UNIT_WAIT
    assert _taken(agent) == [(os.getpid(), "soft")]

    (tmp_path / "b").mkdir()
    other = _agent(tmp_path / "b", grant=0)
    for n in range(10):
        other.left.add("app.keep", 2 * MiB if n else 0)
    other.last_rss = 99 * MiB
    started = time.monotonic()
    assert not job_loop._leave_before_next(other)
    assert time.monotonic() - started >= job_loop.UNIT_WAIT
    started = time.monotonic()
    assert not job_loop._leave_before_next(other)
    assert time.monotonic() - started < job_loop.UNIT_WAIT / 2  # waited once already
