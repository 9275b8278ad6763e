"""Leak forensics in one pool child: which lines keep what a task's calls leave behind.

The daemon asks one child (protocol.forensics) to trace the next ``calls`` calls of one task
name; tracing.py marks where each of them starts and returns (the task's body). A tool
traces each call alone and says what it left allocated when it returned, by allocation
traceback; the Tracer sums that over the calls, groups it by site (the innermost frame in the
user's code: not the standard library, not Celery's own stack) and reports it. Tasks of other
names run untraced, so nothing they keep is counted.

The tools: tracemalloc (forensics_tracemalloc.py) sees Python's allocators only: what a task
leaves in native memory (C extensions, libraries called through ctypes) raises RSS and not
the traces, and is reported as untraced. memray, an optional extra, sees native allocations
too (forensics_memray.py, imported only when a request names it).
"""

from __future__ import annotations

import linecache
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from celery_memguard.agent.code_paths import Frame, Key
from celery_memguard.agent.forensics_tracemalloc import TracemallocTool
from celery_memguard.protocol import forensics, messages

TOP_SITES = 10  # sites reported per trace
SHOWN_FRAMES = 5  # frames of a site's traceback in a report
KEPT_TRACEBACKS = 2000  # tracebacks the tracer remembers; the smallest go first
MIN_SHARE = 0.01  # a site that kept less than this share of the growth (RSS or traced) is noise


class Tool(Protocol):
    """What a tracer needs of a tool: what one call left behind, its own memory, which frames
    are the user's code. ``before_call`` and ``after_call`` run where the traced code starts
    and returns (inside the task, for its body): they only take what they need, quickly;
    ``left`` works it out afterwards."""

    name: str
    in_body: bool  # may start inside the task's body (from a trace function)

    def start(self) -> None: ...

    def before_call(self) -> None: ...

    def after_call(self) -> object: ...

    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        """What the call left behind: traceback -> (bytes, blocks), either may be negative."""
        ...

    def overhead(self) -> int:
        """Bytes the tool itself holds now (left out of the leak figures)."""
        ...

    def user(self, frame: Frame) -> bool: ...

    def stop(self) -> None: ...


@dataclass(slots=True)
class Left:
    """What the traced calls left behind at one traceback, summed over the calls."""

    size: int = 0
    blocks: int = 0
    grew: int = 0  # calls after which it held more than before


@dataclass(frozen=True, slots=True)
class Site:
    frame: Frame  # where the memory was allocated, in the user's code where possible
    code: str
    frames: Key  # a short traceback, innermost first
    size: int
    blocks: int
    grew: int


class Tracer:
    """One trace request in this child: when to trace, what the calls left, the report."""

    def __init__(self, request: forensics.Request, tool: Tool,
                 wall: Callable[[], float] = time.time) -> None:
        self.request = request
        self.tool = tool
        self.wall = wall
        self.calls = 0
        self.rss_growth = 0
        self.traced_growth = 0
        self.left: dict[Key, Left] = {}
        self.started = False
        self.in_call = False  # a job to trace has begun and not ended
        self._opened = False  # its traced code started (the tool took its 'before')
        self._taken: object = None  # the tool's 'after', once the traced code returned
        self._closed = False
        self._held = 0  # the tool's memory when the traced code returned
        self.peak_overhead = 0
        self.reason = "tracing"  # then done, leaving, expired, cancelled or error

    @property
    def finished(self) -> bool:
        return self.reason != "tracing"

    def begin(self, name: str) -> bool:
        """A job begins: True when it is a call to trace; ``open`` and ``close`` then mark
        where its traced code starts and returns."""
        if self.finished:
            return False
        if self.wall() > self.request.until:
            self.finish("expired")
            return False
        if name != self.request.task:
            return False
        if not self.started:
            self.started = True
            self.tool.start()
        self.in_call, self._opened, self._closed, self._taken, self._held = (
            True, False, False, None, 0)
        return True

    def open(self) -> None:
        """The traced code starts: the tool takes its 'before'."""
        if self.in_call and not self._opened:
            self._opened = True
            self.tool.before_call()

    def close(self) -> None:
        """The traced code returned: the tool takes its 'after' (worked out at ``end``)."""
        if self._opened and not self._closed:
            self._closed = True
            self._held = self.tool.overhead()
            self.peak_overhead = max(self.peak_overhead, self._held)
            self._taken = self.tool.after_call()

    def overhead(self) -> int:
        """The tool's own memory in the job under way: what it holds while the traced code
        runs, what it held when that returned (allocated in the job, freed or not since)."""
        if not self.in_call or not self._opened or self.finished:
            return 0
        if self._closed:
            return self._held
        used = self.tool.overhead()
        self.peak_overhead = max(self.peak_overhead, used)
        return used

    def end(self, rss_growth: int) -> bool:
        """A job ended; if it was a traced call, count it (``rss_growth``: its RSS growth, the
        tool's memory left out) and return True. A job whose traced code never ran (refused,
        failed before its body) is not a traced call."""
        if not self.in_call:
            return False
        self.in_call = False
        if not self._opened:
            return False
        self.close()
        taken, self._taken = self._taken, None
        left = self.tool.left(taken)
        self.calls += 1
        self.rss_growth += rss_growth
        for key, (size, blocks) in left.items():
            entry = self.left.get(key)
            if entry is None:
                entry = self.left[key] = Left()
            entry.size += size
            entry.blocks += blocks
            entry.grew += size > 0
            self.traced_growth += size
        if len(self.left) > KEPT_TRACEBACKS:  # keep the largest: a site is what keeps most
            ranked = sorted(self.left.items(), key=lambda item: item[1].size, reverse=True)
            self.left = dict(ranked[: KEPT_TRACEBACKS // 2])
        if self.calls >= self.request.calls:
            self.finish("done")
        elif self.wall() > self.request.until:
            self.finish("expired")
        return True

    def finish(self, reason: str) -> None:
        """Stop tracing (at most once) and free the tool's memory; the figures stay."""
        if self.finished:
            return
        self.reason = reason
        self.in_call = False
        if self.started:
            self.peak_overhead = max(self.peak_overhead, self.tool.overhead())
            self.tool.stop()

    def sites(self, top: int = TOP_SITES) -> list[Site]:
        """The sites that kept the most, largest first: tracebacks grouped by their innermost
        frame in the user's code (else their innermost frame). A site under ``MIN_SHARE`` of
        the growth is left out: Celery's own few hundred bytes a call beside a native leak are
        not where its memory went."""
        grouped: dict[tuple[str, int], list[tuple[Key, Left]]] = {}
        for key, entry in self.left.items():
            if key:
                frame = next((f for f in key if self.tool.user(f)), key[0])
                grouped.setdefault((frame[0], frame[1]), []).append((key, entry))
        found = []
        for entries in grouped.values():
            size = sum(entry.size for _, entry in entries)
            if size <= 0:
                continue
            best = max(entries, key=lambda item: item[1].size)[0]
            frame = next((f for f in best if self.tool.user(f)), best[0])
            inner = best[best.index(frame):]
            shown = [f for f in inner if self.tool.user(f)] or list(best)
            found.append(Site(frame=frame, code=_code(frame), frames=tuple(shown[:SHOWN_FRAMES]),
                              size=size, blocks=sum(entry.blocks for _, entry in entries),
                              grew=max(entry.grew for _, entry in entries)))
        found.sort(key=lambda s: s.size, reverse=True)
        floor = MIN_SHARE * max(self.rss_growth, self.traced_growth, 0)
        return [site for site in found if site.size >= floor][:top]

    def report(self, pid: int, ppid: int, index: int) -> list[messages.Message]:
        """The trace so far as messages: its sites, then its figures."""
        sites = self.sites()
        out: list[messages.Message] = [
            messages.LeakSite(pid=pid, ppid=ppid, index=index, trace=self.request.id, rank=rank,
                              filename=_text(s.frame[0], left=True), lineno=s.frame[1],
                              function=_text(s.frame[2]), code=_text(s.code),
                              frames=tuple((_text(f[0], left=True), f[1], _text(f[2]))
                                           for f in s.frames),
                              size=s.size, blocks=s.blocks, grew=s.grew)
            for rank, s in enumerate(sites)]
        out.append(messages.LeakTrace(
            pid=pid, ppid=ppid, index=index, trace=self.request.id,
            task=messages.clean_name(self.request.task), tool=self.tool.name, calls=self.calls,
            wanted=self.request.calls, rss_growth=self.rss_growth,
            traced_growth=self.traced_growth, sites=len(sites),
            tracer_bytes=self.peak_overhead, done=self.finished, reason=self.reason))
        return out


def _code(frame: Frame) -> str:
    """The source line of a frame, or its function where the source cannot be read."""
    line = linecache.getline(frame[0], frame[1]).strip() if frame[0] else ""
    return line or (f"{frame[2]}()" if frame[2] else "")


def _text(value: str, left: bool = False) -> str:
    """A string as a message may carry it: printable, and cut to fit (a path keeps its end)."""
    clean = "".join(ch for ch in value if ch.isprintable())
    if len(clean) <= messages.MAX_NAME:
        return clean
    return "…" + clean[-(messages.MAX_NAME - 1):] if left else clean[: messages.MAX_NAME - 1] + "…"


def make_tool(request: forensics.Request) -> Tool:
    """The tool a request names; memray is imported only here, and only when named."""
    if request.tool == "memray":
        from celery_memguard.agent.forensics_memray import MemrayTool  # noqa: PLC0415 - optional extra

        return MemrayTool(request.frames)
    return TracemallocTool(request.frames)
