"""The tracer in a child: what traced calls leave behind, attributed to the lines that keep it."""

from __future__ import annotations

import sys
import sysconfig
import tracemalloc
from pathlib import Path

import pytest

from celery_memguard.agent import code_paths
from celery_memguard.agent import forensics as agent_forensics
from celery_memguard.agent.code_paths import Frame, Key
from celery_memguard.agent.forensics import Tracer
from celery_memguard.agent.forensics_tracemalloc import TracemallocTool
from celery_memguard.protocol import messages
from celery_memguard.protocol.forensics import Request
from tests.apps import leak_helpers

KiB = 1024
HELPERS = str(Path(leak_helpers.__file__).resolve())


def _request(calls: int = 5, task: str = "app.leak", until: float = 1e12) -> Request:
    return Request(id="r1", task=task, child=(1, 1), calls=calls, frames=10,
                   tool="tracemalloc", until=until)


def _run(tracer: Tracer, name: str, work: object, *args: int) -> bool:
    """A job as a child runs it: begin, the traced code (opened, run, closed at the end)."""
    traced = tracer.begin(name)
    tracer.open()
    work(*args)  # type: ignore[operator]
    tracer.end(0)
    return traced


def test_the_helper_line_that_keeps_memory_is_the_top_site(untraced: None) -> None:
    tracer = Tracer(_request(calls=5), TracemallocTool(10))
    for _ in range(5):
        assert _run(tracer, "app.leak", leak_helpers.remember, 256 * KiB)
    assert tracer.reason == "done"
    assert not tracemalloc.is_tracing(), "stopped, its memory freed, after the last call"
    top = tracer.sites()[0]
    assert top.frame[:2] == (HELPERS, leak_helpers.leaking_line())
    assert "_store.append" in top.code
    assert 5 * 256 * KiB <= top.size < 5 * 257 * KiB
    assert top.grew == 5
    assert top.frames[0] == top.frame
    assert any(frame[0] == __file__ for frame in top.frames), "the caller, outside the helper"


def test_other_task_names_between_traced_calls_are_not_counted(untraced: None) -> None:
    tracer = Tracer(_request(calls=3), TracemallocTool(10))
    for _ in range(3):
        assert not _run(tracer, "app.other", leak_helpers.remember, 512 * KiB)
        assert _run(tracer, "app.leak", leak_helpers.churn, 64 * KiB)
    assert tracer.reason == "done"
    assert tracer.sites() == [], "the kept memory belongs to the other task name"
    assert abs(tracer.traced_growth) < 16 * KiB


def test_tracing_runs_only_during_the_traced_calls(untraced: None) -> None:
    tracer = Tracer(_request(calls=2), TracemallocTool(10))
    assert tracer.begin("app.leak")
    assert not tracemalloc.is_tracing(), "not before its traced code starts"
    tracer.open()
    assert tracemalloc.is_tracing()
    tracer.close()
    assert not tracemalloc.is_tracing(), "stopped when it returned, its traces freed"
    tracer.end(0)
    assert not tracer.begin("app.other")
    tracer.open()
    assert not tracemalloc.is_tracing(), "another task name runs untraced"
    tracer.end(0)
    assert tracer.calls == 1


def test_a_job_whose_traced_code_never_ran_is_not_a_traced_call(untraced: None) -> None:
    tracer = Tracer(_request(calls=2), TracemallocTool(10))
    assert tracer.begin("app.leak")
    assert not tracer.end(0)
    assert tracer.calls == 0


def test_a_block_a_call_keeps_counts_for_it_even_if_a_later_call_frees_it(
        untraced: None) -> None:
    """Each call is traced alone: what it left when it returned is what it kept, also a value
    the next call replaces (the RSS growth beside it tells the two apart)."""
    tracer = Tracer(_request(calls=6), TracemallocTool(10))
    for _ in range(6):
        _run(tracer, "app.leak", leak_helpers.replace, 128 * KiB)
    [site] = tracer.sites()
    assert 6 * 128 * KiB <= site.size < 6 * 130 * KiB
    assert site.grew == 6


def test_in_a_process_that_traces_already_a_replaced_block_counts_once(untraced: None) -> None:
    """There each call is the difference of two snapshots: what it frees of an earlier call's
    block counts against it."""
    tracemalloc.start(10)
    tracer = Tracer(_request(calls=6), TracemallocTool(10))
    for _ in range(6):
        _run(tracer, "app.leak", leak_helpers.replace, 128 * KiB)
    [site] = tracer.sites()
    assert site.size < 130 * KiB, "one block over six calls, not six"


def test_a_time_limit_stops_the_trace_and_keeps_what_it_has(untraced: None) -> None:
    now = [100.0]
    tracer = Tracer(_request(calls=10, until=150.0), TracemallocTool(10), wall=lambda: now[0])
    _run(tracer, "app.leak", leak_helpers.remember, 64 * KiB)
    now[0] = 151.0
    assert not tracer.begin("app.leak")
    assert tracer.reason == "expired"
    assert not tracemalloc.is_tracing()
    assert tracer.calls == 1
    assert tracer.sites()[0].size >= 64 * KiB


def test_a_process_that_traces_already_keeps_tracing(untraced: None) -> None:
    tracemalloc.start(5)
    tracer = Tracer(_request(calls=1), TracemallocTool(10))
    _run(tracer, "app.leak", leak_helpers.remember, 64 * KiB)
    assert tracer.reason == "done"
    assert tracemalloc.is_tracing()
    assert tracer.sites()[0].frame[0] == HELPERS


def test_the_tracer_memory_is_measured_and_nothing_before_the_first_call(untraced: None) -> None:
    tracer = Tracer(_request(calls=2), TracemallocTool(10))
    assert tracer.overhead() == 0
    tracer.begin("app.leak")
    tracer.open()
    leak_helpers.remember(1000)
    assert tracer.overhead() > 0
    tracer.close()
    held = tracer.overhead()
    assert held > 0, "what it held when the call returned, until the job ends"
    tracer.end(0)
    assert tracer.overhead() == 0
    assert tracer.peak_overhead == held


def test_the_report_is_valid_messages_within_a_datagram(untraced: None) -> None:
    tracer = Tracer(_request(calls=2), TracemallocTool(10))
    for _ in range(2):
        _run(tracer, "app.leak", leak_helpers.remember, 64 * KiB)
    report = tracer.report(11, 10, 0)
    *sites, trace = report
    assert isinstance(trace, messages.LeakTrace)
    assert (trace.calls, trace.wanted, trace.done, trace.reason, trace.sites) == (
        2, 2, True, "done", len(sites))
    for message in report:
        data = messages.encode(message)
        assert len(data) < messages.MAX_DATAGRAM
        assert messages.decode(data) == message


# -- grouping, with a scripted tool ---------------------------------------------------------

class Scripted:
    """A tool whose calls leave what the test says; user code is any file under app/."""

    name = "scripted"
    in_body = True

    def __init__(self, calls: list[dict[Key, tuple[int, int]]]) -> None:
        self.calls = calls

    def start(self) -> None:
        pass

    def before_call(self) -> None:
        pass

    def after_call(self) -> object:
        return self.calls.pop(0)

    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        assert isinstance(taken, dict)
        return taken

    def overhead(self) -> int:
        return 0

    def user(self, frame: Frame) -> bool:
        return frame[0].startswith("app/")

    def stop(self) -> None:
        pass


HELPER: Frame = ("app/helper.py", 5, "")
TASK: Frame = ("app/tasks.py", 20, "")
JSON: Frame = ("/usr/lib/python3/json/decoder.py", 353, "")
CELERY: Frame = ("/site/celery/app/trace.py", 451, "")


@pytest.mark.parametrize(("calls", "expected"), [
    ([{(HELPER, TASK, CELERY): (100, 1)}] * 3,
     [(HELPER, 300, 3, (HELPER, TASK))]),
    # json allocates what the task keeps: the task's own line is the site
    ([{(JSON, TASK, CELERY): (100, 2)}] * 2,
     [(TASK, 200, 2, (TASK,))]),
    # two tracebacks through one user line are one site
    ([{(HELPER, TASK, CELERY): (100, 1), (JSON, HELPER, TASK): (50, 1)}] * 2,
     [(HELPER, 300, 2, (HELPER, TASK))]),
    # a site whose calls kept nothing net is no site
    ([{(HELPER, TASK): (100, 1)}, {(HELPER, TASK): (-100, -1)}], []),
    # no frame of the user's: the innermost frame
    ([{(JSON, CELERY): (10, 1)}], [(JSON, 10, 1, (JSON, CELERY))]),
])
def test_sites_group_tracebacks_by_their_innermost_user_frame(
        calls: list[dict[Key, tuple[int, int]]],
        expected: list[tuple[Frame, int, int, Key]]) -> None:
    tracer = Tracer(_request(calls=len(calls)), Scripted(list(calls)))
    for _ in calls:
        tracer.begin("app.leak")
        tracer.open()
        tracer.end(0)
    assert [(s.frame, s.size, s.grew, s.frames) for s in tracer.sites()] == expected


def test_sites_are_ranked_by_what_they_kept_and_cut_to_the_top() -> None:
    left = {((f"app/m{i}.py", i, ""),): (i * 10, 1) for i in range(1, 15)}
    tracer = Tracer(_request(calls=1), Scripted([left]))
    tracer.begin("app.leak")
    tracer.open()
    tracer.end(0)
    assert [s.frame[1] for s in tracer.sites(top=3)] == [14, 13, 12]
    assert tracer.traced_growth == sum(i * 10 for i in range(1, 15))


@pytest.mark.parametrize(("rss_growth", "kept"), [
    (0, [1000]),  # 9 of 1009 traced: under 1 %
    (100_000, [1000]),  # beside an RSS growth of 100 kB, 9 bytes is not where it went
    (100_000_000, []),  # a native leak: no Python line kept a share of it
])
def test_a_site_that_kept_under_one_percent_of_the_growth_is_left_out(
        rss_growth: int, kept: list[int]) -> None:
    left = {(("app/a.py", 1, ""),): (1000, 1), (("app/b.py", 2, ""),): (9, 1)}
    tracer = Tracer(_request(calls=1), Scripted([left]))
    tracer.begin("app.leak")
    tracer.open()
    tracer.end(rss_growth)
    assert [s.size for s in tracer.sites()] == kept


def test_the_tracer_keeps_the_largest_tracebacks_when_they_are_too_many() -> None:
    left = {((f"app/m{i}.py", i, ""),): (i, 1) for i in range(agent_forensics.KEPT_TRACEBACKS + 1)}
    tracer = Tracer(_request(calls=1), Scripted([left]))
    tracer.begin("app.leak")
    tracer.open()
    tracer.end(0)
    assert len(tracer.left) == agent_forensics.KEPT_TRACEBACKS // 2
    assert max(entry.size for entry in tracer.left.values()) == agent_forensics.KEPT_TRACEBACKS
    assert (("app/m1.py", 1, ""),) not in tracer.left


STDLIB = sysconfig.get_paths()["stdlib"]


@pytest.mark.parametrize(("filename", "user"), [
    (f"{STDLIB}/json/decoder.py", False),
    ("<frozen importlib._bootstrap>", False),
    (str(Path(sys.modules["celery"].__file__ or "").parent / "app" / "trace.py"), False),
    (str(Path(sys.modules["billiard"].__file__ or "").parent / "pool.py"), False),
    (str(Path(agent_forensics.__file__).resolve()), False),
    (HELPERS, True),
    (str(Path(sys.modules["pytest"].__file__ or "").parent / "x.py"), True),  # site-packages
])
def test_what_counts_as_the_users_code(filename: str, user: bool) -> None:
    assert code_paths.where().user(filename) is user


@pytest.mark.parametrize(("value", "left", "expected"), [
    ("a.py", True, "a.py"),
    ("x" * 250 + "/mod.py", True, "…" + ("x" * 250 + "/mod.py")[-199:]),
    ("y" * 250, False, "y" * 199 + "…"),
    ("tab\there", False, "tabhere"),
])
def test_text_fits_a_message(value: str, left: bool, expected: str) -> None:
    assert agent_forensics._text(value, left=left) == expected
    assert len(expected) <= messages.MAX_NAME


@pytest.mark.parametrize(("frame", "user"), [
    (("/src/native_leak.c", 8, "native_keep"), True),  # a library's function: where it went
    (("<unknown>", 0, "CRYPTO_malloc"), True),
    (("Objects/obmalloc.c", 2003, "_PyObject_Malloc"), False),  # the interpreter
    (("/tmp/build/Python-3.11.7/Modules/_ctypes/callproc.c", 923, "_call_function_pointer"),
     False),
    (("<unknown>", 0, "ffi_call"), False),
    (("<unknown>", 0, "<unknown>"), False),
    (("<unknown>", 0, "malloc"), False),
    ((HELPERS, 11, "remember"), True),  # a Python frame: as for tracemalloc
    ((sysconfig.get_paths()["stdlib"] + "/json/decoder.py", 353, "raw_decode"), False),
])
def test_what_counts_as_the_users_code_in_a_native_stack(frame: Frame, user: bool) -> None:
    memray_tool = pytest.importorskip(
        "celery_memguard.agent.forensics_memray",
        reason="memray is not installed (pip install celery-memguard[memray])")
    assert memray_tool.MemrayTool(10).user(frame) is user
