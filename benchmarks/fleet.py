"""Many workers on one host under one daemon: its cost, its tick, and a recycle storm.

Eight workers of eight children (quick: two of two), tasks that mostly sleep so that two
cores suffice. First a steady phase: the daemon's CPU per second and per task, its tick.
Then a storm: every task keeps 2 MiB, so all 64 children climb to their soft limit at once;
for each recycle, the time from the child's crossing (sampled every 50 ms) to the request
(the daemon's event, or the child's own exit under its grant), and how recycles of
different workers spread in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.run import Bench, MiB, median, table
from tests.support import ROOT, RssSampler, free_port, kill_group
from tests.support import Daemon as DaemonProc

SOFT = 120 * MiB
TICK = 1.0


@contextlib.contextmanager
def fleet(bench: Bench, workers: int, children: int, config: dict[str, Any],
          ) -> Iterator[tuple[DaemonProc, list[tuple[subprocess.Popen[bytes], str]]]]:
    run_dir = Path(tempfile.mkdtemp(dir=bench.tmp))
    daemon = DaemonProc(run_dir, config)
    started: list[tuple[subprocess.Popen[bytes], str]] = []
    logs = []
    try:
        env = dict(os.environ, BENCH_BROKER=bench.broker, BENCH_BACKEND=bench.backend,
                   BENCH_AGENT="1", CELERY_MEMGUARD_SOCKET=str(daemon.socket_path))
        for n in range(workers):
            queue = f"fleet{free_port()}x{n}"
            log = (run_dir / f"{queue}.log").open("wb")
            logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker",
                 "-c", str(children), "-Q", queue, "-n", f"{queue}@bench", "--loglevel",
                 "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started.append((proc, queue))
        deadline = time.monotonic() + 120
        names = [f"{queue}@bench" for _, queue in started]
        while len(bench.client.control.ping(destination=names, timeout=1.0)) < len(names):
            if time.monotonic() > deadline:
                raise RuntimeError("the fleet's workers did not all start")
        while True:  # every child known to the daemon, with its hello
            status = json.loads(daemon.get("/status"))
            mine = [w for w in status["workers"] if w["name"] in names]
            if len(mine) == workers and all(len(w["children"]) == children for w in mine):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon does not see the whole fleet")
            time.sleep(0.5)
        yield daemon, started
    finally:
        for proc, _ in started:
            kill_group(proc)
        for log in logs:
            log.close()
        daemon.stop()


def _tick_seconds(daemon: DaemonProc) -> tuple[float, float, dict[float, float]]:
    """(sum, count, cumulative count per bucket bound) of the tick histogram."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    buckets: dict[float, float] = {}
    total = count = 0.0
    for family in text_string_to_metric_families(daemon.get("/metrics")):
        if family.name != "celery_memguard_tick_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    return total, count, buckets


def _p99_between(before: dict[float, float], after: dict[float, float]) -> float:
    """The bucket bound under which 99 % of the ticks between two readings fell."""
    counts = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    total = counts[-1][1] if counts else 0.0
    return next((le for le, n in counts if total and n >= 0.99 * total), float("nan"))


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _send(bench: Bench, queues: list[str], kind: str, per_queue: int) -> list[Any]:
    return [bench.client.send_task("benchmarks.bench_app.work", args=(kind,), queue=queue)
            for _ in range(per_queue) for queue in queues]


def bench_fleet(bench: Bench, quick: bool) -> None:
    workers, children = (2, 2) if quick else (8, 8)
    seconds = 5.0 if quick else 30.0
    # The rate limit is raised so that a storm of all 64 children is not capped by it (the
    # default, 6 a minute per worker, would hold 2 of each pool's 8 past their soft limit).
    config = {"limits": {"soft": f"{SOFT // MiB}MiB", "hard": "1GiB"},
              "recycle": {"max_per_minute": 60},
              "sampling": {"interval": f"{TICK}s"}, "log": {"level": "info"}}
    with fleet(bench, workers, children, config) as (daemon, started):
        queues = [queue for _, queue in started]
        # -- steady: sleeping tasks, a few per child and second --------------------------------
        rate = workers * children * 5  # tasks a second: each child busy half of its time
        cpu0, tick0, wall0 = _cpu(daemon.proc.pid), _tick_seconds(daemon), time.monotonic()
        pending: list[Any] = []
        while time.monotonic() - wall0 < seconds:
            pending += _send(bench, queues, "sleep", max(1, rate // (10 * workers)))
            time.sleep(0.1)
        for result in pending:
            result.get(timeout=120)
        wall = time.monotonic() - wall0
        cpu = _cpu(daemon.proc.pid) - cpu0
        tick1 = _tick_seconds(daemon)
        ticks = tick1[1] - tick0[1]
        tick_mean = (tick1[0] - tick0[0]) / ticks if ticks else float("nan")
        # -- storm: every child climbs to its soft limit at the same pace ------------------------
        offset = time.time() - time.monotonic()
        samplers = [RssSampler(proc.pid, 0.05, (SOFT,), series=True) for proc, _ in started]
        storm_started = time.time()
        with contextlib.ExitStack() as stack:
            for sampler in samplers:
                stack.enter_context(sampler)
            climb = _send(bench, queues, "sleepkeep", children * 50)
            for result in climb:
                result.get(timeout=300)
            time.sleep(2 * TICK)
        events = daemon.events()
    names = {f"{queue}@bench" for queue in queues}
    requests = [e for e in events if e.get("event") == "recycle_requested"
                and e.get("worker") in names]
    for e in requests:  # wall-clock seconds, read once
        e["at"] = datetime.fromisoformat(e["timestamp"]).timestamp()
    requests = [e for e in requests if e["at"] >= storm_started]
    at = {e["pid"]: e["at"] for e in requests}
    latencies, crossed = [], 0
    for sampler in samplers:
        for (pid, limit), first in sampler.crossed.items():
            if limit == SOFT and pid in at:
                crossed += 1
                latencies.append(at[pid] - (first + offset))
    peaks = [max(s.peak.values(), default=0) for s in samplers]
    over_unrecycled = sum(1 for s in samplers for pid, peak in s.peak.items()
                          if peak >= SOFT and pid not in at)
    times = sorted(at.values())
    window = max((sum(1 for u in times if t <= u < t + 0.1) for t in times), default=0)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    even = len(times) * 0.1 / span if span else float("nan")  # the same requests spread evenly
    per_worker: dict[str, list[float]] = {}
    for e in requests:
        per_worker.setdefault(e["worker"], []).append(e["at"])
    firsts = sorted(min(v) for v in per_worker.values())
    first_spread = firsts[-1] - firsts[0] if len(firsts) > 1 else 0.0
    by_agent = sum(1 for e in requests if e.get("by") == "agent")
    table(f"Many workers: {workers} workers of {children} children, one daemon, tick {TICK:g} s",
          ["what", "figure"],
          [["steady phase", f"{wall:.0f} s, {len(pending)} sleeping tasks"],
           ["daemon CPU, share of one core", f"{100 * cpu / wall:.2f} %"],
           ["daemon CPU per task (µs)", f"{cpu / len(pending) * 1e6:.0f}"],
           ["tick, mean (ms)", f"{tick_mean * 1e3:.2f}"],
           ["tick, 99 % under (ms, histogram bucket)",
            f"{_p99_between(tick0[2], tick1[2]) * 1e3:g} ({ticks:.0f} ticks)"],
           ["storm: recycles requested", f"{len(requests)} ({by_agent} by a child under its "
                                         "grant, before or right after its task)"],
           ["storm: children sampled past the soft limit before their recycle",
            f"{crossed} of {len(at)}"],
           ["storm: crossing → request (s), median / max",
            f"{median(latencies):.3f} / {max(latencies, default=float('nan')):.3f}"
            if latencies else "- (none crossed: all left before)"],
           ["storm: highest child peak (MiB)", f"{max(peaks) / MiB:.1f} (soft {SOFT / MiB:.0f})"],
           ["storm: children past the soft limit and never recycled", str(over_unrecycled)],
           ["storm: first to last request (s)", f"{span:.2f}"],
           ["storm: most recycles requested within any 100 ms, all workers",
            f"{window} (spread evenly over the storm: {even:.1f})"],
           ["storm: each worker's first recycle, earliest to latest worker (s)",
            f"{first_spread:.2f}"],
           ["storm: workers", str(len(per_worker))]])


def main() -> int:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        try:
            bench_fleet(bench, quick)
        finally:
            bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

