"""A supervisor over the scripted process table, with its socket's files in the test's directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import structlog

from celery_memguard.daemon import config
from celery_memguard.daemon.supervisor import Supervisor
from celery_memguard.protocol import grants, paths
from tests.builders import MAIN, MiB
from tests.fakes import Clock, FakeProcs

SOCKET: Path | None = None  # set per test by the autouse fixture in conftest.py


def make_config(**sections: Any) -> config.Config:
    """Limits of 100/200 MiB, no jitter and no minimum lifetime unless a test sets them."""
    data: dict[str, Any] = {"limits": {"soft": "100MiB", "hard": "200MiB"},
                            "recycle": {"jitter": 0, "min_lifetime": 0},
                            "agent": {"socket": str(SOCKET)}}
    for key, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(key, {}).update(values)
        else:
            data[key] = values
    return config.parse(data, memory_total=16 * 1024 * MiB, env={})


def make(procs: FakeProcs, clock: Clock | None = None, **sections: Any) -> Supervisor:
    return Supervisor(make_config(**sections), procs, clock or Clock(), structlog.get_logger())


def grant_file(sup: Supervisor) -> dict[str, Any]:
    """The worker MAIN's grant file as the children read it."""
    path = Path(paths.grant_path(str(sup.config.agent.socket), MAIN))
    return dict(json.loads(path.read_text()))


def take(sup: Supervisor, pid: int, reason: str = "soft") -> None:
    """Child ``pid`` of MAIN takes a unit of its worker's grant, as its agent would."""
    path = paths.grant_path(str(sup.config.agent.socket), MAIN)
    assert grants.take(path, pid, (MAIN, MAIN * 10), reason)
