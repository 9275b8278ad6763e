"""Real processes for the integration tests: brokers, a Celery worker, the daemon, a sampler.

Every process is started in its own session and killed by its fixture, also when the test
fails; nothing is ever killed by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery

from celery_memguard.daemon.procs import Procs

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        try:
            sock.connect((host, port))
        except OSError:
            return False
        return True


def redis_pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A redis-server on a free loopback port, for machines where none runs."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no Redis answers on 127.0.0.1:6379 and redis-server is not installed")
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not redis_pings(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        kill_group(self.proc)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``check`` every 50 ms until it holds; fail with ``what`` after ``timeout`` seconds."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, what
        time.sleep(0.05)
    return time.monotonic() - start


def tail(log: Any, path: Path) -> str:
    """The last 3,000 characters a process wrote to its log, for assertion messages."""
    log.flush()
    return path.read_text(errors="replace")[-3000:]


@dataclass(frozen=True)
class User:
    """Who a test's process runs as: uid and gid, an interpreter that user can run, and
    variables added to the environment (for that interpreter, HOME, ...)."""

    uid: int
    gid: int
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)

    def popen_kwargs(self) -> dict[str, Any]:
        """Popen arguments that switch to this user; none when this process already is it."""
        if (os.geteuid(), os.getegid()) == (self.uid, self.gid):
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def kill_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process, then SIGKILL its whole session if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Worker:
    """A prefork worker of ``tests.apps.leaky`` with its own queue and nodename, started by
    ``celery worker`` or another ``mode``: ``multi`` (``celery multi start``, detached; its
    pid is read from its pidfile), or one of the programs in tests/apps/hosts.py that run a
    worker inside themselves. ``python``: another interpreter (another Celery's venv)."""

    def __init__(self, tmp: Path, broker: str, backend: str, *, socket_path: Path | None,
                 concurrency: int = 2, acks_late: bool = False, agent: bool = True,
                 extra_args: tuple[str, ...] = (), name: str | None = None,
                 queue: str | None = None, restart: bool = False,
                 global_args: tuple[str, ...] = (), user: User | None = None,
                 cgroup: MemoryCgroup | None = None, extra_env: dict[str, str] | None = None,
                 mode: str = "cli", python: str | None = None) -> None:
        self.queue = queue or f"q{os.getpid()}_{free_port()}"
        self.mode = mode
        self.pidfile = tmp / f"{self.queue}.pid" if mode == "multi" else None
        host = socket.gethostname()
        self.node_arg = name or f"{self.queue}@{host if mode == 'multi' else 'memguard-test'}"
        self.name = self.node_arg.replace("%h", host).replace("%n", host.split(".")[0])
        self.concurrency = concurrency
        self.run_log = tmp / f"{self.queue}.runs"
        self.log_path = tmp / f"{self.queue}.{free_port()}.worker.log"
        self.client = Celery("client", broker=broker, backend=backend)
        self.client.conf.broker_connection_retry_on_startup = True
        env = dict(os.environ)
        env.update({
            "MEMGUARD_TEST_BROKER": broker, "MEMGUARD_TEST_BACKEND": backend,
            "MEMGUARD_TEST_ACKS_LATE": "1" if acks_late else "0",
            "MEMGUARD_TEST_NO_AGENT": "0" if agent else "1",
            "MEMGUARD_TEST_RESTART": "1" if restart else "0",
            "MEMGUARD_TEST_RUN_LOG": str(self.run_log),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "MEMGUARD_TEST_QUEUE": self.queue, "MEMGUARD_TEST_NAME": self.node_arg,
            "MEMGUARD_TEST_CONCURRENCY": str(concurrency),
        })
        if socket_path is not None:
            env["CELERY_MEMGUARD_SOCKET"] = str(socket_path)
        if user is not None:
            env.update(user.env)
        for key, value in (extra_env or {}).items():  # a PYTHONPATH given goes first
            env[key] = value + os.pathsep + env[key] if key == "PYTHONPATH" else value
        self.env = env
        self.log = self.log_path.open("wb")
        self.args = extra_args
        python = python or (user.python if user else sys.executable)
        options = ["--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args]
        if mode == "cli":
            argv = [python, "-m", "celery", "-A", "tests.apps.leaky", *global_args, "worker",
                    "-c", str(concurrency), "-Q", self.queue, "-n", self.node_arg,
                    "--loglevel", "warning", *options]
        elif mode == "multi":  # it names the node NAME@host itself
            argv = [python, "-m", "celery", "multi", "start", self.name.split("@")[0],
                    "-A", "tests.apps.leaky", "-c", str(concurrency), "-Q", self.queue,
                    f"--pidfile={self.pidfile}", f"--logfile={self.log_path}.multi",
                    "--loglevel=warning", *options]
        else:
            argv = [python, "-m", "tests.apps.hosts", mode]
        self.proc = subprocess.Popen(
            cgroup.command(argv) if cgroup is not None else argv,
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, **(user.popen_kwargs() if user else {}))

    @property
    def pid(self) -> int:
        """The worker's main process (a detached one's from its pidfile; 0 until written)."""
        if self.pidfile is None:
            return self.proc.pid
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and (self.pidfile is None or self.proc.returncode):
                raise RuntimeError(f"worker exited {self.proc.returncode}: {self.output()}")
            if not self.pid:
                time.sleep(0.1)
                continue
            children_ready = "-P" in self.args or len(Procs().children(self.pid)) >= self.concurrency
            if children_ready and self.client.control.ping(
                    destination=[self.name], timeout=0.5):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout}s: {self.output()}")

    def send(self, task: str, *args: Any) -> Any:
        return self.client.send_task(f"tests.apps.leaky.{task}", args=args, queue=self.queue)

    def runs(self) -> list[str]:
        if not self.run_log.exists():
            return []
        return [line.split()[0] for line in self.run_log.read_text().splitlines() if line]

    def output(self) -> str:
        multi = Path(f"{self.log_path}.multi")
        return tail(self.log, self.log_path) + (multi.read_text(errors="replace")[-3000:]
                                                 if multi.exists() else "")

    def stop(self) -> None:
        """Stop the worker; a detached one (multi) by the pid in its pidfile, then its process
        group (the one its detaching made, never ours) while the pid is still that process."""
        kill_group(self.proc)
        pid = self.pid if self.pidfile is not None else 0
        stat = Procs().stat(pid) if pid else None
        if stat is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Procs().stat(pid) == stat and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if Procs().stat(pid) == stat and group != os.getpgid(0):
                    os.killpg(group, signal.SIGKILL)
        self.log.close()
        self.client.close()


class Daemon:
    """``python -m celery_memguard run`` with a config written to tmp."""

    def __init__(self, tmp: Path, config: dict[str, Any], socket_path: Path | None = None,
                 user: User | None = None) -> None:
        import yaml  # noqa: PLC0415

        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket_path = socket_path or tmp / "sock" / "agent.sock"
        self.url = f"http://127.0.0.1:{self.port}"
        merged: dict[str, Any] = {"agent": {"socket": str(self.socket_path)},
                                  "metrics": {"listen": f"127.0.0.1:{self.port}"},
                                  "log": {"format": "json", "level": "debug"}}
        for section, values in config.items():
            if isinstance(values, dict):
                merged.setdefault(section, {}).update(values)
            else:
                merged[section] = values
        self.config_path = tmp / "memguard.yaml"
        self.config_path.write_text(yaml.safe_dump(merged))
        self.log_path = tmp / "daemon.log"
        self.log = self.log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if k != "CELERY_MEMGUARD_SOCKET"}
        if user is not None:
            env.update(user.env)
        self.proc = subprocess.Popen(
            [user.python if user else sys.executable, "-m", "celery_memguard", "run",
             "--config", str(self.config_path)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            **(user.popen_kwargs() if user else {}))
        deadline = time.monotonic() + 15
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.output()  # before stop() closes the log
                self.stop()
                raise RuntimeError(f"daemon did not start: {output}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=5) as response:
            return str(response.read().decode())

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/status")))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

        total = 0.0
        for family in text_string_to_metric_families(self.get("/metrics")):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def events(self) -> list[dict[str, Any]]:
        self.log.flush()
        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def output(self) -> str:
        return tail(self.log, self.log_path)

    def stop(self) -> None:
        kill_group(self.proc)
        self.log.close()


_S = TypeVar("_S", bound="Sampler")


class Sampler:
    """A thread that calls ``sample`` every ``period`` while the ``with`` block runs."""

    def __init__(self, worker_pid: int, period: float) -> None:
        self.worker_pid, self.period = worker_pid, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self: _S) -> _S:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs = Procs()
        while not self._stop.wait(self.period):
            self.sample(procs)

    def sample(self, procs: Procs) -> None:
        raise NotImplementedError


class RssSampler(Sampler):
    """Reads the RSS of every child of a worker every ``period``, independently of the daemon:
    the peak per pid, and for each threshold the first time a pid crossed it, the first time it
    was back under, and the last time the pid was seen; with ``series``, every reading."""

    def __init__(self, worker_pid: int, period: float = 0.05,
                 thresholds: tuple[int, ...] = (), series: bool = False) -> None:
        super().__init__(worker_pid, period)
        self.thresholds, self.keep_series = thresholds, series
        self.series: dict[int, list[tuple[float, int]]] = {}  # pid -> (monotonic time, rss)
        self.start: dict[int, int] = {}  # pid -> start time in clock ticks
        self.peak: dict[int, int] = {}
        self.crossed: dict[tuple[int, int], float] = {}
        self.recovered: dict[tuple[int, int], float] = {}
        self.last_seen: dict[int, float] = {}

    def sample(self, procs: Procs) -> None:
        now = time.monotonic()
        for child in procs.children(self.worker_pid):
            rss = procs.rss(child.pid)
            if not rss:  # gone, or exited and not yet reaped
                continue
            self.peak[child.pid] = max(self.peak.get(child.pid, 0), rss)
            self.last_seen[child.pid] = now
            self.start.setdefault(child.pid, child.start)
            if self.keep_series:
                self.series.setdefault(child.pid, []).append((now, rss))
            for limit in self.thresholds:
                if rss > limit:
                    self.crossed.setdefault((child.pid, limit), now)
                elif (child.pid, limit) in self.crossed:
                    self.recovered.setdefault((child.pid, limit), now)

    @property
    def max_rss(self) -> int:
        return max(self.peak.values(), default=0)


class MemoryCgroup:
    """A cgroup v1 memory cgroup below this process's own, with a limit, for processes a test
    starts in it (``command`` wraps an argv so that it enters the cgroup before it execs).
    ``remove`` kills what the test left in it (those pids only) and removes it."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, name: str, limit: int) -> None:
        own = next((line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text()
                    .splitlines() if line.split(":")[1] == "memory"), None)
        if own is None or not self.ROOT.is_dir():
            raise OSError("no cgroup v1 memory controller on this machine")
        self.path = self.ROOT / own.strip().lstrip("/") / f"{name}-{os.getpid()}-{free_port()}"
        self.path.mkdir()
        try:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:
            self.path.rmdir()
            raise
        self.limit = limit

    def command(self, argv: list[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *argv]

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        raise AssertionError("this kernel's memory.oom_control has no oom_kill counter")

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.path.exists():
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def daemon_on_a_thread(cfg: Any, procs: Procs, **kw: Any) -> Iterator[Any]:
    """A daemon's real loop on a thread (its socket and HTTP port real, ``procs`` a fake or
    the real one); stopped, and its thread joined, whatever the test did."""
    import structlog  # noqa: PLC0415

    from celery_memguard.daemon.loop import Daemon  # noqa: PLC0415

    daemon = Daemon(cfg, procs=procs, log=structlog.get_logger(), **kw)
    up = threading.Event()
    thread = threading.Thread(target=daemon.run, args=(lambda _d: up.set(),), daemon=True)
    thread.start()
    try:
        assert up.wait(10), "the daemon did not start"
        yield daemon
    finally:
        daemon.stop()
        thread.join(10)
    assert not thread.is_alive()
