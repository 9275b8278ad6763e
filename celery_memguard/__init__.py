"""celery-memguard: keeps Celery prefork workers from leaking themselves to death.

Worker side: ``import celery_memguard; celery_memguard.install(app)``. The daemon side is the
``celery-memguard`` command. Importing this package does not import Celery: the agent is
loaded only by ``install``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["MemoryLimitExceeded", "__version__", "install"]


class MemoryLimitExceeded(Exception):
    """Raised inside a task whose child went past the hard limit while it ran.

    Deliberately not a MemoryError: Celery's worker treats a MemoryError reported by a pool
    child as fatal and stops the whole worker (celery/worker/request.py ``on_failure``).
    Retry with ``autoretry_for=(MemoryLimitExceeded,)``. The arguments are the measured size
    and the limit in bytes, which is how Celery's result backends rebuild the exception.
    """

    def __init__(self, rss: int, limit: int) -> None:
        super().__init__(rss, limit)
        self.rss = rss
        self.limit = limit

    def __str__(self) -> str:
        mib = 1024 * 1024
        return (f"celery-memguard interrupted the task: its worker process used "
                f"{self.rss / mib:.1f} MiB, over the hard limit of {self.limit / mib:.1f} MiB "
                f"({self.rss} > {self.limit} bytes)")


def install(app: Celery, socket: str | None = None, restart_worker: bool = False) -> None:
    """Hook the agent into ``app`` (see celery_memguard.agent); safe to call more than once.

    ``restart_worker=True`` opts a worker whose pool has no children (solo, threads, gevent,
    eventlet) in to whole-worker restarts by the daemon.
    """
    from celery_memguard import agent  # noqa: PLC0415 - keeps Celery out of the daemon

    agent.install(app, socket=socket, restart_worker=restart_worker)
