"""``celery-memguard doctor``: each fact ok, warn or fail with its fix; exit 1 on any fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from celery_memguard.cli import main
from celery_memguard.cli.doctor import Check, diagnose, look_here
from celery_memguard.cli.render import status_table
from celery_memguard.protocol import hooks
from tests.support import free_port

SOCK = "/run/memguard/agent.sock"
URL = "http://127.0.0.1:9808"


def document(**worker: Any) -> dict[str, Any]:
    """A daemon's /status with one healthy worker, whose entries ``worker`` replaces."""
    entry: dict[str, Any] = {
        "name": "w1@h", "pid": 10, "pool": "prefork", "concurrency": 2, "agent": True,
        "agent_state": "full", "missing_hooks": [], "restartable": False,
        "max_concurrency": None, "versions": {"celery": "5.7.0", "billiard": "4.3.2",
                                              "python": "3.11.7"},
        "socket": SOCK, "may_signal": True, "container_limit_bytes": 2 << 30,
        "limits": {"soft": 512 << 20, "hard": 1 << 30},
        "limit_sources": {"soft": "limits.soft", "hard": "default"}, "children": [],
        "recycles": {}}
    entry.update(worker)
    return {"version": "0.1.0", "memory_total_bytes": 8 << 30, "memory_total_source": "cgroup",
            "daemon": {"pid": 5, "uid": 0, "socket": {"path": SOCK, "source": "agent.socket",
                                                      "exists": True, "is_socket": True,
                                                      "mode": "0660", "uid": 0, "gid": 0}},
            "workers": [entry]}


def levels(checks: list[Check], subject: str = "w1@h") -> list[tuple[str, str]]:
    return [(c.level, c.what) for c in checks if c.subject == subject]


def test_a_healthy_worker_is_all_ok() -> None:
    checks = diagnose(document(), URL)
    assert {c.level for c in checks} == {"ok"}, checks
    said = " | ".join(c.what for c in checks)
    for fact in ("reachable at", "mode 0660", "memory limit found: 8.0 GiB (its cgroup)",
                 "agent: every hook joined", "Celery 5.7.0, billiard 4.3.2, Python 3.11.7",
                 "pool prefork", f"its agent uses the daemon's socket {SOCK}",
                 "soft 512.0 MiB from limits.soft", "container memory limit 2.0 GiB",
                 "the daemon may signal its processes"):
        assert fact in said, fact


@pytest.mark.parametrize(("worker", "level", "says", "fix"), [
    ({"agent_state": "degraded", "missing_hooks": [hooks.PREPARE_RESULT]}, "fail",
     f"agent degraded: {hooks.PREPARE_RESULT} missing", "pin billiard<4.4"),
    ({"agent_state": "degraded", "missing_hooks": [hooks.HELLO]}, "fail",
     "never announced itself", "celery_memguard.install(app)"),
    ({"agent_state": "none", "agent": False, "versions": {}}, "warn", "no agent: observe-only",
     f"CELERY_MEMGUARD_SOCKET={SOCK}"),
    ({"may_signal": False}, "fail", "may not signal", "CAP_KILL"),
    ({"socket": "/shared/agent.sock"}, "warn", "its agent uses /shared/agent.sock", "volume"),
    ({"versions": {"celery": "5.2.7", "billiard": "3.6.4", "python": "3.9"}}, "warn",
     "outside the tested", "tested pair"),
    ({"pool": "threads"}, "warn", "pool threads", "restart_worker=True"),
    ({"container_limit_bytes": None}, "ok", "no container memory limit found", ""),
])
def test_each_finding_has_its_level_and_fix(worker: dict[str, Any], level: str, says: str,
                                            fix: str) -> None:
    [check] = [c for c in diagnose(document(**worker), URL) if says in c.what]
    assert check.level == level
    assert fix in check.fix


def test_an_unreachable_daemon_fails_and_says_how_to_start_it() -> None:
    [check] = diagnose(None, URL, "Connection refused")
    assert (check.level, check.subject) == ("fail", "daemon")
    assert "Connection refused" in check.what
    assert "celery-memguard run --config" in check.fix


def test_a_socket_missing_or_unreachable_from_here_is_said(tmp_path: Path) -> None:
    gone = look_here(str(tmp_path / "none.sock"))
    [check] = [c for c in diagnose(document(), URL, here=gone)
               if c.subject == "socket" and "not visible from here" in c.what]
    assert check.level == "warn"
    bound = document()
    bound["daemon"]["socket"] |= {"exists": False, "error": "No such file or directory"}
    assert any(c.level == "fail" and "missing as the daemon sees it" in c.what
               for c in diagnose(bound, URL))


def test_the_command_exits_1_and_prints_json_when_the_daemon_is_down(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--url", f"http://127.0.0.1:{free_port()}", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert out["checks"][0]["level"] == "fail"


def test_status_names_a_degraded_workers_missing_hooks() -> None:
    console = Console(record=True, width=200)
    doc = document(agent_state="degraded", missing_hooks=[hooks.WAIT_FOR_JOB])
    status_table(doc | {"limits": {"soft": 1, "hard": 2}}, console)
    text = console.export_text()
    assert f"agent degraded: {hooks.WAIT_FOR_JOB} missing" in text
    assert "celery-memguard doctor" in text
