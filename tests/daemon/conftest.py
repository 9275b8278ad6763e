"""Fixtures for driving the daemon without processes: a fake table, captured logs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.builders import KID0, KID1, MAIN
from tests.daemon import harness
from tests.fakes import FakeProcs


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


@pytest.fixture
def procs() -> FakeProcs:
    """A worker MAIN (``celery worker``) with two pool children, KID0 and KID1."""
    fake = FakeProcs()
    fake.add(MAIN, 1, cmdline=("celery", "worker"))
    fake.add(KID0, MAIN)
    fake.add(KID1, MAIN)
    return fake


@pytest.fixture(autouse=True)
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """Each supervisor here keeps its socket's neighbours (grant files) in the test's directory."""
    harness.SOCKET = tmp_path / "run" / "agent.sock"
    harness.SOCKET.parent.mkdir()
    yield harness.SOCKET.parent
    harness.SOCKET = None
