"""Have Celery's prefork pool replace a child that left as soon as it can be joined.

Installed by the main process's agent at worker_init, before the pool is created. Applies to
every recycle path: this agent's, --max-tasks-per-child and --max-memory-per-child alike.
"""

from __future__ import annotations

from typing import Any

# An exited child is looked for again after 2 ms, then twice as long each time up to 20 ms,
# until it is joined: it can be reaped 1-5 ms after its pipe closes (median 1.7 ms here).
JOIN_FIRST_RETRY_SECONDS = 0.002
JOIN_RETRY_SECONDS = 0.02  # the longest wait between two looks
JOIN_RETRIES = 55  # about one second; past it Celery's own five-second maintain_pool timer remains


def install() -> None:
    """Have Celery's prefork pool replace a child that left as soon as it can be joined.

    Celery's AsynPool learns that a child exited when the child's sentinel pipe closes, stops
    watching that pipe and runs ``maintain_pool`` once. The kernel closes an exiting process's
    descriptors before the process can be reaped, so that run often finds no exit code yet,
    joins nothing, and nothing looks again until the pool's five-second timer: meanwhile the
    slot has no process, and a job the parent had already written to the leaving child waits
    with it. Seen here in about one recycle in three, for every recycle path (this agent's,
    --max-tasks-per-child and --max-memory-per-child alike), as stalls of up to 4.7 s with
    no task finishing; reported upstream as celery/celery#9588. After the original handler,
    a child still in the pool is looked for again after ``JOIN_FIRST_RETRY_SECONDS``, then at
    doubling intervals up to ``JOIN_RETRY_SECONDS``, for about a second; the rest of
    Celery's handling is unchanged. Installed before the pool is created.
    """
    from celery.concurrency import asynpool  # noqa: PLC0415 - only in a worker

    original = getattr(asynpool.AsynPool, "_event_process_exit", None)
    if original is None or getattr(original, "_memguard", False):
        return

    def _event_process_exit(self: Any, hub: Any, proc: Any) -> None:
        original(self, hub, proc)
        _join_later(self, hub, proc, JOIN_RETRIES, JOIN_FIRST_RETRY_SECONDS)

    _event_process_exit._memguard = True  # type: ignore[attr-defined]
    asynpool.AsynPool._event_process_exit = _event_process_exit


def _killed(proc: Any) -> bool:
    """Whether the child that exited was killed by a signal (the kernel's OOM killer, most
    often). Its replacement is left to Celery's five-second timer: a child replaced at once
    would take the next task while its container is still out of memory (measured in a
    520 MiB cgroup: 10-11 of 12 tasks OOM-killed with prompt replacement, 5-8 without)."""
    popen = getattr(proc, "_popen", None)
    code = popen.poll() if popen is not None else None
    return isinstance(code, int) and code < 0


def _join_later(pool: Any, hub: Any, proc: Any, tries: int, delay: float) -> None:
    """While ``proc`` is still in the pool, run its ``maintain_pool`` again in ``delay``
    seconds (then twice that, up to ``JOIN_RETRY_SECONDS``). Errors raised by maintain_pool
    are Celery's own and reach its loop as from its own timer."""
    try:
        if tries <= 0 or proc not in pool._pool:
            return

        def again() -> None:
            if proc in pool._pool:
                if _killed(proc):
                    return  # not fed a new child at once: Celery's own timer replaces it
                pool.maintain_pool()
            _join_later(pool, hub, proc, tries - 1, min(delay * 2, JOIN_RETRY_SECONDS))

        hub.call_later(delay, again)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return
