"""What the leaky app's tasks call: the line that keeps memory is here, not in the task."""

from __future__ import annotations

_store: list[bytes] = []
_last: list[bytes] = []


def remember(size: int) -> None:
    """Keep ``size`` bytes for the life of the process."""
    _store.append(b"\x02" * size)  # the leaking line


def replace(size: int) -> None:
    """Keep only the latest ``size`` bytes: what a call keeps, the next one frees."""
    _last[:] = [b"\x03" * size]


def churn(size: int) -> int:
    """Allocate ``size`` bytes in small pieces and give them all back."""
    pieces = [b"\x04" * 1000 for _ in range(size // 1000)]
    return len(pieces)


def leaking_line() -> int:
    """The line number of the leaking line above, as tests look for it."""
    with open(__file__, encoding="utf-8") as fh:
        return next(n for n, line in enumerate(fh, 1) if line.rstrip().endswith("# the leaking line"))
