"""``install(app)``: connect the agent to a Celery app's signals and steps, once per app."""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps, signals

from celery_memguard.agent import main_process, pool_child
from celery_memguard.agent.context import CONTEXT
from celery_memguard.protocol import paths


class Hello(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """Announces the worker when its consumer starts, which every WorkController does: an
    embedded one (``start_worker``, a program running its own) never sends worker_ready."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        main_process.on_consumer_start(parent)

    def stop(self, parent: Any) -> None:
        main_process.on_consumer_stop(parent)


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
    app.steps["consumer"].add(Hello)
    uid = f"celery_memguard.{id(app)}"
    for signal, handler, name in (
            (signals.worker_init, main_process.on_worker_init, "init_worker"),
            (signals.worker_ready, main_process.on_worker_ready, "ready"),
            (signals.worker_shutdown, main_process.on_worker_shutdown, "shutdown"),
            (signals.worker_shutting_down, main_process.on_worker_shutting_down, "shutting_down"),
            (signals.worker_before_create_process, main_process.on_before_create_process,
             "before_create"),
            (signals.worker_before_create_process, main_process.freeze_before_fork, "freeze"),
            (signals.worker_process_init, pool_child.on_process_init, "init"),
            (signals.task_received, main_process.on_task_received, "received")):
        signal.connect(handler, weak=False, dispatch_uid=f"{uid}.{name}")
