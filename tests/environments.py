"""Cached environments with other packages than the test venv's: a virtualenv per Celery minor
in the supported range, and setproctitle in a folder of its own (installed in the test venv it
would retitle every worker of the suite).

Each lives under ``.venv-celery/`` (git-ignored) and carries the key of what it was built from
(the requirements and this Python): it is rebuilt only when they change. A fresh clone builds
each in a few seconds: ``pip --python`` installs into a venv made without pip of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT

CACHE = ROOT / ".venv-celery"

# The newest patch of each minor in range and what it needs pinned to start at all: 5.3 and
# 5.4 allow today's kombu, whose Redis transport wants redis-py >= 6.1 (which celery[redis]
# 5.3/5.4 caps below 6), and redis-py 5.3 deprecates a call their kombu still makes. The newest
# minor, 5.7, is the test venv's own (pyproject.toml).
MINORS: dict[str, tuple[str, ...]] = {
    "5.3": ("celery[redis]==5.3.6", "kombu<5.4", "redis<5.3"),
    "5.4": ("celery[redis]==5.4.0", "kombu<5.5", "redis<5.3"),
    "5.5": ("celery[redis]==5.5.3",),
    "5.6": ("celery[redis]==5.6.3",),
}
SETPROCTITLE = ("setproctitle==1.3.8",)


def _key(requirements: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join((sys.version, *requirements)).encode()).hexdigest()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One builder at a time (two test sessions in one work tree)."""
    CACHE.mkdir(exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(where: Path, requirements: tuple[str, ...], venv: bool) -> None:
    """A venv at ``where`` with ``requirements``, or (not ``venv``) a folder holding them."""
    stamp = where / ".memguard-key"
    key = _key(requirements)
    with _locked():
        if stamp.exists() and stamp.read_text() == key:
            return
        shutil.rmtree(where, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
        try:
            if venv:
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)],
                               check=True, capture_output=True)
                pip += ["--python", str(where / "bin" / "python"), "install"]
            else:
                pip += ["install", "--target", str(where)]
            subprocess.run([*pip, *requirements], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(where, ignore_errors=True)
            raise RuntimeError(f"cannot build {where}: {exc.stderr[-2000:]}") from None
        stamp.write_text(key)


def celery_python(minor: str) -> str:
    """The interpreter of the cached venv for a Celery minor (the test venv's for 5.7)."""
    if minor not in MINORS:
        return sys.executable
    where = CACHE / minor
    _build(where, MINORS[minor], venv=True)
    return str(where / "bin" / "python")


def setproctitle_path() -> str:
    """A folder holding setproctitle, for a worker's PYTHONPATH."""
    where = CACHE / "setproctitle"
    _build(where, SETPROCTITLE, venv=False)
    return str(where)
