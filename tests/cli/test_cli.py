"""The command line: version, status without a daemon, the demo's arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celery_memguard import __version__
from celery_memguard.cli import main
from tests.support import free_port


def test_version() -> None:
    done = subprocess.run([sys.executable, "-m", "celery_memguard", "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"celery-memguard {__version__}"


def test_status_without_a_daemon_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert "no celery-memguard daemon answers" in err
    assert "celery-memguard run --config" in err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "check-config" in capsys.readouterr().out
