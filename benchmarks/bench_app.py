"""The benchmark workload's Celery app: one task whose kind decides what it does to memory.

Broker and backend come from BENCH_BROKER/BENCH_BACKEND; the agent is installed only when
BENCH_AGENT=1, so the same app serves the built-in guards and celery-memguard. With
BENCH_PEAKS set to a directory, each pool child writes its exact peak RSS there as it exits.
"""

from __future__ import annotations

import json
import os
import time

from celery import Celery, signals

import celery_memguard

app = Celery("bench", broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"),
             backend=os.environ.get("BENCH_BACKEND", "redis://127.0.0.1:6379/1"))
app.conf.update(worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
                result_expires=600)
if os.environ.get("BENCH_AGENT") == "1":
    celery_memguard.install(app, freeze=os.environ.get("BENCH_FREEZE") == "1")


def _record_peak(**_: object) -> None:
    """A pool child on its way out (billiard's exit path, whatever made it leave): its peak RSS
    as the kernel kept it (VmHWM), which no sampling can miss."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                with open(os.path.join(_PEAKS, str(os.getpid())), "w") as out:
                    out.write(str(int(line.split()[1]) * 1024))
                return


_PEAKS = os.environ.get("BENCH_PEAKS", "")
if _PEAKS:
    signals.worker_process_shutdown.connect(_record_peak, weak=False)

MiB = 1024 * 1024
_kept: list[bytes] = []
_cache: dict[str, bytes] = {}
_DOC = {"items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"], "price": i * 1.5}
                  for i in range(200)]}  # about 16 KB as JSON


@app.task
def work(kind: str) -> tuple[int, float]:
    """keep: 2 MiB for the life of the process; cache: 4 MiB once per process; spike: 300 MiB
    allocated and freed within the task; runaway: 16 MiB every 20 ms up to 640 MiB; alloc: a
    JSON round trip of 16 KB (thousands of small allocations, all freed); sleep: 100 ms doing
    nothing; sleepkeep: 100 ms, then keep; noop."""
    if kind in ("sleep", "sleepkeep"):
        time.sleep(0.1)
    if kind in ("keep", "sleepkeep"):
        _kept.append(b"\x01" * (2 * MiB))
    elif kind == "cache":
        if "c" not in _cache:
            _cache["c"] = b"\x02" * (4 * MiB)
    elif kind == "spike":
        block = b"\x03" * (300 * MiB)
        del block
    elif kind == "alloc":
        json.loads(json.dumps(_DOC))
    elif kind == "runaway":
        held: list[bytes] = []
        while len(held) < 40:
            held.append(b"\x04" * (16 * MiB))
            time.sleep(0.02)
    return os.getpid(), time.time()
