"""Check, at start, each Celery and billiard internal the agent joins (protocol.hooks).

A hook that is not where the agent expects is logged once, naming it and what is lost, and
goes into the hellos so that the daemon shows the worker as degraded; the agent carries on
with what still works. The class checks run once in the worker's main process (worker_init);
pool children inherit what was found and warned across fork.
"""

from __future__ import annotations

import inspect
import logging
import platform
from typing import Any

from celery_memguard.protocol import hooks
from celery_memguard.protocol.signals import EX_RECYCLE

logger = logging.getLogger("celery_memguard")

_missing: set[str] = set()  # in this process (a child adds its own finds)
_warned: set[str] = set()  # named in the log already, by this process or its parent
_checked = False


def check_classes() -> None:
    """Look at billiard's pool worker and Celery's AsynPool once, before the pool exists."""
    global _checked
    if _checked:
        return
    _checked = True
    for hook in _class_findings():
        report(hook)


def _class_findings() -> list[str]:
    try:
        from billiard import pool  # noqa: PLC0415 - only in a worker
    except ImportError:  # pragma: no cover - billiard ships with Celery
        return [hooks.POOL_WORKER]
    found = []
    loop = _code_names(getattr(getattr(pool, "Worker", None), "workloop", None))
    made = _code_names(getattr(getattr(pool, "Worker", None), "_make_child_methods", None))
    if "wait_for_job" not in loop or "wait_for_job" not in made:
        found.append(hooks.WAIT_FOR_JOB)  # bound once per loop, from an instance attribute
    if "prepare_result" not in loop or not callable(getattr(pool.Worker, "prepare_result", None)):
        found.append(hooks.PREPARE_RESULT)
    if getattr(pool, "EX_RECYCLE", None) != EX_RECYCLE:
        found.append(hooks.EX_RECYCLE)
    try:
        from celery.concurrency import asynpool  # noqa: PLC0415
        exit_hook = getattr(asynpool.AsynPool, "_event_process_exit", None)
        params = list(inspect.signature(exit_hook).parameters) if callable(exit_hook) else []
    except (ImportError, TypeError, ValueError):
        params = []
    if len(params) != 3:  # (self, hub, proc)
        found.append(hooks.PROCESS_EXIT)
    return found


def _code_names(function: Any) -> tuple[str, ...]:
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def report(hook: str) -> None:
    """A hook is missing in this process: counted, and named in the log once per worker."""
    _missing.add(hook)
    if hook in _warned:
        return
    _warned.add(hook)
    lost, fix = hooks.effect(hook)
    logger.warning("celery-memguard: missing hook %s: %s. Fix: %s.", hook, lost, fix)


def missing() -> tuple[str, ...]:
    return tuple(sorted(_missing))


def versions() -> tuple[str, str, str]:
    """(Celery, billiard, Python) versions, for the hello and celery-memguard doctor."""
    found = []
    for module in ("celery", "billiard"):
        try:
            found.append(str(getattr(__import__(module), "__version__", ""))[:40])
        except ImportError:  # pragma: no cover
            found.append("")
    return found[0], found[1], platform.python_version()
