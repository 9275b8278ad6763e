"""The daemon needs no root when it runs as the workers' user: a real daemon and a real prefork
worker, both started as one unprivileged user (nobody when the suite runs as root, else the
user running it), recycle a leak with no capability at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_memguard.daemon.procs import Procs
from tests.support import ROOT, Daemon, User, Worker

pytestmark = pytest.mark.slow

NOBODY = 65534  # nobody:nogroup
CALLS = 120
# What the daemon and the worker import, and the project tree they import it from.
PROBE = "import celery_memguard.cli, kombu.transport.redis, tests.apps.leaky"
LEFT_OUT = {"site-packages", "test", "idlelib", "tkinter", "turtledemo"}


def _ids() -> tuple[int, int]:
    if os.geteuid() == 0:
        return NOBODY, NOBODY
    return os.getuid(), os.getgid()


def _cannot_import(user: User) -> str | None:
    """Why ``user`` cannot import the daemon and the test app with its interpreter, or None."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **user.env}
    try:
        done = subprocess.run([user.python, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120, check=False, **user.popen_kwargs())
    except OSError as exc:
        return str(exc)
    return None if done.returncode == 0 else done.stderr.strip()[-300:]


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target``, or copy it where a link cannot be made."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _link_tree(source: Path, target: Path, skip: Callable[[str], bool] = lambda name: False,
               ) -> None:
    """``_link`` every file of ``source`` into ``target``, leaving out the directories no
    daemon or worker imports from, and files named as ``skip`` says."""
    for top, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in LEFT_OUT and d != "__pycache__"]
        here = target / Path(top).relative_to(source)
        here.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in files:
            if not skip(name):
                _link(Path(top, name), here / name)


def _readable_project(where: Path) -> dict[str, str]:
    """This environment's packages and the project's own (the daemon, the test app) linked
    outside a directory the user cannot enter (CI clones the project into a mode 0700
    directory), for the stand-in interpreter. The editable install's hooks are left out: they
    point into that directory. Returns the environment that finds them."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    site_packages = where / "site-packages"
    _link_tree(purelib, site_packages, skip=lambda name: name.startswith("__editable__"))
    project = where / "project"
    for package in ("celery_memguard", "tests"):
        _link_tree(ROOT / package, project / package)
    return {"PYTHONPATH": str(project), "MEMGUARD_TEST_SITE": str(site_packages)}


def _stand_in_interpreter(where: Path) -> tuple[str, dict[str, str]]:
    """This interpreter's installation outside the directory that hides it, with this
    environment's site-packages: the same Python and packages, for a user who cannot enter
    that directory (a pyenv under /root, mode 0700, hides its interpreter and so the venv's).
    Returns the interpreter and the environment it needs."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (where / "bin").mkdir(mode=0o755, parents=True)
    python = where / "bin" / version
    _link(Path(os.path.realpath(sys.executable)), python)
    (where / "lib").mkdir(mode=0o755)
    for library in (base / "lib").glob("libpython*"):
        _link(library, where / "lib" / library.name)
    _link_tree(base / "lib" / version, where / "lib" / version)
    site_packages = where / "lib" / version / "site-packages"
    site_packages.mkdir(mode=0o755)
    # This environment's packages: in place, or linked beside (MEMGUARD_TEST_SITE) when the
    # user cannot read them where they are.
    (site_packages / "memguard-test.pth").write_text(
        "import os, site; site.addsitedir(os.environ.get('MEMGUARD_TEST_SITE') or "
        f"{sysconfig.get_paths()['purelib']!r})\n")
    return str(python), {"LD_LIBRARY_PATH": str(where / "lib")}


@pytest.fixture
def unprivileged() -> Iterator[tuple[User, Path]]:
    """The unprivileged user, with an interpreter it can run, and a directory of its own for the
    socket, the config, the logs and the run log (not under pytest's, which only root enters)."""
    uid, gid = _ids()
    home = Path(tempfile.mkdtemp(prefix="memguard-user-"))
    stand_in = Path(tempfile.mkdtemp(prefix="memguard-python-"))
    try:
        os.chmod(stand_in, 0o755)  # noqa: S103 - the unprivileged user runs Python from it
        if os.geteuid() == 0:
            os.chown(home, uid, gid)
        env = {"HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1"}
        user = User(uid, gid, env=env)
        why = _cannot_import(user)
        if why is not None and os.geteuid() == 0:
            print(f"uid {uid} cannot use {sys.executable} ({why}): a stand-in interpreter runs")
            python, needs = _stand_in_interpreter(stand_in / "python")
            user = User(uid, gid, python=python, env={**env, **needs})
            why = _cannot_import(user)
            if why is not None:
                print(f"uid {uid} cannot read the project under {ROOT} ({why}): linked beside")
                user = User(uid, gid, python=python,
                            env={**env, **needs, **_readable_project(stand_in / "tree")})
                why = _cannot_import(user)
        if why is not None:
            pytest.skip(f"uid {uid} cannot import the daemon and the test app: {why}")
        yield user, home
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(stand_in, ignore_errors=True)


@pytest.fixture
def started(unprivileged: tuple[User, Path]) -> Iterator[list[Daemon | Worker]]:
    """Daemons and workers the test starts, stopped before the user's directory goes."""
    processes: list[Daemon | Worker] = []
    yield processes
    for process in reversed(processes):
        process.stop()


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def test_daemon_and_worker_as_one_unprivileged_user_recycle_with_no_capability(
        unprivileged: tuple[User, Path], started: list[Daemon | Worker], redis_url: str) -> None:
    """Run as the workers' unprivileged user, the daemon recycles the leak; nothing lost or repeated."""
    user, home = unprivileged
    daemon = Daemon(home, {"limits": {"soft": "120MiB", "hard": "1GiB"},
                           "sampling": {"interval": "250ms"}}, user=user)
    started.append(daemon)
    worker = Worker(home, f"{redis_url}/0", f"{redis_url}/1", socket_path=daemon.socket_path,
                    user=user)
    started.append(worker)
    worker.wait_ready()
    first_children = {c.pid for c in Procs().children(worker.pid)}

    results = [worker.send("keep", 2) for _ in range(CALLS)]
    assert all(r.get(timeout=60) for r in results)

    runs = worker.runs()
    assert len(runs) == CALLS, worker.output()
    assert [task for task, n in Counter(runs).items() if n > 1] == []
    assert daemon.metric("celery_memguard_recycles_total", reason="soft") >= 1, daemon.output()
    assert first_children - {c.pid for c in Procs().children(worker.pid)}, "no child was replaced"
    for pid in (daemon.proc.pid, worker.pid):
        status = _status(pid)
        assert status["Uid"].split()[:2] == [str(user.uid)] * 2, status["Uid"]
        assert status["Gid"].split()[:2] == [str(user.gid)] * 2, status["Gid"]
        assert int(status["CapEff"], 16) == 0, status["CapEff"]
        assert int(status["CapPrm"], 16) == 0, status["CapPrm"]
