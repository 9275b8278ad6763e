"""deploy/prometheus/fleet_rules.yaml: the fleet's recording rules, checked and unit-tested
by promtool like the alerts, grouped as the report groups, and what the dashboard reads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_memguard.cli.fleet_queries import grouped
from tests.deploy.test_deploy import (
    DASHBOARD,
    DEPLOY,
    METRIC,
    SCRAPE,
    SCRAPE_K8S,
    _run,
    _tool,
    _unknown_metrics,
)

RULES = DEPLOY / "prometheus" / "fleet_rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "fleet_rules_test.yaml"
RECORDED = re.compile(r"\b[a-z_]+:celery_memguard_[a-z_]+:[a-z0-9_]+\b")


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_rules_pass_promtool_check() -> None:
    result = _run(_tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = _run(_tool("promtool"), "test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("record", [rule["record"] for rule in _rules()])
def test_rule_tests_fail_when_the_rule_records_nothing(tmp_path: Path, record: str) -> None:
    """Each rule, replaced by one that records nothing, fails the unit tests."""
    promtool = _tool("promtool")
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule["record"] == record:
                rule["expr"] = "vector(0) > 1"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(doc))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = _run(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert result.returncode != 0, f"{RULES_TEST.name} never reads {record}"
    assert record in result.stdout + result.stderr


def test_rules_are_named_for_their_level_and_read_known_metrics() -> None:
    rules = _rules()
    assert len({rule["record"] for rule in rules}) == len(rules)
    for rule in rules:
        assert RECORDED.fullmatch(rule["record"]), rule["record"]
        assert not _unknown_metrics(rule["expr"]), f"{rule['record']}: {_unknown_metrics(rule['expr'])}"
        assert 'job="celery-memguard"' in rule["expr"], rule["record"]


def test_rules_group_workers_as_the_report_does() -> None:
    """Every worker group label is made by the report's own label_replace (same regex)."""
    made_by_the_report = _squash(grouped("X").removeprefix("label_replace(X"))
    for rule in _rules():
        if "worker_group" in rule["record"] or "label_replace" in rule["expr"]:
            assert _squash(rule["expr"]).count(made_by_the_report) == 1, rule["record"]


def test_the_dashboard_reads_only_recorded_series_that_are_recorded() -> None:
    recorded = {rule["record"] for rule in _rules()}
    used = set(RECORDED.findall(DASHBOARD.read_text()))
    assert used, "the dashboard's fleet row reads the recorded series"
    assert used <= recorded, used - recorded
    # ... and the allow-list check of the dashboard still sees a known metric in each name.
    for name in used:
        assert METRIC.search(name)


def test_the_example_prometheus_configs_load_the_rules() -> None:
    for config in (SCRAPE, SCRAPE_K8S):
        assert RULES.name in yaml.safe_load(config.read_text())["rule_files"], config.name


def test_the_example_manifest_names_its_workers_for_a_worker_group() -> None:
    """Without --hostname every worker is celery@<pod>: one group for the whole namespace."""
    doc = next(d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "worker-with-memguard.yaml")
                                             .read_text()) if d and d["kind"] == "Deployment")
    worker = next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")
    names = [arg.split("=", 1)[1] for arg in worker["command"] if arg.startswith("--hostname=")]
    assert len(names) == 1
    assert re.fullmatch(r"[a-z0-9-]+@%h", names[0]), names
