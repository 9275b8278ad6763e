"""``report --prometheus``: folding Prometheus's answers into the report, its JSON and tables,
and what the command says when it cannot ask."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from rich.console import Console

from celery_memguard.cli import main
from celery_memguard.cli.fleet import FleetReport, Group, document, fold
from celery_memguard.cli.fleet_render import fleet_tables
from celery_memguard.cli.prometheus_api import Sample
from tests.builders import MiB
from tests.support import free_port

A = {"job": "celery-memguard", "instance": "a:9808", "namespace": "billing"}
B = {"job": "celery-memguard", "instance": "b:9808", "namespace": "billing"}
C = {"job": "celery-memguard", "instance": "c:9808"}
REPORTS = {"namespace": "billing", "worker_group": "reports"}
EXPORTS = {"worker_group": "exports"}


def _s(value: float, **labels: str) -> Sample:
    return Sample(labels=labels, value=value)


def _answers(**overrides: list[Sample]) -> dict[str, list[Sample]]:
    answers: dict[str, list[Sample]] = {
        "sidecars": [_s(1, **A), _s(1, **B), _s(1, **C)],
        "workers": [_s(1, **A, worker_group="reports", worker="reports@a"),
                    _s(1, **B, worker_group="reports", worker="reports@b"),
                    _s(1, **C, worker_group="exports", worker="exports@c")],
        "observe_only": [_s(1, worker="legacy@c")],
        "task_calls": [_s(99.6, **A, task="app.keep"), _s(30, **B, task="app.keep"),
                       _s(20, **C, task="app.export"), _s(1000, **C, task="app.ping"),
                       _s(4, **C, task="app.rare"), _s(0, **C, task="app.old")],
        "task_growth": [_s(65 * MiB, task="app.keep"), _s(40 * MiB, task="app.export"),
                        _s(0, task="app.ping"), _s(4 * MiB, task="app.rare"), _s(0, task="app.old")],
        "task_median": [_s(640 * 1024, task="app.keep"), _s(2.5 * MiB, task="app.export"),
                        _s(0, task="app.ping"), _s(2.5 * MiB, task="app.rare")],
        "children": [_s(3, **REPORTS), _s(1, **EXPORTS)],
        "leaking": [_s(2, **REPORTS)],
        "fastest_leak": [_s(0.6 * MiB, **REPORTS)],
        "recommended": [_s(1500, **REPORTS)],
        "recycles": [_s(12.9, **REPORTS, reason="soft"), _s(1, **REPORTS, reason="hard")],
        "interrupted": [_s(1, **EXPORTS, task="app.export", reason="hard"),
                        _s(3, **EXPORTS, task="app.export", reason="container")],
        "oom_kills": [_s(2, **REPORTS, task="app.keep")],
    }
    answers.update(overrides)
    return answers


def _fold(**overrides: list[Sample]) -> FleetReport:
    return fold(_answers(**overrides), prometheus="http://prom:9090", selector="{}", window="1h",
                at=1_800_000_000.0)


def test_tasks_rank_by_median_with_calls_summed_across_sidecars() -> None:
    report = _fold()
    assert [t.task for t in report.tasks] == ["app.export", "app.keep", "app.rare", "app.ping"]
    export, keep, rare, ping = report.tasks
    assert (keep.calls, keep.leaky) == (130, True)  # 99.6 (extrapolated) + 30
    assert keep.mean_bytes == pytest.approx(65 * MiB / 129.6)
    assert keep.groups == (Group("", "billing", "reports"),)
    assert export.groups == (Group("", "", "exports"),)
    assert (rare.leaky, rare.calls) == (False, 4)  # fewer than 5 calls: no verdict
    assert ping.leaky is False
    assert "app.old" not in [t.task for t in report.tasks]  # no call in the window


def test_the_mean_breaks_a_tie_of_medians_in_one_bucket() -> None:
    report = _fold(
        task_calls=[_s(10, **A, task="small"), _s(10, **A, task="large")],
        task_growth=[_s(10 * MiB, task="small"), _s(30 * MiB, task="large")],
        task_median=[_s(2.5 * MiB, task="small"), _s(2.5 * MiB, task="large")])
    assert [t.task for t in report.tasks] == ["large", "small"]


def test_a_task_below_64_kib_is_not_leaky_however_many_calls() -> None:
    report = _fold(task_calls=[_s(500, **A, task="t")], task_growth=[_s(500 * 32 * 1024, task="t")],
                   task_median=[_s(32 * 1024, task="t")])
    assert report.tasks[0].leaky is False


def test_groups_carry_their_workers_children_advice_and_stopped_tasks() -> None:
    report = _fold()
    groups = {str(g.group): g for g in report.groups}
    assert list(groups) == ["exports", "billing/reports"]
    reports, exports = groups["billing/reports"], groups["exports"]
    assert reports.workers == ("reports@a", "reports@b")
    assert (reports.children, reports.leaking_children) == (3, 2)
    assert reports.recommended_max_tasks_per_child == 1500
    assert reports.fastest_leak_bytes_per_task == 0.6 * MiB
    assert reports.recycles == {"hard": 1, "soft": 13}
    assert reports.oom_kills == (("app.keep", 2),)
    assert exports.recommended_max_tasks_per_child is None
    assert exports.interrupted == (("app.export", "container", 3), ("app.export", "hard", 1))
    assert report.observe_only == ("legacy@c",)
    assert report.sidecars == 3


def test_the_json_document_uses_the_daemon_reports_task_keys() -> None:
    doc = json.loads(json.dumps(document(_fold())))
    keep = next(t for t in doc["tasks"] if t["task"] == "app.keep")
    assert set(keep) >= {"task", "calls", "median_growth_bytes", "mean_growth_bytes",
                         "total_growth_bytes", "leaky"}
    assert keep["worker_groups"] == ["billing/reports"]
    reports = next(g for g in doc["worker_groups"] if g["name"] == "reports")
    assert reports["namespace"] == "billing"
    assert reports["recommended_max_tasks_per_child"] == 1500
    assert reports["oom_kills"] == [{"task": "app.keep", "count": 2}]
    assert doc["observe_only_workers"] == ["legacy@c"]


def test_the_tables_name_the_leak_the_groups_and_the_advice() -> None:
    console = Console(record=True, width=240)
    fleet_tables(_fold(), console)
    text = console.export_text()
    assert "leaking task: app.export" in text
    assert "billing/reports: --max-tasks-per-child 1500" in text
    assert "OOM kill" in text
    assert "legacy@c" in text


def test_an_empty_window_says_so() -> None:
    console = Console(record=True, width=200)
    fleet_tables(_fold(task_calls=[], task_growth=[], task_median=[], recycles=[], interrupted=[],
                       oom_kills=[], recommended=[]), console)
    text = console.export_text()
    assert "no task name leaks in the window" in text
    assert "no task was interrupted or OOM-killed in the window" in text


# -- the command, where it cannot ask ---------------------------------------------------------


def test_no_prometheus_at_the_url_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["report", "--prometheus", url]) == 1
    err = capsys.readouterr().err
    assert f"no Prometheus answers at {url}" in err


class _NotPrometheus(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html>not here</html>")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_prometheus() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _NotPrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_is_not_prometheus_says_so(not_prometheus: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--prometheus", not_prometheus]) == 1
    assert "does not serve Prometheus's HTTP API (HTTP 404" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--prometheus", "http://127.0.0.1:1", "--selector", "namespace=prod"], "invalid --selector"),
    (["--prometheus", "http://127.0.0.1:1", "--window", "an hour"], "invalid --window"),
    (["--prometheus", "prometheus:9090"], "not an http:// or https:// URL"),
    (["--selector", 'namespace="prod"'], "go with --prometheus"),
    (["--window", "1h"], "go with --prometheus"),
])
def test_bad_arguments_exit_2_before_asking(argv: list[str], message: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", *argv]) == 2
    assert message in capsys.readouterr().err
