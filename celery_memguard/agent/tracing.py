"""A pool child's side of trace requests: the signal, the request file, the tracer's life.

The daemon writes a request (protocol.forensics) and sends ``TRACE_SIGNAL``, whose handler only
sets ``due``. Before the child's next job the request is read: if it names this child, a Tracer
(forensics.py) follows that job and the next ones; if it names none (withdrawn, or another
child's), a trace running here stops. After each traced call the trace so far is sent, so that
a child killed before its last call has told the daemon what it had; a child that leaves
sends its last report before its exit. Nothing here raises into the worker: a tracer that
fails stops and says why. With no request, a job costs one attribute test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery_memguard.agent.forensics import Tracer, make_tool
from celery_memguard.errors import MemoryLimitExceeded
from celery_memguard.protocol import forensics, messages, paths


class BodyWatch:
    """Marks where the task's body starts and returns, so that a traced call is the task's own
    code and not Celery's around it (its request, its result backend: about 250 blocks and
    5-20 ms a no-op call under tracemalloc, measured here). A trace function of this thread
    looks at each new frame until the body's starts (one comparison a call), then at that
    frame's return only; it is removed at the return, or at the job's end."""

    def __init__(self, tracer: Tracer, code: CodeType) -> None:
        self.tracer, self.code = tracer, code
        self.started = False
        self.error: Exception | None = None

    def calls(self, frame: FrameType, event: str, arg: object) -> Any:
        if self.started or frame.f_code is not self.code:
            return None
        self.started = True
        frame.f_trace_lines = False
        try:
            self.tracer.open()
        except Exception as exc:  # noqa: BLE001 - never into the task; said at the job's end
            self.error = exc
        return self.returns

    def returns(self, frame: FrameType, event: str, arg: object) -> Any:
        if event != "return":
            return self.returns
        sys.settrace(None)
        try:
            self.tracer.close()
        except MemoryLimitExceeded:
            raise  # the hard limit's interrupt, which landed here: it belongs to the task
        except Exception as exc:  # noqa: BLE001 - never into the task; said at the job's end
            self.error = exc
        return None

    def remove(self) -> None:
        if sys.gettrace() == self.calls:
            sys.settrace(None)


class Tracing:
    def __init__(self, socket_path: str, worker: tuple[int, int], me: tuple[int, int],
                 send: Callable[[messages.Message], None]) -> None:
        self.path = paths.trace_path(socket_path, worker[0])
        self.worker = worker  # (pid, start ticks) the request must name
        self.me = me  # this child's (pid, start ticks)
        self.send = send
        self.index = 0  # the child's pool slot, for its reports
        self.due = False  # signalled: read the request before the next job
        self.tracer: Tracer | None = None
        self.bytes = 0  # the tracer's own memory, left out of every RSS the child reports
        self.body: BodyWatch | None = None  # the traced call's body, watched

    @property
    def active(self) -> bool:
        return self.due or self.tracer is not None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.due = True

    def begin(self, name: str, body: CodeType | None = None) -> None:
        """Before a job (and before its RSS is read): take up a signalled request, and let
        the tracer see the job begin. A traced call is its body (``body``: its code), or the
        whole job where the body cannot be watched (unknown, the thread traced already by a
        debugger or coverage, or a tool that cannot start inside it: memray)."""
        try:
            if self.due:
                self.due = False
                self._take_request()
            tracer = self.tracer
            if tracer is not None:
                if tracer.begin(name):
                    if body is not None and tracer.tool.in_body and sys.gettrace() is None:
                        self.body = BodyWatch(tracer, body)
                        sys.settrace(self.body.calls)
                    else:
                        tracer.open()
                self.bytes = tracer.overhead()
                if tracer.finished:  # its time was up
                    self._report(tracer)
        except Exception as exc:  # noqa: BLE001 - the agent never raises into the worker
            self._failed(exc)

    def measure(self) -> None:
        """After a job, before its RSS is read: the tracer's memory in it."""
        body, self.body = self.body, None
        if body is not None:
            body.remove()  # the body never returned through it (refused, or not run)
            if body.error is not None:
                self._failed(body.error)
        if self.tracer is not None:
            try:
                self.bytes = self.tracer.overhead()
            except Exception as exc:  # noqa: BLE001 - the agent never raises into the worker
                self._failed(exc)

    def end(self, rss_growth: int) -> None:
        """After a job: what a traced call left, worked out, and the trace so far."""
        tracer = self.tracer
        if tracer is None:
            return
        try:
            if tracer.end(rss_growth) or tracer.finished:
                self._report(tracer)
        except Exception as exc:  # noqa: BLE001 - the agent never raises into the worker
            self._failed(exc)

    def leaving(self) -> list[messages.Message]:
        """The child leaves: the trace stops, and its report goes before the exit."""
        if self.body is not None:
            self.body.remove()
            self.body = None
        tracer, self.tracer, self.bytes = self.tracer, None, 0
        if tracer is None:
            return []
        try:
            tracer.finish("leaving")
            return tracer.report(self.me[0], self.worker[0], self.index)
        except Exception:  # noqa: BLE001 - the agent never raises into the worker
            return []

    def _take_request(self) -> None:
        """The request file names this child (trace), or not (a trace running here stops)."""
        try:
            with open(self.path, "rb") as fh:
                request = forensics.decode(fh.read(65536), self.worker)
        except OSError:
            request = None
        if request is not None and request.child != self.me:
            request = None
        current = self.tracer
        if current is not None and (request is None or request.id != current.request.id):
            current.finish("cancelled")
            self._report(current)
        if request is not None and self.tracer is None:
            try:
                tool = make_tool(request)
            except Exception as exc:  # noqa: BLE001 - memray named, and not installed here
                self.send(messages.LeakTrace(
                    pid=self.me[0], ppid=self.worker[0], index=self.index, trace=request.id,
                    task=messages.clean_name(request.task), tool=request.tool, calls=0,
                    wanted=request.calls, rss_growth=0, traced_growth=0, sites=0,
                    tracer_bytes=0, done=True, reason=_error(exc)))
                return
            self.tracer = Tracer(request, tool)

    def _report(self, tracer: Tracer) -> None:
        if tracer.finished and self.tracer is tracer:
            self.tracer, self.bytes = None, 0
        for message in tracer.report(self.me[0], self.worker[0], self.index):
            self.send(message)

    def _failed(self, exc: Exception) -> None:
        if self.body is not None:
            self.body.remove()
            self.body = None
        tracer, self.tracer, self.bytes = self.tracer, None, 0
        if tracer is None:
            return
        try:
            tracer.finish(_error(exc))
        except Exception:  # noqa: BLE001 - the tool failed again as it stopped
            tracer.reason = f"error: {type(exc).__name__}"
        try:
            for message in tracer.report(self.me[0], self.worker[0], self.index):
                self.send(message)
        except Exception:  # noqa: BLE001 - the agent never raises into the worker
            return


def _error(exc: Exception) -> str:
    return "".join(ch for ch in f"error: {type(exc).__name__}: {exc}"
                   if ch.isprintable())[: messages.MAX_NAME]
