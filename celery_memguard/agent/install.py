"""``install(app)``: connect the agent to a Celery app's signals, once per app."""

from __future__ import annotations

from celery import Celery, signals

from celery_memguard.agent import main_process, pool_child
from celery_memguard.agent.context import CONTEXT
from celery_memguard.protocol import paths


def install(app: Celery, socket: str | None = None, restart_worker: bool = False,
            freeze: bool = False) -> None:
    """Hook celery-memguard into a Celery app; call once in the module that defines ``app``.

    The socket path is taken from ``CELERY_MEMGUARD_SOCKET`` when set, else ``socket``, else
    the documented default. ``restart_worker`` lets the daemon restart a worker whose pool
    has no children (solo, threads, gevent, eventlet) as a whole: a warm shutdown past the
    soft limit, a cold one past the hard limit; its process manager must start it again.
    ``freeze`` has the main process call ``gc.freeze()`` once, just before its pool forks the
    first child (main_process.freeze_before_fork). Installing twice is harmless.
    """
    CONTEXT.socket = paths.socket_path(socket)
    CONTEXT.restart_worker = restart_worker
    CONTEXT.freeze = freeze
    if any(known is app for known in CONTEXT.apps):
        return
    CONTEXT.apps.append(app)
    uid = f"celery_memguard.{id(app)}"
    signals.worker_init.connect(main_process.on_worker_init, weak=False,
                                dispatch_uid=uid + ".init_worker")
    signals.worker_ready.connect(main_process.on_worker_ready, weak=False,
                                 dispatch_uid=uid + ".ready")
    signals.worker_shutdown.connect(main_process.on_worker_shutdown, weak=False,
                                    dispatch_uid=uid + ".shutdown")
    signals.worker_process_init.connect(pool_child.on_process_init, weak=False,
                                        dispatch_uid=uid + ".init")
    signals.task_received.connect(main_process.on_task_received, weak=False,
                                  dispatch_uid=uid + ".received")
    signals.worker_before_create_process.connect(main_process.freeze_before_fork, weak=False,
                                                 dispatch_uid=uid + ".freeze")
