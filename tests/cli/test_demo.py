"""The README's first command: the demo runs to its summary on a machine with no broker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line or environment names ``text`` (the demo's work directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                if text.encode() in (entry / name).read_bytes():
                    found.append(int(entry.name))
                    break
            except OSError:
                continue
    return found


def _run_demo(*args: str, interrupt_after: float | None = None) -> tuple[int, str, float]:
    """Run the demo; with ``interrupt_after``, press Ctrl-C that long after its workload began
    (its first progress line), as a user watching it would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_MEMGUARD")}
    started = time.monotonic()
    # A shell started without job control (CI, a background job) hands its commands SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the demo the
    # default a user's terminal gives it.
    proc = subprocess.Popen([sys.executable, "-m", "celery_memguard", "demo", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
                              daemon=True)
    reader.start()
    try:
        if interrupt_after is not None:
            deadline = time.monotonic() + 90
            while not any(PROGRESS.match(line) for line in list(lines)):
                assert proc.poll() is None, "".join(lines)
                assert time.monotonic() < deadline, "the demo's workload never began: " + "".join(lines)
                time.sleep(0.1)
            time.sleep(interrupt_after)
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
        proc.stdout.close()
    return proc.returncode, "".join(lines), time.monotonic() - started


PROGRESS = re.compile(r"\s*\d+\.\ds\s+sent \d+")


def test_the_demo_shows_soft_recycles_a_stopped_runaway_and_no_lost_task() -> None:
    code, out, took = _run_demo("--duration", "15", "--no-live")
    assert code == 0, out
    assert took < 60, f"the demo took {took:.0f}s"
    summary = out[out.index("summary"):]
    assert re.search(r"lost 0\b", summary), summary
    recycles = dict(re.findall(r"(soft|hard|kill) (\d+)", summary.split("recycles by level:")[1]))
    assert int(recycles.get("soft", 0)) >= 1, summary
    assert int(recycles.get("hard", 0)) >= 1, summary
    assert re.search(r"\b[1-9]\d* runaways stopped by the hard limit", summary), summary
    assert "leaking task: celery_memguard.cli.demo_app.leaky_report" in summary
    workdir = re.search(r"working in (\S+)", out)
    assert workdir is not None
    assert not Path(workdir[1]).exists(), "the demo left its work directory behind"
    assert _processes_mentioning(workdir[1]) == [], "the demo left processes running"


def test_ctrl_c_stops_the_demo_and_cleans_everything_up() -> None:
    code, out, _ = _run_demo("--duration", "60", "--no-live", interrupt_after=3)
    assert code == 130, out
    assert "interrupted: cleaning up" in out
    workdir = re.search(r"working in (\S+)", out)
    assert workdir is not None
    deadline = time.monotonic() + 5
    while _processes_mentioning(workdir[1]):
        assert time.monotonic() < deadline, "the demo left processes running after Ctrl-C"
        time.sleep(0.1)
    assert not Path(workdir[1]).exists()
