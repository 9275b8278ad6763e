"""The Celery app the demo runs: a leaking task, a cache-warming task, a runaway and a no-op.

It needs no broker server: Celery's filesystem transport and file result backend keep
everything in the directory named by MEMGUARD_DEMO_DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

import celery_memguard

_DIR = Path(os.environ.get("MEMGUARD_DEMO_DIR", "/tmp/celery-memguard-demo"))  # noqa: S108 - the demo always sets it
_QUEUE = _DIR / "queue"
_RESULTS = _DIR / "results"

app = Celery("memguard_demo", broker="filesystem://", backend=f"file://{_RESULTS}")
app.conf.update(
    broker_transport_options={"data_folder_in": str(_QUEUE), "data_folder_out": str(_QUEUE),
                              "polling_interval": 0.02},
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
celery_memguard.install(app)

_kept: list[bytes] = []
_cache: dict[str, bytes] = {}


@app.task
def leaky_report(mib: float = 2.0) -> int:
    """Keeps ``mib`` MiB for the life of the process, as a module-level cache that never evicts."""
    _kept.append(b"\x01" * int(mib * 1024 * 1024))
    return len(_kept)


@app.task
def warm_cache(mib: float = 6.0) -> int:
    """Fills a cache once per process, then reuses it: growth that stops (not a leak)."""
    if "table" not in _cache:
        _cache["table"] = b"\x02" * int(mib * 1024 * 1024)
    return len(_cache)


@app.task
def quick() -> int:
    return os.getpid()


@app.task
def runaway(step_mib: float = 16, every: float = 0.02, up_to_mib: float = 1024) -> int:
    """Allocates 16 MiB every 20 ms: the hard limit stops it long before it gets to 1 GiB."""
    import time  # noqa: PLC0415

    held: list[bytes] = []
    while len(held) * step_mib < up_to_mib:
        held.append(b"\x03" * int(step_mib * 1024 * 1024))
        time.sleep(every)
    return len(held)
