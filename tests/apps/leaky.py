"""A Celery app for the integration tests: tasks that really allocate and keep memory.

The broker and result backend come from the environment (MEMGUARD_TEST_BROKER,
MEMGUARD_TEST_BACKEND), so one app serves Redis, RabbitMQ and the filesystem transport.
"""

from __future__ import annotations

import os

from celery import Celery

import celery_memguard

app = Celery(
    "leaky",
    broker=os.environ.get("MEMGUARD_TEST_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("MEMGUARD_TEST_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_acks_late=os.environ.get("MEMGUARD_TEST_ACKS_LATE") == "1",
    task_reject_on_worker_lost=os.environ.get("MEMGUARD_TEST_REJECT_ON_LOST") == "1",
    worker_lost_wait=float(os.environ.get("MEMGUARD_TEST_LOST_WAIT", "10")),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    result_expires=600,
)
if os.environ.get("MEMGUARD_TEST_BREAK_HOOK") == "prepare_result":
    from tests.apps.broken_billiard import rename_prepare_result

    rename_prepare_result()
if os.environ.get("MEMGUARD_TEST_NO_AGENT") != "1":
    celery_memguard.install(app, restart_worker=os.environ.get("MEMGUARD_TEST_RESTART") == "1",
                            freeze=os.environ.get("MEMGUARD_TEST_FREEZE") == "1")

_kept: list[bytes] = []
_RUN_LOG = os.environ.get("MEMGUARD_TEST_RUN_LOG")


def _log_run(task_id: str) -> None:
    """Append the task id and pid to a file, so a test can tell whether any task ran twice."""
    if _RUN_LOG:
        with open(_RUN_LOG, "a", encoding="ascii") as fh:
            fh.write(f"{task_id} {os.getpid()}\n")


@app.task(bind=True)
def keep(self, mib: float = 2.0) -> int:
    """Keep ``mib`` MiB for the life of the process (written, so it is resident)."""
    _log_run(self.request.id)
    _kept.append(b"\x01" * int(mib * 1024 * 1024))
    return os.getpid()


@app.task(bind=True)
def hoard(self, mib: float = 2.0) -> int:
    """Keep ``mib`` MiB for the life of the process, under a second task name than keep's."""
    _log_run(self.request.id)
    _kept.append(b"\x02" * int(mib * 1024 * 1024))
    return os.getpid()


@app.task(bind=True)
def noop(self) -> int:
    _log_run(self.request.id)
    return os.getpid()


@app.task(bind=True)
def sleep_then_keep(self, seconds: float, mib: float) -> int:
    """A task long enough for a recycle request to arrive while it runs."""
    import time  # noqa: PLC0415

    _log_run(self.request.id)
    time.sleep(seconds)
    _kept.append(b"\x01" * int(mib * 1024 * 1024))
    return os.getpid()


@app.task(bind=True)
def runaway(self, step_mib: float = 16, every: float = 0.02, up_to_mib: float = 640) -> int:
    """Allocates ``step_mib`` every ``every`` seconds up to ``up_to_mib``: a runaway task."""
    import time  # noqa: PLC0415

    _log_run(self.request.id)
    held = []
    while len(held) * step_mib < up_to_mib:
        held.append(b"\x01" * int(step_mib * 1024 * 1024))
        time.sleep(every)
    return os.getpid()


@app.task(bind=True)
def stubborn(self, step_mib: float = 16, every: float = 0.02, up_to_mib: float = 600,
             then_sleep: float = 60) -> int:
    """Swallows the memory exception and keeps allocating, then sits on the memory."""
    import time  # noqa: PLC0415

    from celery_memguard import MemoryLimitExceeded  # noqa: PLC0415

    _log_run(self.request.id)
    held = []
    while len(held) * step_mib < up_to_mib:
        try:
            held.append(b"\x01" * int(step_mib * 1024 * 1024))
            time.sleep(every)
        except MemoryLimitExceeded:
            continue
    time.sleep(then_sleep)
    return os.getpid()


_cache: dict[str, bytes] = {}


@app.task(bind=True)
def warm(self, mib: float = 8) -> int:
    """Fills a cache once per process, then only reads it: growth that stops."""
    _log_run(self.request.id)
    if "table" not in _cache:
        _cache["table"] = b"\x05" * int(mib * 1024 * 1024)
    return os.getpid()


@app.task(bind=True)
def spiky(self, mib: float = 100) -> int:
    """Takes a lot of memory and gives it back before returning."""
    _log_run(self.request.id)
    block = b"\x06" * int(mib * 1024 * 1024)
    del block
    return os.getpid()


@app.task(bind=True)
def nested(self, mib: float = 8, runaway_mib: float = 0) -> int:
    """Runs ``noop`` in-process with ``apply()`` first (Celery's task signals fire for it too),
    then keeps ``mib`` MiB, then allocates 16 MiB every 20 ms up to ``runaway_mib``."""
    import time  # noqa: PLC0415

    _log_run(self.request.id)
    noop.apply()
    _kept.append(b"\x01" * int(mib * 1024 * 1024))
    held = []
    while len(held) * 16 < runaway_mib:
        held.append(b"\x01" * (16 * 1024 * 1024))
        time.sleep(0.02)
    return os.getpid()


@app.task(bind=True)
def boom(self) -> int:
    _log_run(self.request.id)
    raise ValueError("boom")


@app.task(bind=True)
def threshold(self, seconds: float = 0.0) -> tuple[int, int]:
    """This child's pid and the soft threshold its agent computed (0: none yet), after a
    sleep that lets tasks sent together spread over the pool."""
    import time  # noqa: PLC0415

    from celery_memguard.agent import pool_child  # noqa: PLC0415

    time.sleep(seconds)
    child = pool_child.current()  # what the agent of this very child decided
    return os.getpid(), child.soft_threshold if child is not None else -1


@app.task(bind=True)
def hold(self, mib: float = 150, seconds: float = 1.5, step_mib: float = 0) -> int:
    """Takes ``mib`` MiB (at once, one allocation, or in steps of ``step_mib`` every 10 ms),
    holds it ``seconds``, and gives it back: no leak, only a peak."""
    import time  # noqa: PLC0415

    _log_run(self.request.id)
    if step_mib:
        blocks = []
        while len(blocks) * step_mib < mib:
            blocks.append(b"\x07" * int(step_mib * 1024 * 1024))
            time.sleep(0.01)
    else:
        blocks = [b"\x07" * int(mib * 1024 * 1024)]
    time.sleep(seconds)
    del blocks
    return os.getpid()


@app.task(bind=True)
def frozen(self) -> int:
    """How many objects this child's cycle collector skips (gc.freeze in its parent)."""
    import gc  # noqa: PLC0415

    _log_run(self.request.id)
    return gc.get_freeze_count()


@app.task(bind=True)
def keep_via_helper(self, kib: float = 512) -> int:
    """Keep ``kib`` KiB for the life of the process, through a helper in another module."""
    from tests.apps import leak_helpers  # noqa: PLC0415

    _log_run(self.request.id)
    leak_helpers.remember(int(kib * 1024))
    return os.getpid()


_native: list[int] = []  # addresses of the blocks kept, never freed
_libraries: dict[str | None, object] = {}


@app.task(bind=True)
def keep_native(self, kib: float = 512, library: str | None = None) -> int:
    """Keep ``kib`` KiB of native memory, written and never freed: malloc called through ctypes,
    or (``library``: a shared library built from tests/apps/native_leak.c) by a C function."""
    import ctypes  # noqa: PLC0415

    _log_run(self.request.id)
    size = int(kib * 1024)
    lib = _libraries.get(library)
    if lib is None:
        lib = _libraries[library] = ctypes.CDLL(library)
        allocate = lib.native_keep if library else lib.malloc
        allocate.restype, allocate.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    allocate = lib.native_keep if library else lib.malloc  # type: ignore[attr-defined]
    block = allocate(size)
    if library is None:
        ctypes.memset(block, 1, size)
    _native.append(block)
    return os.getpid()
