"""What the agent of one process knows: its settings from ``install`` and its worker.

One instance per process, set by ``install`` in the main process and inherited by the pool
children across fork (a fork copies it, so the children see what the parent had at fork time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from celery_memguard.protocol.paths import DEFAULT_SOCKET

POOL_ENV = "CELERY_MEMGUARD_POOL_SIZE"  # set by the main process for children it spawns


@dataclass
class AgentContext:
    socket: str = DEFAULT_SOCKET
    restart_worker: bool = False  # opted in to whole-worker restarts (pools without children)
    freeze: bool = False  # gc.freeze() before the pool's first fork
    frozen: bool = False
    apps: list[Any] = field(default_factory=list)  # the Celery apps installed into
    controller: Any = None  # the WorkController, kept at worker_init: its children inherit it


CONTEXT = AgentContext()


def pool_size(pool: Any) -> int:
    """The size of a worker's pool as its hello reports it, and as its children take it for
    the jitter: the same expression on both sides, so they compute the same thresholds. 0
    when unknown."""
    try:
        size = getattr(pool, "num_processes", None)
    except Exception:  # noqa: BLE001 - TaskPool.num_processes before billiard's pool exists
        size = None
    size = size or getattr(pool, "limit", None)
    return size if isinstance(size, int) and size > 0 else 0


def jitter_pool(controller: Any) -> int:
    """The pool size a worker's jitter is computed for, the same figure on both sides:
    --autoscale's maximum, which stays put while the pool grows and shrinks (a child keeps
    the figure it saw when it started), else the pool's size. A spawned child, which
    inherits no controller, takes it from the environment its parent set. 0 when unknown."""
    maximum = getattr(controller, "max_concurrency", None)
    if isinstance(maximum, int) and maximum > 0:
        return maximum
    size = pool_size(getattr(controller, "pool", None))
    if size or controller is not None:
        return size
    inherited = os.environ.get(POOL_ENV, "")
    return int(inherited) if inherited.isdigit() else 0
