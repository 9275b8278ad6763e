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

__all__ = ["__version__", "install"]


def install(app: Celery, socket: str | None = None) -> None:
    """Hook the agent into ``app`` (see celery_memguard.agent); safe to call more than once."""
    from celery_memguard import agent  # noqa: PLC0415 - keeps Celery out of the daemon

    agent.install(app, socket=socket)
