"""The exception a user's task may meet; importable without Celery, by either side."""

from __future__ import annotations


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
