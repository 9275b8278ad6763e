"""Trace results kept as files: one JSON document per trace in the forensics directory, the
newest ``forensics.keep`` per task name, so that they outlive recycles and daemon restarts;
and the files written beside the socket for the children (their trace requests)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from celery_memguard.daemon.leak_sites import Result, file_name, from_document, task_prefix

FILE_MODE = 0o644  # children read the requests; anyone who may read the directory, results
MAX_FILES = 10000  # result files read at start
MAX_FILE = 1 << 22  # bytes read of one result file


def keep(directory: Path, result: Result, document: dict[str, Any], newest: int) -> Path:
    """Write the result's file and remove the oldest of its task name past ``newest``;
    OSError when the directory will not have it."""
    path = directory / file_name(result)
    directory.mkdir(parents=True, exist_ok=True)
    write(path, json.dumps(document, indent=1).encode())
    kept = sorted(directory.glob(f"{task_prefix(result.task)}.*.json"))  # oldest first
    for old in kept[: max(0, len(kept) - newest)]:
        old.unlink()
    return path


def newest(directory: Path) -> dict[str, Result]:
    """The newest result kept of every task name (none where the directory is unreadable);
    files that are not results are passed over."""
    try:
        files = sorted(directory.glob("*.json"))[-MAX_FILES:]
    except OSError:
        return {}
    found: dict[str, Result] = {}
    for path in files:
        try:
            result = from_document(json.loads(path.read_bytes()[:MAX_FILE]))
        except (OSError, ValueError):
            continue
        if result is not None and (result.task not in found
                                   or result.finished_at >= found[result.task].finished_at):
            found[result.task] = result
    return found


def write(path: Path, data: bytes) -> None:
    """Atomically: a reader sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def remove(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
