"""The report's PromQL, evaluated by Prometheus's own engine (``promtool test rules``) over a
made-up fleet of three sidecars: two pods of one worker group in one namespace, and a host.

promtool comes with Debian's prometheus package (scripts/ensure-tools installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_memguard.cli.fleet_queries import BadArgument, Selector, check_window, queries
from tests.builders import MiB

JOB = 'job="celery-memguard"'
POD_A = f'{JOB},instance="10.0.0.1:9808",namespace="billing",pod="reports-a"'
POD_B = f'{JOB},instance="10.0.0.2:9808",namespace="billing",pod="reports-b"'
HOST_C = f'{JOB},instance="host-c:9808"'
BOUNDS = ("0", "65536", "262144", "1.048576e+06", "4.194304e+06", "1.6777216e+07",
          "6.7108864e+07", "2.68435456e+08", "+Inf")


def _histogram(target: str, task: str, first_bucket: int, counts: str, sums: str) -> list[dict[str, str]]:
    """Series of a task whose calls all fall in bucket ``first_bucket`` (an index of BOUNDS)."""
    name = "celery_memguard_task_memory_growth_bytes"
    labels = f'{target},task="{task}"'
    series = [{"series": f'{name}_bucket{{{labels},le="{le}"}}',
               "values": counts if i >= first_bucket else "0x20"} for i, le in enumerate(BOUNDS)]
    return [*series, {"series": f"{name}_count{{{labels}}}", "values": counts},
            {"series": f"{name}_sum{{{labels}}}", "values": sums}]


# Samples every minute from 0m to 20m; the report is evaluated at 20m over a 10m window, so a
# series with a sample at 10m existed when the window began (it counts its increase), and one
# that starts later appeared inside it (it counts its last value). "_" is a missed scrape.
SERIES: list[dict[str, str]] = [
    *({"series": f"celery_memguard_build_info{{{t},version=\"0.1.0\"}}", "values": "1x20"}
      for t in (POD_A, POD_B, HOST_C)),
    {"series": f'celery_memguard_worker_info{{{POD_A},worker="reports@reports-a",agent="true"}}',
     "values": "1x20"},
    {"series": f'celery_memguard_worker_info{{{POD_B},worker="reports@reports-b",agent="true"}}',
     "values": "1x20"},
    {"series": f'celery_memguard_worker_info{{{HOST_C},worker="exports@host-c",agent="true"}}',
     "values": "1x20"},
    # Host C's scan also finds another host-level worker, whose agent talks to another sidecar
    # (reports@reports-a, seen twice), and one without the agent at all.
    {"series": f'celery_memguard_worker_info{{{HOST_C},worker="reports@reports-a",agent="false"}}',
     "values": "1x20"},
    {"series": f'celery_memguard_worker_info{{{HOST_C},worker="legacy@host-c",agent="false"}}',
     "values": "1x20"},
    {"series": f'celery_memguard_child_rss_bytes{{{HOST_C},worker="legacy@host-c",index="0"}}',
     "values": "1e8x20"},
    {"series": f'celery_memguard_child_rss_bytes{{{HOST_C},worker="reports@reports-a",index="0"}}',
     "values": "1e8x20"},
    # reports: 100 calls of 0.5 MiB in the window on pod A, 30 on pod B (new there).
    *_histogram(POD_A, "app.keep", 3, "0+10x20", f"0+{5 * MiB}x20"),
    *_histogram(POD_B, "app.keep", 3, "_x15 5+5x5", f"_x15 {2.5 * MiB}+{2.5 * MiB}x5"),
    # exports: 20 calls of 2 MiB, 1,000 calls that leave nothing.
    *_histogram(HOST_C, "app.export", 4, "0+2x20", f"0+{4 * MiB}x20"),
    *_histogram(HOST_C, "app.ping", 0, "0+100x20", "0x20"),
    # Before the window only: 40 calls, none in it.
    *_histogram(HOST_C, "app.old", 4, "0+4x10 40x10", f"0+{8 * MiB}x10 {80 * MiB}x10"),
    {"series": f'celery_memguard_child_rss_bytes{{{POD_A},worker="reports@reports-a",index="0"}}',
     "values": "1e8x20"},
    {"series": f'celery_memguard_child_rss_bytes{{{POD_A},worker="reports@reports-a",index="1"}}',
     "values": "1e8x20"},
    {"series": f'celery_memguard_child_rss_bytes{{{POD_B},worker="reports@reports-b",index="0"}}',
     "values": "1e8x20"},
    {"series": f'celery_memguard_child_rss_bytes{{{HOST_C},worker="exports@host-c",index="0"}}',
     "values": "1e8x20"},
    # Leaking: A/0 all along, B/0 for a while inside the window, C/0 only before it.
    {"series": f'celery_memguard_child_leaking{{{POD_A},worker="reports@reports-a",index="0"}}',
     "values": "1x20"},
    {"series": f'celery_memguard_child_leaking{{{POD_A},worker="reports@reports-a",index="1"}}',
     "values": "0x20"},
    {"series": f'celery_memguard_child_leaking{{{POD_B},worker="reports@reports-b",index="0"}}',
     "values": "0x12 1x3 0x4"},
    {"series": f'celery_memguard_child_leaking{{{HOST_C},worker="exports@host-c",index="0"}}',
     "values": "1x5 0x15"},
    {"series": f'celery_memguard_child_leak_bytes_per_task{{{POD_A},worker="reports@reports-a",index="0"}}',
     "values": f"{0.5 * MiB}x20"},
    {"series": f'celery_memguard_child_leak_bytes_per_task{{{POD_A},worker="reports@reports-a",index="1"}}',
     "values": f"{9 * MiB}x20"},  # a slope that is not a leak: not the fastest leak
    {"series": f'celery_memguard_child_leak_bytes_per_task{{{POD_B},worker="reports@reports-b",index="0"}}',
     "values": f"{0.6 * MiB}x20"},
    {"series": f'celery_memguard_recommended_max_tasks_per_child{{{POD_A},worker="reports@reports-a"}}',
     "values": "1900x20"},
    {"series": f'celery_memguard_recommended_max_tasks_per_child{{{POD_B},worker="reports@reports-b"}}',
     "values": "1800x12 1500x3 _x5"},  # absent once its child stops leaking
    # Recycles: 10 in the window on A (an old series), 3 on B (new), none on C.
    {"series": f'celery_memguard_recycles_total{{{POD_A},worker="reports@reports-a",reason="soft"}}',
     "values": "0+1x20"},
    {"series": f'celery_memguard_recycles_total{{{POD_B},worker="reports@reports-b",reason="soft"}}',
     "values": "_x17 1 2 3"},
    {"series": f'celery_memguard_recycles_total{{{POD_B},worker="reports@reports-b",reason="hard"}}',
     "values": "_x16 1x4"},
    {"series": f'celery_memguard_recycles_total{{{HOST_C},worker="exports@host-c",reason="soft"}}',
     "values": "4x20"},
    {"series": f'celery_memguard_oom_kills_total{{{POD_B},worker="reports@reports-b",task="app.keep"}}',
     "values": "_x15 1 1 1 1 2"},
    {"series": f'celery_memguard_interrupted_tasks_total{{{HOST_C},worker="exports@host-c",'
               f'task="app.export",reason="hard"}}', "values": "0x10 1x10"},
]

A = {"job": "celery-memguard", "instance": "10.0.0.1:9808"}
B = {"job": "celery-memguard", "instance": "10.0.0.2:9808"}
C = {"job": "celery-memguard", "instance": "host-c:9808"}
REPORTS = {"namespace": "billing", "worker_group": "reports"}
EXPORTS = {"worker_group": "exports"}
EXPECTED: dict[str, list[tuple[dict[str, str], float]]] = {
    "sidecars": [(A, 1), (B, 1), (C, 1)],
    "workers": [({**A, **REPORTS, "worker": "reports@reports-a"}, 1),
                ({**B, **REPORTS, "worker": "reports@reports-b"}, 1),
                ({**C, **EXPORTS, "worker": "exports@host-c"}, 1)],
    "observe_only": [({"worker": "legacy@host-c"}, 1)],
    "task_calls": [({**A, "task": "app.keep"}, 100), ({**B, "task": "app.keep"}, 30),
                   ({**C, "task": "app.export"}, 20), ({**C, "task": "app.ping"}, 1000),
                   ({**C, "task": "app.old"}, 0)],
    "task_growth": [({"task": "app.keep"}, 65 * MiB), ({"task": "app.export"}, 40 * MiB),
                    ({"task": "app.ping"}, 0), ({"task": "app.old"}, 0)],
    # Interpolated inside the bucket: 256 KiB + (1 MiB - 256 KiB) / 2, and 1 MiB + 3 MiB / 2.
    "task_median": [({"task": "app.keep"}, 640 * 1024), ({"task": "app.export"}, 2.5 * MiB),
                    ({"task": "app.ping"}, 0)],  # app.old: no call in the window, no median
    "children": [(REPORTS, 3), (EXPORTS, 1)],
    "leaking": [(REPORTS, 2)],
    "fastest_leak": [(REPORTS, 0.6 * MiB)],
    "recommended": [(REPORTS, 1500)],
    "recycles": [({**REPORTS, "reason": "soft"}, 13), ({**REPORTS, "reason": "hard"}, 1)],
    "interrupted": [({**EXPORTS, "task": "app.export", "reason": "hard"}, 1)],
    "oom_kills": [({**REPORTS, "task": "app.keep"}, 2)],
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian package prometheus): run scripts/ensure-tools")
    return path


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _unit_tests(exprs: dict[str, str]) -> dict[str, Any]:
    return {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": SERIES,
        "promql_expr_test": [
            {"expr": exprs[name], "eval_time": "20m",
             "exp_samples": [{"labels": _labels(labels), "value": value} for labels, value in samples]}
            for name, samples in EXPECTED.items()]}]}


def _promtool_test(tmp_path: Path, exprs: dict[str, str]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "fleet_queries_test.yaml"
    path.write_text(yaml.safe_dump(_unit_tests(exprs), sort_keys=False, width=1000))
    return subprocess.run([_promtool(), "test", "rules", path.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)


def test_every_query_of_the_report_gives_the_fleet_figures(tmp_path: Path) -> None:
    """Counts in the window (old series by their increase, new ones whole), worker groups
    across pods and namespaces, the median from the buckets, observe-only workers left out."""
    exprs = queries(Selector.parse(JOB), "10m")
    assert set(exprs) == set(EXPECTED)
    result = _promtool_test(tmp_path, exprs)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_promtool_check_has_teeth(tmp_path: Path) -> None:
    """The plain increase() the report does not use loses what a new series counted first."""
    exprs = queries(Selector.parse(JOB), "10m")
    exprs["oom_kills"] = exprs["oom_kills"].replace("last_over_time", "increase")
    result = _promtool_test(tmp_path, exprs)
    assert result.returncode != 0
    assert "oom_kills_total" in result.stdout + result.stderr


def test_a_selector_narrows_every_query(tmp_path: Path) -> None:
    """With the selector of one namespace, the host's sidecar is left out of every answer."""
    exprs = queries(Selector.parse('namespace="billing"'), "10m")
    for name, expr in exprs.items():
        assert expr.count('namespace="billing"') >= 1, name
    doc = _unit_tests(exprs)
    case = doc["tests"][0]["promql_expr_test"]
    for entry in case:
        entry["exp_samples"] = [s for s in entry["exp_samples"] if "host-c" not in s["labels"]
                                and "exports" not in s["labels"] and "app.ping" not in s["labels"]
                                and "app.old" not in s["labels"] and "app.export" not in s["labels"]
                                and "legacy" not in s["labels"]]
    path = tmp_path / "narrow_test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    result = subprocess.run([_promtool(), "test", "rules", path.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("text", "matchers"), [
    (None, ()),
    ("", ()),
    ("{}", ()),
    ('namespace="prod"', ('namespace="prod"',)),
    ('{namespace="prod", pod=~"reports-.*"}', ('namespace="prod"', 'pod=~"reports-.*"')),
    (" cluster != 'eu' ,", ("cluster!='eu'",)),
    ('job!~`test|dev`', ("job!~`test|dev`",)),
    ('task="a\\"b"', ('task="a\\"b"',)),
])
def test_selectors_that_parse(text: str | None, matchers: tuple[str, ...]) -> None:
    assert Selector.parse(text).matchers == matchers


@pytest.mark.parametrize("text", [
    "namespace", 'namespace=prod', 'namespace="prod" pod="a"', '{namespace="prod"',
    'namespace="prod"} or vector(1) or up{', '1abc="x"', 'namespace=="prod"', 'a="unterminated',
])
def test_selectors_that_do_not_parse_name_what_is_expected(text: str) -> None:
    with pytest.raises(BadArgument, match="invalid --selector"):
        Selector.parse(text)


@pytest.mark.parametrize("window", ["30s", "5m", "1h30m", "7d", "2w", "500ms"])
def test_windows(window: str) -> None:
    assert check_window(window) == window


@pytest.mark.parametrize("window", ["", "5", "5 minutes", "1H", "0m", "-5m", "5m ", "m"])
def test_bad_windows(window: str) -> None:
    with pytest.raises(BadArgument, match="invalid --window"):
        check_window(window)


def test_every_query_parses_with_no_selector(tmp_path: Path) -> None:
    """With no selector the queries read ``metric{}``, which Prometheus accepts."""
    rules = [{"record": f"report:{name}", "expr": expr}
             for name, expr in queries(Selector.parse(None), "1h").items()]
    path = tmp_path / "report_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "report", "rules": rules}]}))
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
