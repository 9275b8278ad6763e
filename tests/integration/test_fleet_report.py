"""``report --prometheus`` with a real Prometheus scraping three daemons, each supervising a real
worker: two pods of worker group ``reports`` (one leaking task) and a host of ``exports``
(another, faster leak). The same data through the recording rules ranks alike."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_memguard.cli import main
from celery_memguard.cli.fleet import FleetTask, rank
from celery_memguard.daemon.task_growth import LEAK_MEDIAN
from tests.builders import MiB
from tests.prometheus_server import PrometheusServer
from tests.support import ROOT, Daemon, Worker, free_port

pytestmark = pytest.mark.slow

RULES = ROOT / "deploy" / "prometheus" / "fleet_rules.yaml"
KEEP, HOARD, NOOP = "tests.apps.leaky.keep", "tests.apps.leaky.hoard", "tests.apps.leaky.noop"
LEAKS, NOOPS = 50, 10  # calls per worker: 50 a child is enough for a steady-leak verdict (40)


@pytest.fixture
def processes(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., Any]]:
    """Starts daemons, workers and Prometheus for one test; stops them all, also on failure."""
    started: list[Daemon | Worker | PrometheusServer] = []

    def start(kind: type[Any], *args: Any, **kwargs: Any) -> Any:
        if kind is Worker:
            thing = Worker(tmp_path, f"{redis_url}/0", f"{redis_url}/1", *args, **kwargs)
        else:
            thing = kind(*args, **kwargs)
        started.append(thing)
        return thing

    yield start
    for thing in started:  # all at once: a worker's warm shutdown takes a second or two
        with contextlib.suppress(ProcessLookupError):
            thing.proc.send_signal(signal.SIGTERM)
    for thing in reversed(started):
        thing.stop()


def _run_paced(workers: list[tuple[Worker, str, float]]) -> None:
    """NOOPS no-op calls and LEAKS leaking ones on each worker, a few at a time on all at once,
    so that Prometheus scrapes the counts several times on their way up."""
    plan = {worker.name: [(NOOP, ())] * NOOPS + [(task, (mib,))] * LEAKS for worker, task, mib in workers}
    for step in range(0, NOOPS + LEAKS, 6):
        results = [worker.send(name.rsplit(".", 1)[1], *args)
                   for worker, _, _ in workers for name, args in plan[worker.name][step:step + 6]]
        for result in results:
            result.get(timeout=60)
        time.sleep(0.3)


def test_the_fleet_report_ranks_the_leaks_of_every_sidecar(
        tmp_path: Path, processes: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian package prometheus): run "
                    "scripts/ensure-tools")
    unique = f"{os.getpid()}x{free_port()}"
    reports, exports = f"reports{unique}", f"exports{unique}"
    config = {"limits": {"soft": "1GiB", "hard": "2GiB"}, "sampling": {"interval": "250ms"}}
    a, b, c = (processes(Daemon, tmp_path / name, config) for name in ("a", "b", "c"))
    workers = [processes(Worker, socket_path=daemon.socket_path, name=name, concurrency=1)
               for daemon, name in ((a, f"{reports}@host-a"), (b, f"{reports}@host-b"),
                                    (c, f"{exports}@host-c"))]
    for worker in workers:
        worker.wait_ready()
    prometheus = processes(PrometheusServer, binary, tmp_path / "prometheus", {
        a.port: {"namespace": "billing", "pod": "reports-a"},
        b.port: {"namespace": "billing", "pod": "reports-b"},
        c.port: {},  # a host: no Kubernetes labels
    }, rule_files=[RULES])
    prometheus.wait_up(3)

    _run_paced([(workers[0], KEEP, 0.5), (workers[1], KEEP, 0.5), (workers[2], HOARD, 2)])
    mine = f'worker=~"{reports}@.*|{exports}@.*"'
    deadline = time.monotonic() + 30
    while True:  # until Prometheus holds every call and every worker's advice
        calls = prometheus.values("sum by (task) (celery_memguard_task_memory_growth_bytes_count)", "task")
        advice = prometheus.query(f"celery_memguard_recommended_max_tasks_per_child{{{mine}}}")
        if calls == {KEEP: 2 * LEAKS, HOARD: LEAKS, NOOP: 3 * NOOPS} and len(advice) == 3:
            break
        assert time.monotonic() < deadline, (calls, advice, [d.status()["workers"] for d in (a, b, c)])
        time.sleep(0.5)

    done = subprocess.run([sys.executable, "-m", "celery_memguard", "report", "--prometheus",
                           prometheus.url, "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["sidecars"] == 3
    tasks = {t["task"]: t for t in report["tasks"]}
    # The faster leak first, both leaky, the no-op last; calls summed over the sidecars.
    assert [t["task"] for t in report["tasks"]] == [HOARD, KEEP, NOOP]
    assert [t["leaky"] for t in report["tasks"]] == [True, True, False]
    assert [t["calls"] for t in report["tasks"]] == [LEAKS, 2 * LEAKS, 3 * NOOPS]
    # Medians estimated inside their buckets: 2 MiB in (1, 4] MiB, 0.5 MiB in (256 KiB, 1 MiB].
    assert 1 * MiB < tasks[HOARD]["median_growth_bytes"] <= 4 * MiB
    assert 256 * 1024 < tasks[KEEP]["median_growth_bytes"] <= 1 * MiB
    assert tasks[KEEP]["mean_growth_bytes"] == pytest.approx(0.5 * MiB * LEAKS / (LEAKS + NOOPS), rel=0.25)
    assert tasks[HOARD]["worker_groups"] == [exports]
    assert tasks[KEEP]["worker_groups"] == [f"billing/{reports}"]
    assert tasks[NOOP]["worker_groups"] == [exports, f"billing/{reports}"]
    groups = {g["worker_group"]: g for g in report["worker_groups"]}
    ours = groups[f"billing/{reports}"], groups[exports]
    assert ours[0]["workers"] == [f"{reports}@host-a", f"{reports}@host-b"]
    assert ours[1]["workers"] == [f"{exports}@host-c"]
    assert [(g["children"], g["leaking_children"]) for g in ours] == [(2, 2), (1, 1)]
    # A recommendation for each group; the faster leak calls for the lower one.
    advice_reports, advice_exports = (g["recommended_max_tasks_per_child"] for g in ours)
    assert 0 < advice_exports < advice_reports  # None (no advice) would not compare
    assert not {w.name for w in workers} & set(report["observe_only_workers"])

    # The same data through the recording rules ranks the tasks alike, with the same medians.
    recorded = "task:celery_memguard_task_memory_growth_bytes"
    deadline = time.monotonic() + 30
    while True:  # until a rule evaluation has seen the last scrape (they lag on a busy host)
        counts = prometheus.values(f"sum by (task) ({recorded}_count:increase5m)", "task")
        if counts == {KEEP: 2 * LEAKS, HOARD: LEAKS, NOOP: 3 * NOOPS}:
            break
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)
    medians = prometheus.values(
        f"histogram_quantile(0.5, sum by (task, le) ({recorded}_bucket:increase5m))", "task")
    sums = prometheus.values(f"sum by (task) ({recorded}_sum:increase5m)", "task")
    through_rules = rank(FleetTask(task=task, calls=round(n), median_bytes=medians[task],
                                   mean_bytes=sums[task] / n, total_bytes=sums[task],
                                   leaky=n >= 5 and medians[task] >= LEAK_MEDIAN, groups=())
                         for task, n in counts.items())
    assert [t.task for t in through_rules] == [HOARD, KEEP, NOOP]
    for task in through_rules:
        assert task.median_bytes == pytest.approx(tasks[task.task]["median_growth_bytes"])
    by_group = prometheus.values(
        "worker_group:celery_memguard_recommended_max_tasks_per_child:min", "worker_group")
    assert {reports, exports} <= set(by_group)
    leaking = prometheus.values("worker_group:celery_memguard_child_leaking:sum", "worker_group")
    assert (leaking[reports], leaking[exports]) == (2, 1)

    # The tables, and what the command says for a selector Prometheus refuses or one that
    # matches nothing.
    assert main(["report", "--prometheus", prometheus.url]) == 0
    out = capsys.readouterr().out
    assert f"leaking task: {HOARD}" in out
    assert f"billing/{reports}: --max-tasks-per-child {advice_reports}" in out
    assert f"{exports}: --max-tasks-per-child {advice_exports}" in out
    assert main(["report", "--prometheus", prometheus.url, "--selector", 'pod=~"("']) == 2
    assert "Prometheus refused the query for --selector {pod=~\"(\"}" in capsys.readouterr().err
    assert main(["report", "--prometheus", prometheus.url, "--selector", 'namespace="nowhere"']) == 1
    assert "has no celery-memguard series matching {namespace=\"nowhere\"}" in capsys.readouterr().err
