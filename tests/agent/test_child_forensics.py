"""A pool child traces when the daemon's request names it, and tracing changes no task."""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from celery_memguard.agent import job_loop, tracing
from celery_memguard.agent.child_agent import ChildAgent
from celery_memguard.agent.code_paths import Frame, Key
from celery_memguard.protocol import forensics, messages, paths
from tests.apps import leak_helpers
from tests.builders import MiB
from tests.fakes import RecordingSender

HELPERS = str(Path(leak_helpers.__file__).resolve())


def _agent(tmp_path: Path) -> tuple[ChildAgent, RecordingSender]:
    agent = ChildAgent(0, str(tmp_path / "agent.sock"))
    sender = agent.sender = RecordingSender()  # type: ignore[assignment]
    return agent, sender


def _ask(agent: ChildAgent, calls: int = 3, child: tuple[int, int] | None = None,
         until: float | None = None, rid: str = "r1", tool: str = "tracemalloc") -> None:
    """What the daemon does: write the request for the worker, signal the child."""
    request = forensics.Request(id=rid, task="app.leak", child=child or (agent.pid,
                                                                         agent.start_ticks),
                                calls=calls, frames=10, tool=tool,
                                until=time.time() + 60 if until is None else until)
    Path(paths.trace_path(agent.socket_path, agent.ppid)).write_bytes(
        forensics.encode(agent.worker, request))
    agent.tracing.on_signal(0, None)


def _task(agent: ChildAgent, name: str, work: Any, *args: Any) -> None:
    agent.begin(name, "id", None)
    work(*args)
    agent.end(True)


def test_the_child_a_request_names_traces_the_next_calls_of_its_task(
        tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=3)
    for _ in range(3):
        _task(agent, "app.other", leak_helpers.remember, MiB // 4)
        _task(agent, "app.leak", leak_helpers.remember, MiB // 2)
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.calls, final.done, final.reason, final.task) == (3, True, "done", "app.leak")
    assert len(sender.of(messages.LeakTrace)) == 3, "one report after each traced call"
    assert agent.tracing.tracer is None
    assert not tracemalloc.is_tracing()
    top = [s for s in sender.of(messages.LeakSite) if s.trace == "r1"][-final.sites]
    assert (top.rank, top.filename, top.lineno) == (0, HELPERS, leak_helpers.leaking_line())
    assert 3 * MiB // 2 <= top.size < 3 * MiB // 2 + 64 * 1024, "the other task's kept nothing"


def test_a_request_for_another_child_or_none_is_ignored(tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, child=(agent.pid + 1, agent.start_ticks))
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    agent.tracing.on_signal(0, None)  # signalled with no file at all
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    assert agent.tracing.tracer is None
    assert sender.of(messages.LeakTrace) == []
    assert not tracemalloc.is_tracing()


def test_a_request_withdrawn_mid_trace_stops_it_and_reports_what_it_has(
        tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=5)
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    Path(paths.trace_path(agent.socket_path, agent.ppid)).unlink()
    agent.tracing.on_signal(0, None)
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.calls, final.done, final.reason) == (1, True, "cancelled")
    assert not tracemalloc.is_tracing()


def test_a_leaving_child_reports_what_it_has_before_its_exit(tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=10)
    for _ in range(2):
        _task(agent, "app.leak", leak_helpers.remember, 64 * 1024)
    sender.sent.clear()
    with pytest.raises(SystemExit):
        agent.leave()
    kinds = [type(m).__name__ for m in sender.sent]
    assert kinds.index("LeakTrace") < kinds.index("ChildExit")
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.calls, final.done, final.reason) == (2, True, "leaving")
    assert sender.of(messages.LeakSite)[0].filename == HELPERS
    assert not tracemalloc.is_tracing()


def test_a_request_past_its_time_ends_at_the_next_task(tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, until=time.time() - 1)
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    [final] = sender.of(messages.LeakTrace)
    assert (final.calls, final.done, final.reason) == (0, True, "expired")
    assert agent.tracing.tracer is None


class _Statm:
    def __init__(self) -> None:
        self.value = 100 * MiB

    def rss(self) -> int:
        return self.value


class _Growing:
    """A tool whose own memory grows by 1 MiB with every call it traces; it sees nothing."""

    name = "scripted"
    in_body = True

    def __init__(self, statm: _Statm) -> None:
        self.statm, self.held = statm, 0

    def start(self) -> None:
        pass

    def before_call(self) -> None:
        pass

    def after_call(self) -> object:
        return None

    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        return {}

    def overhead(self) -> int:
        return self.held

    def user(self, frame: Frame) -> bool:
        return True

    def stop(self) -> None:
        self.held = 0


def test_the_tracers_own_memory_is_left_out_of_what_the_child_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A traced call whose process grew only by the tracer's memory left nothing behind."""
    agent, sender = _agent(tmp_path)
    statm = agent.statm = _Statm()  # type: ignore[assignment]
    tool = _Growing(statm)
    monkeypatch.setattr(tracing, "make_tool", lambda request: tool)
    _ask(agent, calls=3)

    def grow_tracer_only() -> None:
        tool.held += MiB
        statm.value += MiB

    def leak_too() -> None:
        grow_tracer_only()
        statm.value += 2 * MiB

    for work in (grow_tracer_only, leak_too, grow_tracer_only):
        _task(agent, "app.leak", work)
    agent.on_park()
    ends = [end for batch in sender.of(messages.TaskBatch) for end in batch.ends]
    assert [after - before for _, before, after, _, _ in ends] == [0, 2 * MiB, 0]
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.rss_growth, final.tracer_bytes) == (2 * MiB, 3 * MiB)


class _Broken(_Growing):
    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        raise RuntimeError("no snapshot today")


def _job(name: str) -> tuple[int, tuple[object, ...]]:
    return (2, (7, 0, print, (name, "t1", {}, b"", None, None), {}))


def test_a_failing_tracer_changes_no_result_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent, sender = _agent(tmp_path)
    monkeypatch.setattr(tracing, "make_tool", lambda request: _Broken(_Statm()))
    _ask(agent, calls=3)
    jobs = iter([_job("app.leak"), _job("app.leak"), None])
    wait = job_loop.wrap_wait_for_job(agent, lambda: next(jobs),
                                   lambda job: (job[1][3][0], "t1", None))  # type: ignore[index]
    result = (1, ValueError("the task's own"), 0.1)
    prepare = job_loop.wrap_prepare_result(agent, lambda r: r)
    assert wait() == _job("app.leak")
    assert prepare(result) is result
    assert wait() == _job("app.leak")
    assert prepare(result) is result
    [final] = sender.of(messages.LeakTrace)
    assert (final.done, final.reason) == (True, "error: RuntimeError: no snapshot today")
    assert agent.tracing.tracer is None


def test_a_tool_missing_in_the_worker_is_reported_as_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """memray named in the daemon's config, not installed beside the worker: the daemon hears why."""
    agent, sender = _agent(tmp_path)

    def missing(request: object) -> None:
        raise ModuleNotFoundError("No module named 'memray'")

    monkeypatch.setattr(tracing, "make_tool", missing)
    _ask(agent, tool="memray")
    _task(agent, "app.leak", leak_helpers.remember, 1000)
    [final] = sender.of(messages.LeakTrace)
    assert (final.calls, final.done, final.tool) == (0, True, "memray")
    assert final.reason == "error: ModuleNotFoundError: No module named 'memray'"
    assert agent.tracing.tracer is None


_celerys: list[bytes] = []  # what Celery's machinery around a task keeps, in these tests


def _body(size: int) -> None:
    leak_helpers.remember(size)


def _failing_body(size: int) -> None:
    leak_helpers.remember(size)
    raise ValueError("the task's own")


def _celery_job(agent: ChildAgent, body: Any, *args: Any) -> None:
    """A job as Celery runs it: its own work around the task's body."""
    agent.begin("app.leak", "id", body.__code__)
    try:
        _celerys.append(b"\x09" * 100_000)
        body(*args)
    finally:
        agent.end(True)


def test_a_traced_call_is_the_tasks_body_not_celerys_work_around_it(
        tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=2)
    for _ in range(2):
        _celery_job(agent, _body, 200_000)
    sites = [s for s in sender.of(messages.LeakSite) if s.trace == "r1"]
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.calls, final.reason) == (2, "done")
    assert {s.filename for s in sites} == {HELPERS}, "Celery's 100 kB a call is not the task's"
    assert 400_000 <= final.traced_growth < 410_000
    assert sys.gettrace() is None


def test_a_body_that_raises_is_traced_and_its_exception_is_untouched(
        tmp_path: Path, untraced: None) -> None:
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=1)
    with pytest.raises(ValueError, match="the task's own"):
        _celery_job(agent, _failing_body, 50_000)
    final = sender.of(messages.LeakTrace)[-1]
    assert (final.calls, final.reason) == (1, "done")
    assert sender.of(messages.LeakSite)[0].filename == HELPERS
    assert sys.gettrace() is None
    assert not tracemalloc.is_tracing()


def test_a_job_whose_body_never_runs_is_no_traced_call(tmp_path: Path, untraced: None) -> None:
    """A refused (quarantined) task, or one Celery fails before its body: nothing to count, and
    the trace function is gone at the job's end."""
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=1)
    agent.begin("app.leak", "id", _body.__code__)
    assert sys.gettrace() is not None
    agent.end(False)
    assert sys.gettrace() is None
    assert sender.of(messages.LeakTrace) == []
    assert agent.tracing.tracer is not None, "still waiting for a call to trace"


def test_a_thread_traced_already_is_traced_for_the_whole_job(
        tmp_path: Path, untraced: None) -> None:
    """A debugger or coverage owns the trace function: the job is the traced call."""
    agent, sender = _agent(tmp_path)
    _ask(agent, calls=1)

    def theirs(frame: Any, event: str, arg: Any) -> None:
        return None

    sys.settrace(theirs)
    try:
        _celery_job(agent, _body, 200_000)
        assert sys.gettrace() is theirs
    finally:
        sys.settrace(None)
    final = sender.of(messages.LeakTrace)[-1]
    assert final.traced_growth >= 300_000, "Celery's 100 kB counted with the body's 200 kB"
