"""celery-memguard benchmarks: the built-in guards and celery-memguard side by side, and the
costs of sampling and of the agent. Prints figures and ratios; medians of interleaved runs.

    .venv/bin/python -m benchmarks.run            # everything, 3 runs each (several minutes)
    .venv/bin/python -m benchmarks.run --quick    # CI: checks that every part still runs
    .venv/bin/python -m benchmarks.run --only sampling,workload
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from celery import Celery

import celery_memguard
from celery_memguard.daemon import config as cfgmod
from celery_memguard.daemon.loop import Daemon
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.readings import FoundWorker
from celery_memguard.protocol import messages, rules
from tests.support import ROOT, PrivateRedis, RssSampler, Sampler, free_port, kill_group, redis_pings
from tests.support import Daemon as DaemonProc

MiB = 1024 * 1024
PARTS = ("sampling", "workload", "steady", "spikes", "runaway", "agent", "fleet", "forensics")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


# -- sampling ------------------------------------------------------------------------------

@contextlib.contextmanager
def sleepers(n: int) -> Iterator[list[int]]:
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def per_child(fn: Callable[[int], object], pids: list[int], rounds: int) -> float:
    """Median seconds per child of ``fn`` over ``rounds`` passes over all pids."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for pid in pids:
            fn(pid)
        times.append((time.perf_counter() - start) / len(pids))
    return median(times)


def bare_statm(pid: int) -> bytes:
    with open(f"/proc/{pid}/statm", "rb") as fh:
        return fh.read()


def bench_sampling(quick: bool) -> None:
    procs = Procs()
    n, rounds = (50, 5) if quick else (200, 30)
    with sleepers(n) as pids:
        objects = {pid: psutil.Process(pid) for pid in pids}
        rows = []
        bare = per_child(bare_statm, pids, rounds)
        ours = per_child(procs.rss, pids, rounds)
        ps = per_child(lambda pid: objects[pid].memory_info(), pids, rounds)
        smaps = per_child(procs.uss_pss, pids, rounds)
        stat = per_child(procs.stat, pids, rounds)
        for name, value in (("bare open+read of /proc/PID/statm", bare),
                            ("Procs.rss (what every tick reads)", ours),
                            ("psutil Process.memory_info()", ps),
                            ("Procs.stat (identity check before a signal)", stat),
                            ("Procs.uss_pss (smaps_rollup, near a limit only)", smaps)):
            rows.append([name, f"{value * 1e6:.2f}", f"{value / bare:.2f}x"])
    table(f"Sampling cost per child ({n} processes, median of {rounds} passes)",
          ["read", "µs per child", "vs bare statm"], rows)

    n_tick = 100 if quick else 1000
    with sleepers(n_tick) as pids:
        daemon = Daemon(cfgmod.parse({"sampling": {"scan_interval": "1h"}}, env={}),
                        log=_NullLog())
        me = procs.stat(os.getpid())
        assert me is not None
        kids = tuple(s for s in (procs.stat(pid) for pid in pids) if s is not None)
        daemon.supervisor.state.found(FoundWorker(stat=me, name="bench@host", children=kids))
        daemon.supervisor.tick(time.monotonic())  # includes the first full scan
        ticks = []
        for _ in range(5 if quick else 30):
            start = time.perf_counter()
            daemon.supervisor.tick(time.monotonic())
            ticks.append(time.perf_counter() - start)
        listed = len(psutil.pids())  # the sleepers included: what the scan went through
        start = time.perf_counter()
        procs.scan_workers()
        scan = time.perf_counter() - start
    table(f"One tick over {n_tick} children (median of {len(ticks)})",
          ["what", "ms"],
          [["tick: children, RSS, decide, publish", f"{median(ticks) * 1e3:.2f}"],
           [f"full process scan ({listed} processes; every scan_interval)",
            f"{scan * 1e3:.2f}"]])
    bench_daemon_cpu(quick)
    bench_messages(quick)


def bench_messages(quick: bool) -> None:
    """In-process cost of one agent report in the daemon (decode, credentials, state, decide)."""
    from celery_memguard.daemon.inbox import Datagram  # noqa: PLC0415

    procs = Procs()
    n = 2000 if quick else 50000
    with sleepers(2) as pids:
        daemon = Daemon(cfgmod.parse({}, env={}), log=_NullLog())
        me = procs.stat(os.getpid())
        assert me is not None
        kids = tuple(s for s in (procs.stat(pid) for pid in pids) if s is not None)
        daemon.supervisor.state.found(FoundWorker(stat=me, name="bench@host", children=kids))
        hello = messages.WorkerHello(pid=me.pid, node="bench@host", pool="prefork", concurrency=2,
                                 max_tasks=None, max_memory_kib=None, recycle_signal=38,
                                 kids=((pids[0], 0), (pids[1], 1)), agent="b")
        daemon.supervisor.receive(Datagram(messages.encode(hello), me.pid, 0, False), time.monotonic())
        grams = [Datagram(messages.encode(messages.TaskEnd(
            pid=pids[0], ppid=me.pid, index=0, task="app.task", id=f"{i:032x}", rss_before=1,
            rss=60 * MiB, tasks=i, ok=True)), pids[0], 0, False) for i in range(n)]
        start = time.perf_counter()
        for gram in grams:
            daemon.supervisor.receive(gram, 0.0)
        per = (time.perf_counter() - start) / n
        size = 32  # about what a child running 128 tasks a second sends every 0.25 s
        batches = [Datagram(messages.encode(messages.TaskBatch(
            pid=pids[1], ppid=me.pid, index=1, first=i * size + 1, names=("app.a", "app.b"),
            ends=tuple((j % 2, 60 * MiB, 60 * MiB + j, 1, 250 - j) for j in range(size)))),
            pids[1], 0, False) for i in range(n // size)]
        start = time.perf_counter()
        for gram in batches:
            daemon.supervisor.receive(gram, 1.0)
        per_batched = (time.perf_counter() - start) / (len(batches) * size)
    table("Daemon per reported task (in-process)", ["what", "figure"],
          [["µs per task, one TaskEnd message each", f"{per * 1e6:.1f}"],
           [f"µs per task, in TaskBatch messages of {size}", f"{per_batched * 1e6:.1f}"],
           ["tasks per second on one core, batched", f"{1 / per_batched:,.0f}"]])


class _NullLog:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


DAEMON_CHILD = """
import os, sys, time, subprocess, threading
from celery_memguard.daemon import config
from celery_memguard.daemon.loop import Daemon
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.readings import FoundWorker
n, sock, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
kids = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
procs = Procs()
cfg = config.parse({"agent": {"socket": sock}, "metrics": {"listen": f"127.0.0.1:{port}"},
                    "log": {"level": "warning"}}, env={})
from celery_memguard.cli import logs; logs.configure("json", "warning")
d = Daemon(cfg)
me = procs.stat(os.getpid())
d.supervisor.state.found(FoundWorker(stat=me, name="bench@host",
              children=tuple(procs.stat(k.pid) for k in kids)))
print("ready", flush=True)
try:
    d.run()
finally:
    for k in kids: k.kill()
"""


def bench_daemon_cpu(quick: bool) -> None:
    n, window = (20, 3.0) if quick else (200, 30.0)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", DAEMON_CHILD, str(n), f"{tmp}/s.sock",
                                 str(free_port())], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(2.0)
            p = psutil.Process(proc.pid)
            before = p.cpu_times()
            time.sleep(window)
            after = p.cpu_times()
            cpu = (after.user + after.system - before.user - before.system) / window
            rss = p.memory_info().rss
        finally:
            kill_group(proc, grace=5)
    table(f"Daemon at a 1 s tick with {n} children, over {window:.0f} s",
          ["what", "figure"],
          [["CPU, share of one core", f"{cpu * 100:.3f} %"], ["RSS", f"{rss / MiB:.1f} MiB"]])


# -- Celery workloads ----------------------------------------------------------------------

@dataclass
class TotalSampler(Sampler):
    """The worker's total memory as the container sees it, sampled every ``period``: the sum
    of PSS (shared pages divided among the processes sharing them) over the main process and
    its children. Peak and mean."""

    def __init__(self, worker_pid: int, period: float = 0.1) -> None:
        super().__init__(worker_pid, period)
        self.samples: list[int] = []

    def sample(self, procs: Procs) -> None:
        pids = [self.worker_pid, *(c.pid for c in procs.children(self.worker_pid))]
        self.samples.append(sum((procs.uss_pss(pid) or (0, 0))[1] for pid in pids))

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


@dataclass
class Run:
    guard: str
    peak_rss: int = 0
    recycles: int = 0
    tasks_per_second: float = 0.0
    longest_gap: float = 0.0
    lost: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Bench:
    """Starts workers (and a daemon) against one broker; everything stopped on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.peaks = tmp
        self.redis: PrivateRedis | None = None
        if redis_pings(6379):
            base = "redis://127.0.0.1:6379"
        else:
            self.redis = PrivateRedis(tmp)
            base = f"redis://127.0.0.1:{self.redis.port}"
        self.broker, self.backend = f"{base}/0", f"{base}/1"
        self.client = Celery("bench-client", broker=self.broker, backend=self.backend)

    def close(self) -> None:
        self.client.close()
        if self.redis is not None:
            self.redis.stop()

    @contextlib.contextmanager
    def worker(self, args: list[str], agent: bool, daemon_config: dict[str, Any] | None,
               extra_env: dict[str, str] | None = None,
               tree: Path = ROOT,
               ) -> Iterator[tuple[subprocess.Popen[bytes], str, DaemonProc | None]]:
        queue = f"bench{free_port()}"
        daemon = None
        env = dict(os.environ, BENCH_BROKER=self.broker, BENCH_BACKEND=self.backend,
                   BENCH_AGENT="1" if agent else "0", **(extra_env or {}))
        run_dir = Path(tempfile.mkdtemp(dir=self.tmp))
        # Never the default socket, which every daemon on a shared host may be listening on:
        # an agent without a daemon gets a path where nothing listens.
        env["CELERY_MEMGUARD_SOCKET"] = str(run_dir / "nobody" / "agent.sock")
        self.peaks = run_dir / "peaks"  # each child's exact peak RSS, written as it exits
        self.peaks.mkdir()
        env["BENCH_PEAKS"] = str(self.peaks)
        if daemon_config is not None:
            daemon = DaemonProc(run_dir, daemon_config)
            env["CELERY_MEMGUARD_SOCKET"] = str(daemon.socket_path)
        log = (run_dir / "worker.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker", "-c", str(POOL),
             "-Q", queue, "-n", f"{queue}@bench", "--loglevel", "warning", "--without-gossip",
             "--without-mingle", "--without-heartbeat", *args],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not self.client.control.ping(destination=[f"{queue}@bench"], timeout=0.5):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((run_dir / "worker.log").read_text()[-2000:])
            time.sleep(0.5)  # children up, hellos and published settings read
            yield proc, queue, daemon
        finally:
            kill_group(proc)
            log.close()
            if daemon is not None:
                daemon.stop()

    def run(self, guard: str, args: list[str], agent: bool, daemon_config: dict[str, Any] | None,
            kinds: list[str], thresholds: tuple[int, ...] = (), period: float = 0.05,
            extra_env: dict[str, str] | None = None, tree: Path = ROOT,
            before: Callable[[DaemonProc | None], None] | None = None,
            after: Callable[[DaemonProc | None], None] | None = None) -> Run:
        """One run; ``tree``: the checkout the worker's code comes from; ``before``: called
        once the worker is up, before the tasks are sent; ``after``: once they are done."""
        run = Run(guard)
        with self.worker(args, agent, daemon_config, extra_env, tree) as (proc, queue, daemon), \
                RssSampler(proc.pid, period, thresholds, series=True) as sampler, \
                TotalSampler(proc.pid) as total:
            if before is not None:
                before(daemon)
            cpu_before = cpu_split(proc.pid, daemon)
            start = time.time()
            results = [self.client.send_task("benchmarks.bench_app.work", args=(kind,), queue=queue)
                       for kind in kinds]
            finished: list[Any] = []  # one per task, in the order sent: (pid, time), or None
            states = []
            for result in results:
                try:
                    finished.append(result.get(timeout=120, propagate=False))
                    states.append(result.state)
                except Exception:  # noqa: BLE001 - a lost task is what we count here
                    finished.append(None)
                    run.lost += 1
            cpu_after = cpu_split(proc.pid, daemon)
            run.extra["cpu_us"] = tuple((b - a) / len(kinds) * 1e6
                                        for a, b in zip(cpu_before, cpu_after, strict=True))
            time.sleep(0.3)
            alive = {child.pid for child in Procs().children(proc.pid)}
            exact = {pid: hwm for pid in alive if (hwm := vm_hwm(pid))}  # those that stay
            ran: dict[int, int] = {}  # keep tasks per pid
            for kind, item in zip(kinds, finished, strict=True):
                if isinstance(item, list | tuple) and kind == "keep":
                    ran[item[0]] = ran.get(item[0], 0) + 1
            run.extra["left_keeps"] = [n for pid, n in ran.items() if pid not in alive]
            times = sorted(t for item in finished if isinstance(item, list | tuple)
                           for t in item[1:2])
            if times:
                run.tasks_per_second = len(times) / (times[-1] - start)
                edges = [start, *times]
                run.longest_gap = max(b - a for a, b in itertools.pairwise(edges))
            run.extra["failures"] = sum(1 for s in states if s != "SUCCESS")
            if after is not None:
                after(daemon)
            if daemon is not None:
                run.extra["events"] = daemon.events()
            run.recycles = max(0, len(sampler.peak) - 2)  # every guard counted alike: children seen
            run.peak_rss = max(sampler.peak.values(), default=0)
            for path in self.peaks.iterdir():  # those that left: their own figure at exit
                exact[int(path.name)] = max(exact.get(int(path.name), 0), int(path.read_text()))
            run.extra["exact_peaks"] = exact
            run.extra["sampler"] = sampler
            run.extra["total"] = (total.peak, total.mean)
        return run


def vm_hwm(pid: int) -> int:
    """A live process's peak RSS so far as the kernel keeps it (VmHWM), in bytes; 0: gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_split(worker_pid: int, daemon: DaemonProc | None) -> tuple[float, float, float]:
    """CPU seconds so far of the worker's main process, of its pool children (live ones, plus
    those it has reaped), and of the daemon."""
    main = psutil.Process(worker_pid)
    times = main.cpu_times()
    children = times.children_user + times.children_system
    for child in main.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            t = child.cpu_times()
            children += t.user + t.system
    daemon_cpu = 0.0
    if daemon is not None:
        d = psutil.Process(daemon.proc.pid).cpu_times()
        daemon_cpu = d.user + d.system
    return times.user + times.system, children, daemon_cpu


def workload_w(n: int = 600) -> list[str]:
    rng = random.Random(42)
    return rng.choices(["keep", "cache", "noop"], weights=[30, 10, 60], k=n)


MEMGUARD_W = {"limits": {"soft": "150MiB", "hard": "1GiB"}, "sampling": {"interval": "250ms"},
              "log": {"level": "info"}}
GUARDS: list[tuple[str, list[str], bool, dict[str, Any] | None, dict[str, str]]] = [
    ("none", [], False, None, {}),
    ("--max-tasks-per-child 80", ["--max-tasks-per-child", "80"], False, None, {}),
    ("--max-tasks-per-child 140", ["--max-tasks-per-child", "140"], False, None, {}),
    ("--max-memory-per-child 153600", ["--max-memory-per-child", "153600"], False, None, {}),
    ("celery-memguard soft 150MiB", [], True, MEMGUARD_W, {}),
    ("celery-memguard soft 150MiB, freeze", [], True, MEMGUARD_W, {"BENCH_FREEZE": "1"}),
]


# W ten times over leaks about 360 MiB/s per worker: a child reaches the limit every ~1.5 s,
# far past the default recycle.max_per_minute (6), which holds children until the hard limit.
MEMGUARD_FAST = {**MEMGUARD_W, "recycle": {"max_per_minute": 600}}
STEADY_GUARDS = [GUARDS[3],
                 ("celery-memguard soft 150MiB (default max_per_minute 6)", [], True, MEMGUARD_W,
                  {}),
                 ("celery-memguard soft 150MiB, max_per_minute 600", [], True, MEMGUARD_FAST, {}),
                 ("celery-memguard soft 150MiB, max_per_minute 600, freeze", [], True,
                  MEMGUARD_FAST, {"BENCH_FREEZE": "1"})]

BUILTIN = "--max-memory-per-child 153600"
POOL = 2  # prefork concurrency of every benchmark worker


def bench_workload(bench: Bench, runs: int, quick: bool, size: int = 600,
                   chosen: list[tuple[str, list[str], bool, dict[str, Any] | None,
                                      dict[str, str]]] | None = None,
                   label: str = "Workload W") -> None:
    kinds = workload_w(150 if quick else size)
    guards = chosen or (GUARDS[3:6] if quick else GUARDS)
    results: dict[str, list[Run]] = {g[0]: [] for g in guards}
    for _ in range(runs):  # interleaved: one run of every guard, then the next round
        for name, args, agent, daemon_config, env in guards:
            results[name].append(bench.run(name, args, agent, daemon_config, kinds,
                                           thresholds=(150 * MiB,), extra_env=env))
    rows, per_run = [], []
    base = median([r.tasks_per_second for r in results[guards[0][0]]])
    builtin = median([r.tasks_per_second for r in results[BUILTIN]])
    totals = []
    for name, _args, agent, daemon_config, _env in guards:
        runs_ = results[name]
        peaks_total = [r.extra["total"][0] / MiB for r in runs_]
        means_total = [r.extra["total"][1] / MiB for r in runs_]
        totals.append([name, f"{median(peaks_total):.1f} ({min(peaks_total):.1f}-{max(peaks_total):.1f})",
                       f"{median(means_total):.1f} ({min(means_total):.1f}-{max(means_total):.1f})",
                       f"{median([r.tasks_per_second for r in runs_]):.0f}"])
        jitter = pool_jitter(daemon_config) if agent else None
        spans = [span for r in runs_ for span in soft_to_exit(r, 150 * MiB, jitter)]
        peaks = [r.peak_rss / MiB for r in runs_]
        exact = [max(r.extra["exact_peaks"].values(), default=0) / MiB for r in runs_]
        over = sum(1 for r in runs_ for peak in r.extra["exact_peaks"].values()
                   if peak > 150 * MiB)
        rate = median([r.tasks_per_second for r in runs_])
        recycles = [r.recycles for r in runs_]
        keeps = [n for r in runs_ for n in r.extra["left_keeps"]]
        rows.append([name, f"{min(peaks):.1f}-{max(peaks):.1f}",
                     f"{min(exact):.1f}-{max(exact):.1f} ({over})",
                     f"{median(recycles):.0f} ({min(recycles)}-{max(recycles)})",
                     f"{rate:.0f}", f"{rate / base:.2f}", f"{rate / builtin:.2f}",
                     f"{max(r.longest_gap for r in runs_):.2f}",
                     str(sum(r.lost for r in runs_)), spread(spans),
                     f"{min(keeps)}-{max(keeps)} ({len(keeps)})" if keeps else "-"])
        per_run.append([name, " ".join(f"{r.tasks_per_second:.0f}" for r in runs_),
                        " ".join(str(r.recycles) for r in runs_),
                        " ".join(f"{r.longest_gap:.2f}" for r in runs_)])
    title = (f"{label}: {len(kinds)} tasks (seed 42: 30 % keep 2 MiB, 10 % 4 MiB cache once, "
             f"60 % no-op), prefork -c 2, prefetch 1, Redis; {runs} interleaved runs")
    table(title, ["guard", "peak child RSS (MiB), sampled every 50 ms",
                  "exact peak child RSS (MiB, VmHWM) (children over 150 MiB)",
                  "recycles, median (range)",
                  "tasks/s (median)", f"vs {guards[0][0]}", f"vs {BUILTIN}", "longest gap (s)",
                  "lost", "soft crossing → exit (s): min / median / max",
                  "keep tasks a child that left had run (children)"], rows)
    table(f"{label}, run by run (in the order they ran)",
          ["guard", "tasks/s", "recycles", "longest gap (s)"], per_run)
    table(f"{label}: the worker's total memory (PSS of the main process and its children, "
          "summed, every 100 ms), median (range)",
          ["guard", "peak total (MiB)", "mean total (MiB)", "tasks/s (median)"], totals)


def pool_jitter(daemon_config: dict[str, Any] | None) -> float:
    """The jitter celery-memguard applies to the children of the benchmark's pool of 2."""
    recycle = cfgmod.RecycleConfig.model_validate((daemon_config or {}).get("recycle", {}))
    return rules.pool_jitter(recycle.jitter, recycle.max_share, POOL)


def spread(values: list[float]) -> str:
    """min / median / max, or a dash when there is nothing to spread."""
    if not values:
        return "-"
    return f"{min(values):.3f} / {median(values):.3f} / {max(values):.3f}"


def soft_to_exit(run: Run, soft: int, jitter: float | None) -> list[float]:
    """Seconds from a child's first sample at or over the soft limit to its last sample alive,
    for each child that crossed it and left before the end. ``jitter``: celery-memguard's own
    threshold per child (the limit lowered by its share of the jitter), else the limit."""
    sampler: RssSampler = run.extra["sampler"]
    end = max(sampler.last_seen.values(), default=0.0)
    spans = []
    for pid, readings in sampler.series.items():
        if sampler.last_seen[pid] >= end - 2 * sampler.period:
            continue  # still there when the run ended
        limit = (soft if jitter is None
                 else rules.jittered(soft, jitter, pid, sampler.start[pid]))
        crossed = next((at for at, rss in readings if rss >= limit), None)
        if crossed is not None:
            spans.append(sampler.last_seen[pid] - crossed)
    return spans


def bench_spikes(bench: Bench, quick: bool) -> None:
    kinds = ["spike" if i % 20 == 10 else "noop" for i in range(60 if quick else 200)]
    rows = []
    for name, args, agent, daemon_config, _env in (GUARDS[3], GUARDS[4]):
        run = bench.run(name, args, agent, daemon_config, kinds)
        rows.append([name, str(kinds.count("spike")), str(run.recycles),
                     f"{run.peak_rss / MiB:.0f}", str(run.lost)])
    table("Spikes: a task now and then allocates 300 MiB and frees it before it returns",
          ["guard", "spiky tasks", "recycles", "peak child RSS (MiB)", "lost"], rows)


def bench_runaway(bench: Bench, quick: bool) -> None:
    hard = 300 * MiB
    n = 2 if quick else 8
    kinds = ["runaway" if i % 5 == 2 else "noop" for i in range(n * 5)]
    config = {"limits": {"soft": "150MiB", "hard": "300MiB"}, "sampling": {"interval": "1s"},
              "log": {"level": "info"}}
    run = bench.run("celery-memguard", [], True, config, kinds, thresholds=(hard,), period=0.005)
    sampler: RssSampler = run.extra["sampler"]
    interrupts = [e for e in run.extra["events"] if e.get("event") == "task_interrupted"]
    # crossing (5 ms sampler) to the last sample of that child: interrupted, left, replaced
    delays = sorted(sampler.last_seen[pid] - at for (pid, _), at in sampler.crossed.items()
                    if pid in sampler.last_seen)
    # crossing to the child's peak: its memory stopped growing, the task was interrupted
    stopped = [max(sampler.series[pid], key=lambda reading: reading[1])[0] - at
               for (pid, _), at in sampler.crossed.items() if pid in sampler.series]
    table(f"Runaway: 16 MiB every 20 ms, hard 300 MiB, tick 1 s ({kinds.count('runaway')} runs)",
          ["what", "figure"],
          [["interrupted (MemoryLimitExceeded in the backend)",
            f"{run.extra['failures']} of {kinds.count('runaway')}"],
           ["task_interrupted events", str(len(interrupts))],
           ["peak child RSS", f"{run.peak_rss / MiB:.1f} MiB (hard + {(run.peak_rss - hard) / MiB:.1f})"],
           ["measured RSS at interruption (agent), median",
            f"{median([e['rss_bytes'] / MiB for e in interrupts]):.1f} MiB"],
           ["crossing hard → memory stops growing (5 ms sampler): min / median / max",
            spread(stopped) + " s"],
           ["crossing hard → child gone (5 ms sampler): min / median / max",
            spread(delays) + " s"],
           ["lost", str(run.lost)]])


def bench_agent(bench: Bench, rounds: int, quick: bool) -> None:
    """Throughput with and without the agent (with its daemon, and with no daemon at all),
    and where the CPU goes.

    Each round starts four fresh workers in turn: without the agent, with it and its daemon,
    with it and no daemon (its socket path has no listener), and without it again. Each
    agent run is compared with the mean of the two that bracket the round, which cancels a
    host that speeds up or slows down through it, and the two runs without it are compared
    with each other, which shows how far two identical workers differ here (the resolution
    of the other ratios). Ratios are medians over the rounds, with a bootstrap 95 % interval.
    """
    kinds = ["noop"] * (300 if quick else 2000)
    config = {"limits": {"soft": "1GiB", "hard": "2GiB"}, "log": {"level": "warning"}}
    without: list[Run] = []
    with_daemon: list[Run] = []
    no_daemon: list[Run] = []
    ratio: list[float] = []
    ratio_alone: list[float] = []
    control: list[float] = []
    for _ in range(rounds):
        first = bench.run("no agent", [], False, None, kinds)
        middle = bench.run("agent", [], True, config, kinds)
        alone = bench.run("agent, no daemon", [], True, None, kinds)
        last = bench.run("no agent", [], False, None, kinds)
        without += [first, last]
        with_daemon.append(middle)
        no_daemon.append(alone)
        bracket = (first.tasks_per_second + last.tasks_per_second) / 2
        ratio.append(middle.tasks_per_second / bracket)
        ratio_alone.append(alone.tasks_per_second / bracket)
        control.append(last.tasks_per_second / first.tasks_per_second)
    base, added = agent_task_cost(500, 10 if quick else 60)
    groups = (without, with_daemon, no_daemon)
    rate = [median([r.tasks_per_second for r in runs_]) for runs_ in groups]
    cpu = [[median([r.extra["cpu_us"][part] for r in runs_]) for part in range(3)]
           for runs_ in groups]
    total = [sum(parts) for parts in cpu]
    table(f"Agent overhead: {len(kinds)} no-op tasks, prefork -c 2, {rounds} rounds of four "
          "fresh workers (without, with the daemon, with no daemon, without)",
          ["what", "without the agent", "agent and daemon", "agent, no daemon", "ratios"],
          [["tasks/s (median)", f"{rate[0]:.0f}", f"{rate[1]:.0f}", f"{rate[2]:.0f}", ""],
           ["agent and daemon / mean of the two bracketing runs without (median, 95 %)",
            "", "", "", f"{median(ratio):.3f} ({interval(ratio)})"],
           ["agent, no daemon / the same bracket (median, 95 %)", "", "", "",
            f"{median(ratio_alone):.3f} ({interval(ratio_alone)})"],
           ["control: second run without / first (median, 95 %)", "", "", "",
            f"{median(control):.3f} ({interval(control)})"],
           ["CPU per task, worker main process (µs, median)", f"{cpu[0][0]:.0f}",
            f"{cpu[1][0]:.0f}", f"{cpu[2][0]:.0f}", ""],
           ["CPU per task, pool children (µs, median)", f"{cpu[0][1]:.0f}", f"{cpu[1][1]:.0f}",
            f"{cpu[2][1]:.0f}", ""],
           ["CPU per task, daemon (µs, median)", "-", f"{cpu[1][2]:.0f}", "-", ""],
           ["CPU per task, all (µs)", f"{total[0]:.0f}", f"{total[1]:.0f}", f"{total[2]:.0f}",
            f"{total[1] / total[0]:.3f} / {total[2] / total[0]:.3f}"],
           ["a child's own work per no-op task, in-process (µs, median)", f"{base * 1e6:.1f}",
            f"{(base + added) * 1e6:.1f}", "", f"{added * 1e6:+.1f}"]])
    print("\nper round, with daemon / bracket: " + " ".join(f"{r:.3f}" for r in ratio)
          + "\nper round, no daemon / bracket:   " + " ".join(f"{r:.3f}" for r in ratio_alone)
          + "\nper round, control:               " + " ".join(f"{r:.3f}" for r in control))


def interval(values: list[float], draws: int = 2000) -> str:
    """A bootstrap 95 % interval of the median (fixed seed: the same figures print the same)."""
    if len(values) < 2:
        return "-"
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return f"{medians[int(0.025 * draws)]:.3f}-{medians[int(0.975 * draws) - 1]:.3f}"


def agent_task_cost(n: int, rounds: int) -> tuple[float, float]:
    """Seconds per no-op task of a pool child's own work, measured in this process: Celery's
    trace function run as billiard's loop runs it, without the agent and with its two
    wrappers (``wait_for_job``, ``prepare_result``), alternately; returns the median time
    without and the median of the paired differences."""
    from celery.app import trace  # noqa: PLC0415

    from celery_memguard.agent import job_loop, pool_child  # noqa: PLC0415
    from celery_memguard.agent.child_agent import ChildAgent  # noqa: PLC0415

    app = Celery("bench-trace", broker="memory://")
    app.conf.task_ignore_result = True

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        return None

    app.finalize()
    celery_memguard.install(app, socket="/nonexistent/agent.sock")
    trace.setup_worker_optimizations(app, "bench")
    noop.__trace__ = trace.build_tracer(noop.name, noop, app.loader, "bench", app=app)
    jobs: list[Any] = [(2, (i, 0, trace.fast_trace_task,
                 (noop.name, f"id-{i}", {"id": f"id-{i}", "task": noop.name, "delivery_info": {}},
                  ((), {}, None), None, None), {})) for i in range(n)]
    pending: Iterator[Any] = iter(())

    def read() -> Any:
        return next(pending)

    def prepare(result: Any) -> Any:
        return result

    child = ChildAgent(0, "/nonexistent/agent.sock")
    wrapped = (job_loop.wrap_wait_for_job(child, read, pool_child.describe),
               job_loop.wrap_prepare_result(child, prepare))

    def loop(wait: Callable[[], Any], prepare_result: Callable[[Any], Any]) -> float:
        nonlocal pending
        pending = iter(jobs)
        start = time.perf_counter()
        for _ in range(n):
            _kind, (_job, _i, fun, args, kwargs) = wait()
            prepare_result(fun(*args, **kwargs))
        return (time.perf_counter() - start) / n

    base, added = [], []
    try:
        for _ in range(rounds):
            without = loop(read, prepare)
            base.append(without)
            added.append(loop(*wrapped) - without)
    finally:
        child.watch.task_ended()
    return median(base), median(added)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: CI checks it runs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--agent-rounds", type=int, default=0,
                        help="rounds of the agent comparison (default: --runs)")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of the code before leak forensics (git archive): "
                             "the forensics part then compares the idle agent with it")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    runs = 1 if args.quick else args.runs
    import billiard  # noqa: PLC0415
    import celery  # noqa: PLC0415

    print(f"# celery-memguard benchmarks\n\n{platform.platform()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, celery {celery.__version__}, "
          f"billiard {billiard.__version__}; command: python -m benchmarks.run "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    if "sampling" in parts:
        bench_sampling(args.quick)
    if parts & {"workload", "steady", "spikes", "runaway", "agent", "fleet", "forensics"}:
        with tempfile.TemporaryDirectory() as tmp:
            bench = Bench(Path(tmp))
            try:
                if "workload" in parts:
                    bench_workload(bench, runs, args.quick)
                if "steady" in parts:  # W ten times over: recycles away from its two ends
                    bench_workload(bench, runs, args.quick, size=6000, chosen=STEADY_GUARDS,
                                   label="Workload W ten times over")
                if "spikes" in parts:
                    bench_spikes(bench, args.quick)
                if "runaway" in parts:
                    bench_runaway(bench, args.quick)
                if "agent" in parts:
                    bench_agent(bench, args.agent_rounds or runs, args.quick)
                if "fleet" in parts:
                    from benchmarks.fleet import bench_fleet  # noqa: PLC0415 - it imports this module

                    bench_fleet(bench, args.quick)
                if "forensics" in parts:
                    from benchmarks.forensics import bench_forensics  # noqa: PLC0415

                    bench_forensics(bench, args.agent_rounds or runs, args.quick, args.baseline)
            finally:
                bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
