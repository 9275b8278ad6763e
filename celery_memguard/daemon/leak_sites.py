"""A trace's result: what a leaking task's traced calls left behind, and where. Pure.

A child's reports (a LeakTrace after its LeakSite messages) become one Result; its document
is what the result file holds, what /status shows and what ``report --json`` prints. Figures
are per traced call. A site's share is of the growth the tracer saw; what RSS grew by and the
tracer did not see (native memory, to tracemalloc) is the untraced share.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from celery_memguard.protocol import messages

VERSION = 1
UNTRACED_ADVICE = 0.5  # an untraced share from which the result says what to do next
Frame = tuple[str, int, str]


@dataclass(frozen=True, slots=True)
class Site:
    filename: str
    lineno: int
    function: str
    code: str
    frames: tuple[Frame, ...]  # innermost first
    size: int  # bytes left over the traced calls
    blocks: int
    grew: int  # traced calls after which it held more


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    task: str
    worker: str
    pid: int
    index: int
    tool: str
    calls: int
    wanted: int
    rss_growth: int  # summed over the traced calls, the tracer's own memory left out
    traced_growth: int
    tracer_bytes: int
    reason: str  # done, leaving, expired, cancelled, child gone, error: ...
    finished_at: float  # wall clock
    on_demand: bool
    sites: tuple[Site, ...]

    @property
    def complete(self) -> bool:
        return self.reason == "done"

    def per_call(self, value: int) -> float:
        return value / self.calls if self.calls else 0.0

    @property
    def seen(self) -> int:
        """The traced growth the shares divide: never less than what the sites add up to."""
        return max(self.traced_growth, sum(site.size for site in self.sites), 0)

    @property
    def untraced_share(self) -> float | None:
        """The part of the RSS growth the tracer did not see; None when RSS did not grow."""
        if self.rss_growth <= 0:
            return None
        return min(1.0, max(0.0, (self.rss_growth - max(self.traced_growth, 0)) / self.rss_growth))


def assemble(trace: messages.LeakTrace, sites: list[messages.LeakSite], worker: str,
             finished_at: float, on_demand: bool, reason: str | None = None) -> Result:
    """A result from a child's report and the sites sent just before it (of this trace only)."""
    ranked = sorted((s for s in sites if s.trace == trace.trace), key=lambda s: s.rank)
    return Result(
        id=trace.trace, task=trace.task, worker=worker, pid=trace.pid, index=trace.index,
        tool=trace.tool, calls=trace.calls, wanted=trace.wanted, rss_growth=trace.rss_growth,
        traced_growth=trace.traced_growth, tracer_bytes=trace.tracer_bytes,
        reason=reason or trace.reason, finished_at=finished_at, on_demand=on_demand,
        sites=tuple(Site(filename=s.filename, lineno=s.lineno, function=s.function, code=s.code,
                         frames=s.frames, size=s.size, blocks=s.blocks, grew=s.grew)
                    for s in ranked[: trace.sites]))


def advice(result: Result) -> str | None:
    """What to do next, when most of the growth is not where the tool could see it."""
    share = result.untraced_share
    if share is None or share < UNTRACED_ADVICE:
        return None
    if result.tool == "memray":
        return (f"{share:.0%} of the RSS growth was not seen by memray either: memory mapped "
                f"directly (mmap), or allocated through a function pointer memray cannot "
                f"intercept (a libc malloc called through ctypes).")
    return (f"{share:.0%} of the RSS growth is outside Python's allocators (C extensions, "
            f"native libraries, ctypes): trace with memray's native stacks (pip install "
            f"celery-memguard[memray] in the worker's environment, forensics.tool: memray).")


def site_document(site: Site, result: Result) -> dict[str, Any]:
    seen = result.seen
    return {"filename": site.filename, "lineno": site.lineno, "function": site.function,
            "code": site.code,
            "traceback": [{"filename": f, "lineno": n, "function": fn} for f, n, fn in site.frames],
            "bytes_per_call": round(result.per_call(site.size)),
            "blocks_per_call": round(result.per_call(site.blocks), 2),
            "share": round(site.size / seen, 4) if seen else 0.0,
            "calls_grew": site.grew, "bytes": site.size, "blocks": site.blocks}


def document(result: Result) -> dict[str, Any]:
    """The result as its file holds it and as /status and ``report --json`` show it."""
    untraced = result.untraced_share
    return {"v": VERSION, "id": result.id, "task": result.task, "worker": result.worker,
            "pid": result.pid, "index": result.index, "tool": result.tool,
            "calls": result.calls, "calls_wanted": result.wanted, "complete": result.complete,
            "reason": result.reason, "finished_at": result.finished_at,
            "on_demand": result.on_demand,
            "rss_growth_bytes": result.rss_growth, "traced_growth_bytes": result.traced_growth,
            "rss_growth_per_call": round(result.per_call(result.rss_growth)),
            "traced_growth_per_call": round(result.per_call(result.traced_growth)),
            "untraced_share": None if untraced is None else round(untraced, 4),
            "tracer_bytes": result.tracer_bytes, "advice": advice(result),
            "sites": [site_document(site, result) for site in result.sites]}


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError(value)
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def from_document(body: object) -> Result | None:
    """A result read back from its file; None for anything malformed or of another version."""
    try:
        if not isinstance(body, dict) or body.get("v") != VERSION:
            return None
        sites = tuple(
            Site(filename=_str(s["filename"]), lineno=_int(s["lineno"]),
                 function=_str(s["function"]), code=_str(s["code"]),
                 frames=tuple((_str(f["filename"]), _int(f["lineno"]), _str(f["function"]))
                              for f in s["traceback"]),
                 size=_int(s["bytes"]), blocks=_int(s["blocks"]), grew=_int(s["calls_grew"]))
            for s in body["sites"])
        finished = body["finished_at"]
        if isinstance(finished, bool) or not isinstance(finished, int | float):
            return None
        on_demand = body["on_demand"]
        if not isinstance(on_demand, bool):
            return None
        return Result(id=_str(body["id"]), task=_str(body["task"]), worker=_str(body["worker"]),
                      pid=_int(body["pid"]), index=_int(body["index"]), tool=_str(body["tool"]),
                      calls=_int(body["calls"]), wanted=_int(body["calls_wanted"]),
                      rss_growth=_int(body["rss_growth_bytes"]),
                      traced_growth=_int(body["traced_growth_bytes"]),
                      tracer_bytes=_int(body["tracer_bytes"]), reason=_str(body["reason"]),
                      finished_at=float(finished), on_demand=on_demand, sites=sites)
    except (KeyError, TypeError, ValueError):
        return None


def file_name(result: Result) -> str:
    """``<task>-<hash>.<finished ms>.<id>.json``: safe whatever the task name and id hold, and
    grouped by task name (the hash tells apart names that the safe spelling merges)."""
    return (f"{task_prefix(result.task)}.{int(result.finished_at * 1000):015d}."
            f"{_safe(result.id)[:64]}.json")


def task_prefix(task: str) -> str:
    digest = hashlib.sha256(task.encode()).hexdigest()[:10]
    return f"{_safe(task)[:100]}-{digest}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip(".") or "_"
