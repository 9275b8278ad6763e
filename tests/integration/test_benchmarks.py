"""The benchmarks still run (their quick mode); their figures live in BENCHMARKS.md, not here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.slow


def test_benchmarks_quick_mode_runs_every_part() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for title in ("Sampling cost per child", "One tick over", "Daemon at a 1 s tick",
                  "Daemon per reported task", "Workload W", "Workload W: the worker's total memory",
                  "Spikes", "Runaway", "Agent overhead", "Many workers"):
        assert f"## {title}" in done.stdout, title
