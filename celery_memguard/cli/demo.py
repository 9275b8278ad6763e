"""``celery-memguard demo``: a real prefork worker leaking under supervision, no broker needed.

Starts the daemon and a worker of celery_memguard.cli.demo_app (filesystem transport) in a
temporary directory, drives a mixed workload, shows the pool live, prints a summary, and
removes every process and file it made, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from celery_memguard.daemon.units import format_bytes

SOFT = "100MiB"
HARD = "250MiB"
RUNAWAYS_AT = (0.35, 0.7)  # shares of the duration at which a runaway task is sent
RATE = 25.0  # tasks sent per second
MIX = (("leaky_report", 0.45), ("warm_cache", 0.15), ("quick", 0.40))


@dataclass
class Tally:
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    stopped: int = 0  # failed with MemoryLimitExceeded: runaways the hard limit stopped
    peak_rss: int = 0
    recycles: dict[str, float] = field(default_factory=dict)
    by_task: dict[str, int] = field(default_factory=dict)


def run_demo(duration: float = 25.0, live: bool = True) -> int:
    console = Console(soft_wrap=True)
    workdir = Path(tempfile.mkdtemp(prefix="celery-memguard-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _demo(console, workdir, procs, duration, live)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cleaning up[/yellow]")
        return 130
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _demo(console: Console, workdir: Path, procs: list[subprocess.Popen[bytes]],
          duration: float, live: bool) -> int:
    for sub in ("queue", "results", "staging"):
        (workdir / sub).mkdir()
    port = _free_port()
    sock = workdir / "agent.sock"
    config = workdir / "memguard.yaml"
    config.write_text(
        f"agent: {{socket: {sock}}}\n"
        f"sampling: {{interval: 250ms, scan_interval: 2s}}\n"
        f"metrics: {{listen: '127.0.0.1:{port}'}}\n"
        f"limits: {{soft: {SOFT}, hard: {HARD}}}\n"
        f"recycle: {{max_per_minute: 30}}\n"
        f"log: {{format: json}}\n")
    env = dict(os.environ, MEMGUARD_DEMO_DIR=str(workdir), CELERY_MEMGUARD_SOCKET=str(sock))
    url = f"http://127.0.0.1:{port}"
    console.print(f"[bold]celery-memguard demo[/bold]: soft limit {SOFT}, hard {HARD}, "
                  f"metrics on {url}/metrics, working in {workdir}")
    procs.append(_spawn([sys.executable, "-m", "celery_memguard", "run", "--config", str(config)],
                        env, workdir / "daemon.log"))
    _wait(lambda: _get(url + "/healthz") is not None, 15, "the daemon did not start", workdir)
    procs.append(_spawn([sys.executable, "-m", "celery", "-A", "celery_memguard.cli.demo_app",
                         "worker", "-c", "2", "--loglevel", "warning", "-n", "demo@%h",
                         "--without-gossip", "--without-mingle", "--without-heartbeat"],
                        env, workdir / "worker.log"))
    worker_pid = procs[-1].pid  # the demo's own worker: the daemon also sees any other on the host
    _wait(lambda: any(w["agent"] and len(w["children"]) == 2 for w in _status(url, worker_pid)), 30,
          "the worker did not start", workdir)

    os.environ["MEMGUARD_DEMO_DIR"] = str(workdir)
    from celery_memguard.cli import demo_app  # noqa: PLC0415 - reads MEMGUARD_DEMO_DIR at import

    # kombu's filesystem transport creates a message file before it writes it, and a worker
    # that picks up the empty file crashes on it; so the demo writes its messages to a staging
    # folder and renames each complete file into the queue (a rename is atomic).
    options = dict(demo_app.app.conf.broker_transport_options)
    options["data_folder_out"] = str(workdir / "staging")
    demo_app.app.conf.broker_transport_options = options

    tally = Tally()
    pending: list[Any] = []
    rng = random.Random(42)  # noqa: S311 - a reproducible workload, not cryptography
    names = [name for name, _ in MIX]
    weights = [weight for _, weight in MIX]
    start = time.monotonic()
    view = _Live(console, live)
    runaways = list(RUNAWAYS_AT)
    with view:
        while time.monotonic() - start < duration:
            if runaways and time.monotonic() - start >= runaways[0] * duration:
                runaways.pop(0)
                pending.append(demo_app.runaway.delay())
                _publish_staged(workdir)
                tally.sent += 1
                tally.by_task["runaway"] = tally.by_task.get("runaway", 0) + 1
            due = int((time.monotonic() - start) * RATE) - tally.sent + tally.by_task.get("runaway", 0)
            for _ in range(max(0, due)):
                name = rng.choices(names, weights)[0]
                pending.append(getattr(demo_app, name).delay())
                _publish_staged(workdir)
                tally.sent += 1
                tally.by_task[name] = tally.by_task.get(name, 0) + 1
            pending = _collect(pending, tally)
            view.update(_status(url, worker_pid), tally, time.monotonic() - start, duration, url)
            time.sleep(0.25)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            pending = _collect(pending, tally)
            view.update(_status(url, worker_pid), tally, time.monotonic() - start, duration, url)
            time.sleep(0.25)
    tally.recycles = _recycles(url)
    _summary(console, tally, lost=len(pending), leaking=_leaking(url))
    return 0 if not pending else 1


class _Live:
    """A rich Live table, or a line per second with --no-live."""

    def __init__(self, console: Console, live: bool) -> None:
        self.console = console
        self.live = Live(console=console, refresh_per_second=4) if live else None
        self._last_line = 0.0

    def __enter__(self) -> _Live:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, workers: list[dict[str, Any]], tally: Tally, elapsed: float,
               duration: float, url: str) -> None:
        for worker in workers:
            for child in worker["children"]:
                tally.peak_rss = max(tally.peak_rss, child["rss_bytes"])
        if self.live is not None:
            self.live.update(_table(workers, tally, elapsed, duration))
            return
        if time.monotonic() - self._last_line >= 1.0:
            self._last_line = time.monotonic()
            kids = "  ".join(f"#{c['index']} {format_bytes(c['rss_bytes'])} ({c['tasks']} tasks)"
                             for w in workers for c in w["children"])
            recycles = sum(_recycles(url).values())
            self.console.print(f"{elapsed:5.1f}s  sent {tally.sent}  done "
                               f"{tally.succeeded + tally.failed}  recycles {recycles:.0f}  {kids}")


def _table(workers: list[dict[str, Any]], tally: Tally, elapsed: float, duration: float) -> Table:
    table = Table(title=f"{elapsed:4.1f}/{duration:.0f}s  sent {tally.sent}  "
                        f"done {tally.succeeded + tally.failed}", title_justify="left")
    for column in ("worker", "index", "pid", "RSS", "of soft limit", "tasks", "state"):
        table.add_column(column)
    soft = 100 * 1024 * 1024
    for worker in workers:
        for child in worker["children"]:
            share = child["rss_bytes"] / soft
            bar = "#" * min(20, int(20 * share)) + "." * max(0, 20 - int(20 * share))
            table.add_row(worker["name"], str(child["index"]), str(child["pid"]),
                          format_bytes(child["rss_bytes"]), f"{bar} {100 * share:3.0f}%",
                          str(child["tasks"]), child["state"])
    return table


def _summary(console: Console, tally: Tally, lost: int, leaking: dict[str, Any] | None) -> None:
    console.print("\n[bold]summary[/bold]")
    console.print(f"  tasks sent {tally.sent}, succeeded {tally.succeeded}, failed "
                  f"{tally.failed} ({tally.stopped} runaways stopped by the hard limit), "
                  f"lost {lost}")
    console.print("  sent by name: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.by_task.items())))
    recycles = ", ".join(f"{reason} {n:.0f}" for reason, n in sorted(tally.recycles.items()))
    console.print(f"  recycles by level: {recycles or 'none'}")
    console.print(f"  highest child RSS seen by the daemon: {format_bytes(tally.peak_rss)} "
                  f"(soft limit {SOFT}, hard limit {HARD})")
    if leaking is not None:
        console.print(f"  leaking task: {leaking['task']}, leaves "
                      f"{format_bytes(leaking['median_growth_bytes'])} per call "
                      f"(median of {leaking['calls']} calls)")
    else:
        console.print("  leaking task: none identified")


def _publish_staged(workdir: Path) -> None:
    for name in sorted(os.listdir(workdir / "staging")):
        os.rename(workdir / "staging" / name, workdir / "queue" / name)


def _collect(pending: list[Any], tally: Tally) -> list[Any]:
    from celery_memguard.errors import MemoryLimitExceeded  # noqa: PLC0415

    left = []
    for result in pending:
        if result.ready():
            if result.successful():
                tally.succeeded += 1
            else:
                tally.failed += 1
                tally.stopped += isinstance(result.result, MemoryLimitExceeded)
        else:
            left.append(result)
    return left


def _recycles(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    text = _get(url + "/metrics")
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text or ""):
        for sample in family.samples:
            if sample.name == "celery_memguard_recycles_total":
                reason = sample.labels["reason"]
                out[reason] = out.get(reason, 0.0) + sample.value
    return out


def _leaking(url: str) -> dict[str, Any] | None:
    text = _get(url + "/status")
    tasks = json.loads(text)["tasks"] if text else []
    return next((t for t in tasks if t["leaky"]), None)


def _status(url: str, pid: int) -> list[dict[str, Any]]:
    """The demo worker as /status shows it (the scan also finds other workers on this host)."""
    text = _get(url + "/status")
    return [w for w in json.loads(text)["workers"] if w["pid"] == pid] if text else []


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback daemon
            return str(response.read().decode())
    except OSError:
        return None


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session we started, children included
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _wait(check: Any, timeout: float, what: str, workdir: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(p.read_text(errors="replace")[-1500:]
                             for p in sorted(workdir.glob("*.log")))
            raise RuntimeError(f"{what} within {timeout:.0f}s:\n{logs}")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
