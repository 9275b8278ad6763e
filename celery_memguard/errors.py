"""The exception a user's task may meet; importable without Celery, by either side."""

from __future__ import annotations


class MemoryLimitExceeded(Exception):
    """Raised inside a task whose child went past the hard limit while it ran.

    Deliberately not a MemoryError: Celery's worker treats a MemoryError reported by a pool
    child as fatal and stops the whole worker (celery/worker/request.py ``on_failure``).
    Retry with ``autoretry_for=(MemoryLimitExceeded,)``. The arguments are the measured size
    and the limit in bytes, why (``reason``) and what else there is to say (``detail``),
    which is how Celery's result backends rebuild the exception.

    ``reason``: ``hard`` (the worker process went past the hard limit), ``container`` (the
    container went past its hard line and this task was the one growing), ``quarantined``
    (the task was running at earlier OOM kills or interrupts: it is not run again).
    """

    def __init__(self, rss: int, limit: int, reason: str = "hard", detail: str = "") -> None:
        super().__init__(rss, limit, reason, detail)
        self.rss = rss
        self.limit = limit
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        mib = 1024 * 1024
        if self.reason == "quarantined":
            return f"celery-memguard refused to run the task again: {self.detail}"
        if self.reason == "container":
            return (f"celery-memguard interrupted the task: its container used "
                    f"{self.rss / mib:.1f} MiB, over its hard line of {self.limit / mib:.1f} MiB, "
                    f"and this task was growing {self.detail}".rstrip())
        return (f"celery-memguard interrupted the task: its worker process used "
                f"{self.rss / mib:.1f} MiB, over the hard limit of {self.limit / mib:.1f} MiB "
                f"({self.rss} > {self.limit} bytes)")
