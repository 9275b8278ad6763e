"""What leak forensics costs: a traced call against an untraced one, the tracing child's extra
memory, a worker's throughput while one child traces, and nothing where nothing traces.

    .venv/bin/python -m benchmarks.run --only forensics --runs 8 [--baseline DIR]

``--baseline DIR``: a checkout of the code before leak forensics (``git archive``), whose
agent the idle comparison runs against, by the agent-overhead method: rounds of three fresh
workers (baseline, this code, baseline) and the in-process cost of a child's own work per
no-op task, in alternating processes.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.run import Bench, Run, interval, median, table
from celery_memguard.agent.forensics import Tracer, make_tool
from celery_memguard.protocol import messages
from celery_memguard.protocol.forensics import Request
from tests.support import ROOT, wait_for
from tests.support import Daemon as DaemonProc

KiB, MiB = 1024, 1024 * 1024
TASK = "benchmarks.bench_app.work"
_kept: list[object] = []
_DOC = {"items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"], "price": i * 1.5}
                  for i in range(200)]}


def _keep_bytes() -> None:
    _kept.append(b"\x01" * (512 * KiB))


def _round_trip() -> None:
    json.loads(json.dumps(_DOC))


def _keep_dicts() -> None:
    _kept.extend({"i": i} for i in range(1000))


WORKLOADS: list[tuple[str, Callable[[], None]]] = [
    ("keep 512 KiB (one block)", _keep_bytes),
    ("JSON round trip of 16 KB, all freed", _round_trip),
    ("keep 1,000 small dicts", _keep_dicts),
]


def _per_call(work: Callable[[], None], n: int, tool: str | None,
              frames: int = 10) -> tuple[float, int]:
    """Median seconds per call of ``work`` (with ``tool``: traced as a child traces a task's
    body: the tracer's begin and open, the call, its close, its memory read, its end and its
    report), and the tool's most memory at the end of a call."""
    request = Request(id="b", task="t", child=(1, 1), calls=n, frames=frames,
                      tool=tool or "tracemalloc", until=time.time() + 3600)
    tracer = Tracer(request, make_tool(request)) if tool else None
    times = []
    for _ in range(n):
        start = time.perf_counter()
        if tracer is not None:
            tracer.begin("t")
            tracer.open()
        work()
        if tracer is not None:
            tracer.close()
            tracer.overhead()
            tracer.end(0)
            tracer.report(1, 1, 0)
        times.append(time.perf_counter() - start)
    _kept.clear()
    return statistics.median(times), tracer.peak_overhead if tracer is not None else 0


def traced_call_cost(quick: bool) -> None:
    """Untraced and traced calls alternate in rounds (this host's speed drifts); memray goes
    last, after every tracemalloc row (its hooks outlive its trackers)."""
    n, rounds = (20, 2) if quick else (40, 5)
    tools = ["tracemalloc"]
    try:
        import memray  # noqa: F401, PLC0415 - only to know whether it can be measured
    except ImportError:
        print("\n(memray is not installed: its rows are left out)")
    else:
        tools.append("memray")
    rows = []
    cases = [(tool, name, work, 10) for tool in tools for name, work in WORKLOADS]
    # forensics.frames: how much of tracemalloc's cost is the depth of each traceback
    cases.insert(len(WORKLOADS), ("tracemalloc", f"{WORKLOADS[1][0]}, frames 1",
                                  WORKLOADS[1][1], 1))
    for tool, name, work, frames in cases:
        calls = n if tool == "tracemalloc" else max(5, n // 4)
        base, traced, peak = [], [], 0
        for _ in range(rounds):
            base.append(_per_call(work, calls, None)[0])
            seconds, most = _per_call(work, calls, tool, frames)
            traced.append(seconds)
            peak = max(peak, most)
        b, t = statistics.median(base), statistics.median(traced)
        rows.append([name, tool, f"{b * 1e6:,.0f}", f"{t * 1e6:,.0f}", f"{t / b:.1f}x",
                     f"{(t - b) * 1e3:.2f}", f"{peak / KiB:,.0f}" if tool == "tracemalloc" else "-"])
    table(f"A traced call against an untraced one, in-process (median of {rounds} alternating "
          f"rounds, each the median of {n} calls, {max(5, n // 4)} with memray; traced: the "
          f"tool started before the call, stopped after it, what it left worked out and "
          f"reported, as a tracing child does)",
          ["workload", "tool", "untraced (µs)", "traced (µs)", "ratio", "added (ms)",
           "tracer memory when the call returned (KiB)"], rows)
    assert not tracemalloc.is_tracing()


def _ask_trace(daemon: DaemonProc | None, calls: int) -> None:
    """What ``celery-memguard trace`` does: the request, then wait until a child has it."""
    assert daemon is not None
    rid = f"bench-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(daemon.socket_path))
        sock.send(messages.encode(messages.TraceRequest(pid=os.getpid(), id=rid, task=TASK,
                                                        calls=calls, worker=None,
                                                        timeout_ms=600_000)))
    wait_for(lambda: any(t["id"] == rid and t["state"] == "tracing"
                         for t in daemon.status()["forensics"]["traces"]), 20,
             "the trace was not placed")


def _keep_status(into: list[dict[str, Any]], daemon: DaemonProc | None) -> None:
    """The daemon's /status at the end of a run, read before the daemon stops."""
    into.append(daemon.status() if daemon is not None else {})


def _traced(run: Run) -> tuple[int, int, int]:
    """(calls traced, tracer peak bytes, the tracing child's peak RSS less the other's)."""
    status = run.extra["status"]
    [trace] = status["forensics"]["traces"]
    result = trace["result"] or {}
    peaks = run.extra["sampler"].peak
    mine = peaks.get(trace["pid"], 0)
    others = [rss for pid, rss in peaks.items() if pid != trace["pid"]]
    return result.get("calls", 0), result.get("tracer_bytes", 0), mine - max(others, default=0)


def throughput_while_tracing(bench: Bench, rounds: int, quick: bool) -> None:
    """Rounds of three fresh workers: none traces, one child traces every call it runs, none."""
    kinds = ["alloc"] * (300 if quick else 2000)
    config = {"limits": {"soft": "1GiB", "hard": "2GiB"}, "log": {"level": "warning"},
              "sampling": {"interval": "250ms"}, "forensics": {"auto": False}}
    ratio: list[float] = []
    control: list[float] = []
    none_rates: list[float] = []
    traced_rates: list[float] = []
    extra: list[float] = []
    spread: list[float] = []
    traced_calls: list[float] = []
    tracer: list[float] = []
    for _ in range(rounds):
        first = bench.run("none", [], True, config, kinds)
        statuses: list[dict[str, Any]] = []
        middle = bench.run("tracing", [], True, config, kinds,
                           before=lambda daemon: _ask_trace(daemon, 1000),
                           after=functools.partial(_keep_status, statuses))
        middle.extra["status"] = statuses[0]
        last = bench.run("none", [], True, config, kinds)
        bracket = (first.tasks_per_second + last.tasks_per_second) / 2
        ratio.append(middle.tasks_per_second / bracket)
        control.append(last.tasks_per_second / first.tasks_per_second)
        none_rates += [first.tasks_per_second, last.tasks_per_second]
        traced_rates.append(middle.tasks_per_second)
        calls, peak, more = _traced(middle)
        traced_calls.append(calls)
        tracer.append(peak)
        extra.append(more)
        for run in (first, last):
            peaks = sorted(run.extra["sampler"].peak.values())
            spread.append(peaks[-1] - peaks[0] if len(peaks) > 1 else 0)
    table(f"Throughput while one child traces: {len(kinds)} JSON round trips of 16 KB, prefork "
          f"-c 2, {rounds} rounds of three fresh workers (none traces, one child traces every "
          f"call it runs, none)",
          ["what", "figure"],
          [["tasks/s, no trace (median)", f"{median(none_rates):.0f}"],
           ["tasks/s, one child tracing (median)", f"{median(traced_rates):.0f}"],
           ["tracing / mean of the two bracketing runs (median, 95 % interval)",
            f"{median(ratio):.3f} ({interval(ratio)})"],
           ["control: second run without / first (median, 95 % interval)",
            f"{median(control):.3f} ({interval(control)})"],
           ["calls the tracing child traced (median of rounds)", f"{median(traced_calls):.0f}"],
           ["tracer memory at its peak (tracer_bytes, median)",
            f"{median(tracer) / KiB:,.0f} KiB"],
           ["tracing child's peak RSS less the other child's (median)",
            f"{median(extra) / MiB:+.2f} MiB"],
           ["without a trace: the two children's peak RSS apart (median)",
            f"{median(spread) / MiB:.2f} MiB"]])
    print("\nper round, tracing / bracket: " + " ".join(f"{r:.3f}" for r in ratio)
          + "\nper round, control:           " + " ".join(f"{r:.3f}" for r in control))


def idle_cost(bench: Bench, rounds: int, quick: bool, baseline: Path) -> None:
    """Nothing traces: this code's agent against the baseline's, by the agent-overhead method."""
    kinds = ["noop"] * (300 if quick else 2000)
    config = {"limits": {"soft": "1GiB", "hard": "2GiB"}, "log": {"level": "warning"}}
    ratio, control, base_rates, rates = [], [], [], []
    for _ in range(rounds):
        first = bench.run("baseline", [], True, config, kinds, tree=baseline)
        middle = bench.run("this code", [], True, config, kinds)
        last = bench.run("baseline", [], True, config, kinds, tree=baseline)
        ratio.append(middle.tasks_per_second
                     / ((first.tasks_per_second + last.tasks_per_second) / 2))
        control.append(last.tasks_per_second / first.tasks_per_second)
        base_rates += [first.tasks_per_second, last.tasks_per_second]
        rates.append(middle.tasks_per_second)
    child: dict[str, list[float]] = {"baseline": [], "this code": []}
    script = ("from benchmarks.run import agent_task_cost; "
              "base, added = agent_task_cost(500, 20); print(base, added)")
    for _ in range(3 if quick else 12):
        for name, tree in (("baseline", baseline), ("this code", ROOT)):
            out = subprocess.run([sys.executable, "-c", script], cwd=tree, capture_output=True,
                                 text=True, check=True, timeout=300).stdout.split()
            child[name].append(float(out[1]))
    table(f"Where nothing traces: the agent of this code against {baseline.name}'s, no-op tasks, "
          f"{rounds} rounds of three fresh workers (baseline, this code, baseline)",
          ["what", "figure"],
          [["tasks/s, baseline (median)", f"{median(base_rates):.0f}"],
           ["tasks/s, this code (median)", f"{median(rates):.0f}"],
           ["this code / mean of the two bracketing baseline runs (median, 95 % interval)",
            f"{median(ratio):.3f} ({interval(ratio)})"],
           ["control: second baseline run / first (median, 95 % interval)",
            f"{median(control):.3f} ({interval(control)})"],
           ["a child's work the agent adds per no-op task, in-process, baseline (µs, median)",
            f"{median(child['baseline']) * 1e6:.1f}"],
           ["the same, this code (µs, median)", f"{median(child['this code']) * 1e6:.1f}"]])
    print("\nper round, this code / bracket: " + " ".join(f"{r:.3f}" for r in ratio)
          + "\nin-process added µs, baseline:  "
          + " ".join(f"{v * 1e6:.1f}" for v in child["baseline"])
          + "\nin-process added µs, this code: "
          + " ".join(f"{v * 1e6:.1f}" for v in child["this code"]))


def bench_forensics(bench: Bench, rounds: int, quick: bool, baseline: Path | None) -> None:
    traced_call_cost(quick)
    throughput_while_tracing(bench, rounds, quick)
    if baseline is not None:
        idle_cost(bench, rounds, quick, baseline)
