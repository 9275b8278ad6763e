"""The deployment assets under deploy/: Prometheus rules, Grafana dashboard, systemd unit,
Kubernetes manifest, and scripts/ensure-tools.

promtool and systemd-analyze come from Debian packages and kubernetes-validate from PyPI;
scripts/ensure-tools installs them. A test that needs a missing one skips, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_memguard.daemon import config
from celery_memguard.daemon.inbox import Inbox, SocketError
from celery_memguard.daemon.metrics import Metrics
from celery_memguard.daemon.view import View
from tests.builders import child, snapshot, worker
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
SCRAPE = DEPLOY / "prometheus" / "scrape.yaml"
SCRAPE_K8S = DEPLOY / "prometheus" / "scrape-kubernetes.yaml"
DASHBOARD = DEPLOY / "grafana" / "celery-memguard.json"
UNIT = DEPLOY / "systemd" / "celery-memguard.service"
MANIFEST = DEPLOY / "kubernetes" / "worker-with-memguard.yaml"
ENSURE_TOOLS = ROOT / "scripts" / "ensure-tools"
JOB = "celery-memguard"

# What the daemon exports today (checked against the collector below) ...
EXISTING = {
    "child_rss_bytes", "child_uss_bytes", "child_tasks", "child_busy", "worker_rss_bytes",
    "worker_children", "worker_info", "limit_bytes", "recycles_total", "dry_run_recycles_total",
    "messages_total", "messages_dropped_total", "build_info", "memory_total_bytes",
    "agent_connections", "quarantined_task_ids",
    "tick_seconds_bucket", "tick_seconds_sum", "tick_seconds_count",
}
# ... and what it is about to export. Histograms only by their series' suffixes: a query on
# the bare name returns nothing.
COMING = {
    "child_leak_bytes_per_task", "child_leak_bytes_per_second", "child_seconds_to_limit",
    "recommended_max_tasks_per_child", "child_leaking", "child_tasks_to_limit",
    # counters and histograms whose series appear with their first count (none in an empty daemon)
    "oom_kills_total", "interrupted_tasks_total", "worker_restarts_total",
    "task_memory_growth_bytes_bucket", "task_memory_growth_bytes_sum",
    "task_memory_growth_bytes_count", "task_holds_total", "task_hold_seconds_total",
    "task_peak_growth_bytes",
    # one series per hook a worker's agent could not join (none while every agent is full)
    "agent_hook_missing",
    # the worker's container, where the daemon can read its memory cgroup
    "container_memory_usage_bytes", "container_memory_working_set_bytes",
    "container_memory_limit_bytes", "container_memory_high_bytes",
    "container_memory_events_total", "container_memory_pressure",
    "container_memory_pressure_seconds_total", "container_memory_stalls_total",
}
ALLOWED = {"celery_memguard_" + name for name in EXISTING | COMING}
METRIC = re.compile(r"celery_memguard_[a-z_]+")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: run scripts/ensure-tools")
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _unknown_metrics(expr: str) -> set[str]:
    return set(METRIC.findall(expr)) - ALLOWED


# -- the allow-list is the daemon's truth -------------------------------------------------------


def test_allow_list_matches_what_the_daemon_exports() -> None:
    view = View(
        snapshot=snapshot(worker(child(0, uss=1000, task="app.t"))),
        limits={"soft": 100, "hard": 200}, measure="rss", dry_run=False,
        recycles={("w@h", "soft"): 1}, dry_run_recycles={("w@h", "soft"): 1},
        messages={"task_end": 1}, dropped={"gone": 1})
    metrics = Metrics(lambda: view)
    metrics.tick_seconds.observe(0.001)
    samples = re.findall(r"^(celery_memguard_[a-z_]+)", metrics.render().decode(), re.MULTILINE)
    exported = {name for name in samples if not name.endswith("_created")}
    prefixed_existing = {"celery_memguard_" + name for name in EXISTING}
    assert prefixed_existing <= exported, f"no longer exported: {prefixed_existing - exported}"
    assert exported <= ALLOWED, (
        f"exported but unknown to the deploy assets' allow-list: {exported - ALLOWED}; "
        f"add them here and to the dashboard/alerts")


# -- Prometheus -------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("alert", [rule["alert"] for rule in _alert_rules()])
def test_alert_tests_fail_when_the_alert_never_fires(tmp_path: Path, alert: str) -> None:
    """Each alert's expression, replaced by one that yields nothing, fails the unit tests."""
    promtool = _tool("promtool")
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(0) > 1"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(doc))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    result = _run(promtool, "test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode != 0, f"alerts_test.yaml never sees {alert} fire"
    assert f"alertname: {alert}" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = [case for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in _alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case.get("exp_alerts") for case in mine), f"{rule['alert']}: no firing case"
        assert any(not case.get("exp_alerts") for case in mine), f"{rule['alert']}: no quiet case"


def test_alerts_carry_severity_and_annotations_and_known_metrics() -> None:
    rules = _alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert rule["annotations"]["description"].strip(), name
        assert not _unknown_metrics(rule["expr"]), f"{name}: {_unknown_metrics(rule['expr'])}"
    exprs = " ".join(rule["expr"] for rule in rules)
    # What the brief asks to alert on.
    for needed in ("celery_memguard_child_rss_bytes", "celery_memguard_child_seconds_to_limit",
                   "celery_memguard_recycles_total", "celery_memguard_oom_kills_total",
                   "celery_memguard_interrupted_tasks_total", "celery_memguard_messages_dropped_total",
                   f'up{{job="{JOB}"}}', f'absent(up{{job="{JOB}"}})'):
        assert needed in exprs, needed
    # Per-child alerts name the child in their texts.
    for rule in rules:
        if "celery_memguard_child_" in rule["expr"]:
            text = rule["annotations"]["summary"] + rule["annotations"]["description"]
            assert "$labels.worker" in text
            assert "$labels.index" in text


def test_scrape_config_passes_promtool_and_names_the_job() -> None:
    promtool = _tool("promtool")
    jobs = [job["job_name"] for job in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]]
    assert jobs == [JOB]
    result = _run(promtool, "check", "config", SCRAPE.name, cwd=SCRAPE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_scrape_config_labels_its_targets_with_the_job() -> None:
    job = yaml.safe_load(SCRAPE_K8S.read_text())["scrape_configs"][0]
    relabels = job["relabel_configs"]
    assert {"target_label": "job", "replacement": JOB, "action": "replace"} in relabels
    port_rule = next(rule for rule in relabels
                     if rule.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"])
    assert port_rule["action"] == "keep"
    assert port_rule["regex"] == _memguard_container()["ports"][0]["name"]


def test_kubernetes_scrape_config_passes_promtool() -> None:
    promtool = _tool("promtool")
    result = _run(promtool, "check", "config", SCRAPE_K8S.name, cwd=SCRAPE_K8S.parent)
    output = result.stdout + result.stderr
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool is built without Kubernetes discovery (Debian's is)")
    assert result.returncode == 0, output


# -- Grafana ----------------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]


def test_dashboard_variables_and_datasource() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] == 39
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    query = variables["worker"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(celery_memguard_worker_info, worker)"
    assert variables["worker"]["datasource"]["uid"] == "${datasource}"
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_use_only_known_metrics() -> None:
    exprs = _exprs(_dashboard())
    assert exprs
    for expr in exprs:
        assert METRIC.search(expr) or f'up{{job="{JOB}"}}' in expr, expr
        assert not _unknown_metrics(expr), f"{_unknown_metrics(expr)} in {expr}"
    used = set(METRIC.findall(" ".join(exprs)))
    for needed in ("child_rss_bytes", "limit_bytes", "child_leak_bytes_per_task",
                   "child_leak_bytes_per_second", "recycles_total", "task_memory_growth_bytes_sum",
                   "task_memory_growth_bytes_count", "oom_kills_total", "interrupted_tasks_total",
                   "tick_seconds_bucket", "messages_dropped_total"):
        assert "celery_memguard_" + needed in used, needed


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in, is checked by promtool as a recording rule."""
    promtool = _tool("promtool")
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "6h",
            "$worker_group": ".*",  # before $worker, which it starts with
            "$worker": ".*", "$instance": ".*", "$cluster": ".*", "$namespace": ".*", "$pod": ".*"}
    rules = []
    for number, query in enumerate(_exprs(_dashboard())):
        expr = query
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, query
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_layout() -> None:
    panels = _panels(_dashboard())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


# -- systemd ----------------------------------------------------------------------------------------


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def _verify(unit: Path) -> str:
    """systemd-analyze verify's complaints about this unit ('' when none)."""
    result = _run(_tool("systemd-analyze"), "verify", str(unit))
    lines = (result.stdout + result.stderr).splitlines()
    mine = [line for line in lines if unit.name in line]
    if result.returncode != 0:
        mine.append(f"exit {result.returncode}: {result.stdout}{result.stderr}")
    return "\n".join(mine)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The unit as shipped, ExecStart's binary pointed at this checkout's venv."""
    _tool("systemd-analyze")
    binary = Path(sys.executable).parent / "celery-memguard"
    assert binary.exists(), binary
    text = UNIT.read_text()
    shipped = "ExecStart=/usr/local/bin/celery-memguard "
    assert text.count(shipped) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(shipped, f"ExecStart={binary} "))
    assert _verify(unit) == ""
    # The check has teeth: a misspelt directive is reported.
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    assert "NoNewPrivilege" in _verify(broken)


def test_systemd_unit_settings() -> None:
    settings = _unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        assert len(settings.get(key, [])) == 1, key
        return settings[key][0]

    assert one("ExecStart").endswith("celery-memguard run --config /etc/celery-memguard/memguard.yaml")
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("User") == "celery"
    assert one("Group") == "celery"
    assert one("Restart") == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                       "ProtectControlGroups": "yes", "RuntimeDirectoryMode": "0750"}.items():
        assert one(key) == value, key
    # The socket lives in the runtime directory, which the workers can reach.
    runtime = one("RuntimeDirectory")
    environment = dict(item.split("=", 1) for item in settings["Environment"])
    assert environment[config.SOCKET_ENV] == f"/run/{runtime}/agent.sock"
    # No capability unless the workers run as another user (then uncommented by hand).
    assert "AmbientCapabilities" not in settings
    assert settings["CapabilityBoundingSet"] == [""]
    assert "ProtectProc" not in settings  # =invisible would hide the workers
    assert "RemoveIPC" not in settings  # would remove the workers' semaphores (same user)


def test_systemd_runtime_directory_is_one_the_daemon_binds_in(tmp_path: Path) -> None:
    """The directory the unit makes (its mode included) is one the daemon accepts: it binds
    the socket there, workers in its group can connect, and no one else can write to it."""
    settings = _unit_settings(UNIT.read_text())
    mode = int(settings["RuntimeDirectoryMode"][0], 8)
    directory = tmp_path / settings["RuntimeDirectory"][0]
    directory.mkdir()
    directory.chmod(mode)  # exactly the unit's mode, whatever this process's umask
    inbox = Inbox(directory / "agent.sock")
    inbox.open()
    try:
        assert stat.S_IMODE((directory / "agent.sock").stat().st_mode) == 0o660
        assert not mode & stat.S_IWOTH, "a directory every user may write to is refused"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(str(directory / "agent.sock"))
    finally:
        inbox.close()


# -- Kubernetes -------------------------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def _one(kind: str) -> dict[str, Any]:
    found = [doc for doc in _documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("Deployment")["spec"]["template"]["spec"]
    return spec


def _memguard_container() -> dict[str, Any]:
    found = [c for c in _pod()["containers"] if c["command"][:2] == ["celery-memguard", "run"]]
    assert len(found) == 1
    return found[0]


def _worker_container() -> dict[str, Any]:
    found = [c for c in _pod()["containers"] if c is not _memguard_container()
             and c["name"] != _memguard_container()["name"]]
    assert len(found) == 1
    return found[0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _memguard_config_text() -> str:
    text: str = _one("ConfigMap")["data"]["memguard.yaml"]
    return text


def _socket_mount() -> str:
    volumes = {volume["name"]: volume for volume in _pod()["volumes"]}
    socket_path = _env(_memguard_container())[config.SOCKET_ENV]
    mounts = [m for m in _memguard_container()["volumeMounts"]
              if socket_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(mounts) == 1
    assert "emptyDir" in volumes[mounts[0]["name"]]
    return str(mounts[0]["mountPath"])


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def _quantity(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def test_manifest_kinds_and_api_versions() -> None:
    kinds = [(doc["apiVersion"], doc["kind"]) for doc in _documents()]
    assert kinds == [("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("v1", "Service"),
                     ("monitoring.coreos.com/v1", "ServiceMonitor")]


def test_manifest_shares_processes_socket_and_env() -> None:
    pod = _pod()
    assert pod["shareProcessNamespace"] is True
    sidecar, worker_ = _memguard_container(), _worker_container()
    mount_path = _socket_mount()
    mounts = {(m["name"], m["mountPath"]) for m in worker_["volumeMounts"]}
    sidecar_mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == mount_path)
    assert (sidecar_mount["name"], mount_path) in mounts, "the worker does not mount the socket volume"
    assert mount_path == "/run/celery-memguard"
    assert _env(worker_)[config.SOCKET_ENV] == _env(sidecar)[config.SOCKET_ENV]
    parsed = config.parse(yaml.safe_load(_memguard_config_text()), memory_total=2**34, env={})
    assert str(parsed.agent.socket) == _env(sidecar)[config.SOCKET_ENV]


def test_manifest_socket_path_survives_a_world_writable_empty_dir(tmp_path: Path) -> None:
    """kubelet makes an emptyDir 0777: the daemon must bind one directory below it."""
    mount = tmp_path / "mount"
    mount.mkdir()
    mount.chmod(0o777)
    relative = Path(_env(_memguard_container())[config.SOCKET_ENV]).relative_to(_socket_mount())
    inbox = Inbox(mount / relative)
    inbox.open()
    inbox.close()
    # ... whereas a socket right in the mount would be refused.
    with pytest.raises(SocketError, match="writable by every user"):
        Inbox(mount / "agent.sock").open()


def test_manifest_config_validates_and_serves_on_the_probed_port() -> None:
    parsed = config.parse(yaml.safe_load(_memguard_config_text()), memory_total=2**34, env={})
    host, port = config.split_listen(parsed.metrics.listen)
    assert host == "0.0.0.0"  # noqa: S104 - Prometheus scrapes the pod IP
    sidecar = _memguard_container()
    assert port in [p["containerPort"] for p in sidecar["ports"]]
    for probe in ("livenessProbe", "readinessProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert _port_number(sidecar, get["port"]) == port, probe
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    # The config file the sidecar is told to read is the ConfigMap's key.
    config_path = Path(sidecar["command"][sidecar["command"].index("--config") + 1])
    volumes = {volume["name"]: volume for volume in _pod()["volumes"]}
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    assert volumes[mount["name"]]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config_path.name in _one("ConfigMap")["data"]


def test_manifest_limits_fit_the_worker_container() -> None:
    """concurrency x hard limit stays below the worker's memory limit, with room for its main."""
    parsed = config.parse(yaml.safe_load(_memguard_config_text()), memory_total=2**34, env={})
    worker_ = _worker_container()
    concurrency = int(next(arg.split("=", 1)[1] for arg in worker_["command"]
                           if arg.startswith("--concurrency=")))
    limit = _quantity(worker_["resources"]["limits"]["memory"])
    assert concurrency * parsed.limits.hard + 256 * 2**20 <= limit


def test_manifest_security_and_resources() -> None:
    pod = _pod()
    pod_context = pod.get("securityContext", {})
    users = set()
    for container in pod["containers"]:
        context = {**pod_context, **container.get("securityContext", {})}
        name = container["name"]
        assert context["runAsNonRoot"] is True, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert not context.get("capabilities", {}).get("add"), name
        assert not context.get("privileged", False), name
        users.add(context["runAsUser"])
        assert container["resources"]["requests"]["memory"], name
        assert container["resources"]["limits"]["memory"], name
    assert len(users) == 1, "both containers must run as one user so signals need no capability"


def test_manifest_service_monitor_selects_the_metrics_port() -> None:
    service, monitor = _one("Service"), _one("ServiceMonitor")
    assert service["metadata"]["name"] == JOB  # the targets' job label
    pod_labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    sidecar_ports = {p["name"] for p in _memguard_container()["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        assert service_ports[endpoint["port"]]["targetPort"] in sidecar_ports


def test_manifest_matches_the_kubernetes_schemas() -> None:
    """Strict schemas: an unknown or misspelt field is an error. The CRD is not in them."""
    try:
        import kubernetes_validate  # noqa: PLC0415 - optional, installed by scripts/ensure-tools
    except ImportError:
        pytest.skip("kubernetes-validate not installed: run scripts/ensure-tools")
    for doc in _documents():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    broken = _one("Deployment")
    broken["spec"]["template"]["spec"]["shareProcessNamespaces"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


# -- scripts/ensure-tools ---------------------------------------------------------------------------


def _stub_bin(directory: Path, tools: dict[str, str]) -> Path:
    directory.mkdir()
    for name, body in tools.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    for name in ("dirname",):
        os.symlink(shutil.which(name) or f"/usr/bin/{name}", directory / name)
    return directory


def _ensure_tools_copy(tmp_path: Path) -> Path:
    """A copy in a checkout without .venv, so that it never reaches for pip."""
    script = tmp_path / "checkout" / "scripts" / "ensure-tools"
    script.parent.mkdir(parents=True)
    shutil.copy(ENSURE_TOOLS, script)
    return script


def test_ensure_tools_is_an_executable_bash_script() -> None:
    assert os.access(ENSURE_TOOLS, os.X_OK)
    result = _run("bash", "-n", str(ENSURE_TOOLS))
    assert result.returncode == 0, result.stderr


def test_ensure_tools_never_fails_when_it_cannot_install(tmp_path: Path) -> None:
    bin_dir = _stub_bin(tmp_path / "bin", {"id": "echo 1000"})
    script = _ensure_tools_copy(tmp_path)
    result = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={"PATH": str(bin_dir)}, check=False)
    assert result.returncode == 0, result.stderr
    assert "missing: promtool prometheus systemd-analyze" in result.stdout
    assert "(Debian packages: prometheus systemd)" in result.stdout  # the server's package once
    assert "not root: not installing" in result.stdout


def test_ensure_tools_installs_nothing_when_the_tools_are_there(tmp_path: Path) -> None:
    bin_dir = _stub_bin(tmp_path / "bin", {"id": "echo 0", "promtool": "exit 0",
                                           "prometheus": "exit 0", "systemd-analyze": "exit 0",
                                           "apt-get": "echo apt-get must not run; exit 1"})
    script = _ensure_tools_copy(tmp_path)
    result = subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, timeout=30,
                            env={"PATH": str(bin_dir)}, check=False)
    assert result.returncode == 0, result.stderr
    assert "nothing to install with apt-get" in result.stdout
    assert "apt-get must not run" not in result.stdout
