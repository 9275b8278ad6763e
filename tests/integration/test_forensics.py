"""Leak forensics with a real worker: the line that leaks is named, native leaks are told
apart, tracing changes no task's result, and a child recycled mid-trace reports what it has."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps import leak_helpers
from tests.support import ROOT, Daemon, Worker, wait_for

pytestmark = pytest.mark.slow

KiB = 1024
APP = "tests.apps.leaky."
HELPERS = str(Path(leak_helpers.__file__).resolve())


def _task(document: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((t for t in document["tasks"] if t["task"] == APP + name), None)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celery_memguard", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _names_the_helper(site: dict[str, Any], leak: int) -> bool:
    return (site["filename"] == HELPERS and site["lineno"] == leak_helpers.leaking_line()
            and site["share"] >= 0.8 and abs(site["bytes_per_call"] - leak) <= 0.2 * leak)


def test_the_line_a_leaking_task_keeps_its_memory_on_is_named_within_50_calls(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """A mix of tasks: one leaks through a helper in another module, one warms a cache once,
    one allocates and frees, one does nothing. Once the leaking one is flagged, one child
    traces it, and within 50 more calls the helper's line is its top site."""
    leak = 512 * KiB
    daemon = start_daemon(limits={"soft": "1GiB", "hard": "2GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    rng = random.Random(5)
    calls = 0
    flagged_at: int | None = None
    named_at: int | None = None
    complete: dict[str, Any] | None = None
    while calls < 300 and complete is None:
        mix = [("keep_via_helper", leak / KiB), ("warm", 8), ("spiky", 40), ("noop",)]
        rng.shuffle(mix)
        results = [worker.send(name, *args) for name, *args in mix]
        for result in results:  # tracing changes no task's result
            assert isinstance(result.get(timeout=60), int)
        calls += 1
        task = _task(daemon.status(), "keep_via_helper")
        if task is None:
            continue
        if flagged_at is None and task["leaky"]:
            flagged_at = calls
        if named_at is None and task["sites"] and _names_the_helper(task["sites"][0], leak):
            named_at = calls
        if task["trace"] is not None and task["trace"]["complete"]:
            complete = task
    print(f"flagged after {flagged_at} calls, the helper's line named after {named_at}, "
          f"complete after {calls}")
    assert flagged_at is not None, (calls, daemon.status()["tasks"])
    assert named_at is not None, daemon.output()
    assert named_at - flagged_at <= 50
    assert complete is not None
    assert _names_the_helper(complete["sites"][0], leak), complete["sites"][0]
    assert complete["trace"]["calls"] == 20
    assert complete["untraced_share"] is not None
    assert complete["untraced_share"] < 0.2

    report = _cli("report", "--url", daemon.url, "--json")
    assert report.returncode == 0, report.stderr
    document = json.loads(report.stdout)
    tasks = {t["task"]: t for t in document["tasks"]}
    top = tasks[APP + "keep_via_helper"]["sites"][0]
    assert _names_the_helper(top, leak), top
    assert set(top) >= {"filename", "lineno", "bytes_per_call", "share"}
    for quiet in ("warm", "spiky", "noop"):  # the plateau and the allocate-and-free: no site
        assert tasks[APP + quiet]["sites"] == []
        assert tasks[APP + quiet]["trace"] is None
    assert [r["task"] for r in document["leak_sites"]] == [APP + "keep_via_helper"]
    shown = _cli("report", "--url", daemon.url)
    assert f"leak_helpers.py:{leak_helpers.leaking_line()}" in shown.stdout.replace("\n", "")

    [event] = [e for e in daemon.events() if e.get("event") == "leak_sites"]
    assert event["sites"][0]["site"] == f"{HELPERS}:{leak_helpers.leaking_line()}"
    kept = json.loads(Path(event["file"]).read_text())
    assert kept["sites"][0]["lineno"] == leak_helpers.leaking_line()
    assert Path(event["file"]).parent == daemon.socket_path.parent / "forensics"


def test_a_native_leak_is_reported_as_untraced_not_pinned_on_a_python_line(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """malloc through ctypes, never freed: RSS grows, Python's allocators see nothing."""
    leak = 512 * KiB
    daemon = start_daemon(limits={"soft": "1GiB", "hard": "2GiB"}, sampling={"interval": "250ms"})
    worker = start_worker(socket_path=daemon.socket_path)
    result: dict[str, Any] | None = None
    for _ in range(200):
        for sent in [worker.send("keep_native", leak / KiB), worker.send("noop")]:
            sent.get(timeout=60)
        task = _task(daemon.status(), "keep_native")
        if task is not None and task["trace"] is not None and task["trace"]["complete"]:
            result = task
            break
    assert result is not None, daemon.output()
    print(f"native leak: untraced {result['untraced_share']}, sites {result['sites']}")
    assert result["untraced_share"] >= 0.8
    assert all(site["bytes_per_call"] < 0.2 * leak for site in result["sites"])
    assert "memray" in result["trace"]["advice"]


@pytest.fixture(scope="session")
def native_library(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/apps/native_leak.c built as a shared library, with its debug information."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build tests/apps/native_leak.c")
    out = tmp_path_factory.mktemp("native") / "libnative_leak.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-g", "-O0", "-o", str(out),
                    str(ROOT / "tests" / "apps" / "native_leak.c")], check=True, timeout=60)
    return str(out)


@pytest.fixture
def feeding(request: pytest.FixtureRequest) -> Iterator[Callable[[Worker, list[tuple[Any, ...]]], None]]:
    """Sends the given tasks to a worker over and over from a thread, until the test ends."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def feed(worker: Worker, tasks: list[tuple[Any, ...]]) -> None:
        def loop() -> None:
            while not stop.is_set():
                for result in [worker.send(*task) for task in tasks]:
                    result.get(timeout=60, propagate=False)

        thread = threading.Thread(target=loop, daemon=True)
        threads.append(thread)
        thread.start()

    yield feed
    stop.set()
    for thread in threads:
        thread.join(70)


@pytest.mark.skipif(importlib.util.find_spec("memray") is None,
                    reason="memray is not installed (pip install celery-memguard[memray])")
def test_with_memray_the_native_leaks_top_stack_names_the_allocating_call(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker],
        native_library: str, feeding: Callable[[Worker, list[tuple[Any, ...]]], None]) -> None:
    """Asked for by hand: memray sees the C function's malloc that tracemalloc cannot."""
    daemon = start_daemon(limits={"soft": "1GiB", "hard": "2GiB"}, sampling={"interval": "250ms"},
                          forensics={"tool": "memray", "auto": False})
    worker = start_worker(socket_path=daemon.socket_path)
    feeding(worker, [("keep_native", 256, native_library), ("noop",)])
    done = _cli("trace", APP + "keep_native", "--calls", "5", "--timeout", "60", "--json",
                "--url", daemon.url, "--socket", str(daemon.socket_path))
    assert done.returncode == 0, done.stderr + daemon.output()
    result = json.loads(done.stdout)
    top = result["sites"][0]
    print(f"memray: {top['function']} at {top['filename']}:{top['lineno']}, "
          f"{top['bytes_per_call']} bytes a call, share {top['share']}")
    assert (result["tool"], result["calls"], result["complete"]) == ("memray", 5, True)
    assert top["function"] == "native_keep"
    assert top["filename"].endswith("native_leak.c")
    assert abs(top["bytes_per_call"] - 256 * KiB) <= 0.2 * 256 * KiB
    assert result["untraced_share"] < 0.5


def test_the_hard_limit_interrupts_a_runaway_task_in_a_tracing_child_which_reports_what_it_has(
        start_daemon: Callable[..., Daemon], start_worker: Callable[..., Worker]) -> None:
    """Tracing does not stand in the hard limit's way; the child recycled after the
    interrupted task sends its trace before it leaves."""
    daemon = start_daemon(limits={"soft": "200MiB", "hard": "300MiB"},
                          sampling={"interval": "250ms"}, forensics={"auto": False})
    worker = start_worker(socket_path=daemon.socket_path)
    trace = subprocess.Popen(
        [sys.executable, "-m", "celery_memguard", "trace", APP + "runaway", "--calls", "5",
         "--timeout", "60", "--json", "--url", daemon.url, "--socket", str(daemon.socket_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(t["state"] == "tracing"
                             for t in daemon.status()["forensics"]["traces"]), 30,
                 "the trace was not placed")
        runaways = [worker.send("runaway", 16, 0.02, 640) for _ in range(2)]  # one per child
        for result in runaways:
            result.get(timeout=60, propagate=False)
            assert result.state == "FAILURE"
            assert "MemoryLimitExceeded" in repr(result.result)
        out, err = trace.communicate(timeout=120)
    finally:
        trace.kill()
        trace.communicate()
    assert trace.returncode == 0, err + daemon.output()
    result = json.loads(out)
    assert (result["calls"], result["reason"], result["complete"]) == (1, "leaving", False)
