"""celery-memguard: keeps Celery prefork workers from leaking themselves to death.

Worker side: ``import celery_memguard; celery_memguard.install(app)``. The daemon side is the
``celery-memguard`` command. Importing this package does not import Celery: the agent
(celery_memguard.agent) is loaded only by ``install``.

Three programs share the package: ``agent/`` runs inside Celery's processes, ``daemon/`` is the
sidecar, ``protocol/`` is what both speak; ``cli/`` composes the daemon and the terminal tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from celery_memguard._version import __version__
from celery_memguard.errors import MemoryLimitExceeded

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["MemoryLimitExceeded", "__version__", "install"]


def install(app: Celery, socket: str | None = None, restart_worker: bool = False,
            freeze: bool = False) -> None:
    """Hook the agent into ``app`` (see celery_memguard.agent); safe to call more than once.

    ``restart_worker=True`` opts a worker whose pool has no children (solo, threads, gevent,
    eventlet) in to whole-worker restarts by the daemon. ``freeze=True`` freezes the main
    process's objects (``gc.freeze()``) just before the pool forks its first child, so that
    the children's cycle collections do not copy the pages they share with it.
    """
    from celery_memguard.agent import install as install_agent  # noqa: PLC0415 - keeps Celery out of the daemon

    install_agent(app, socket=socket, restart_worker=restart_worker, freeze=freeze)
