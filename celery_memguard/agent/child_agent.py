"""A pool child's side of the agent: task bookkeeping, batched reports, and leaving safely.

No Celery import: pool_child.py creates one ChildAgent per pool child and wires it into billiard's
own loop, ``wait_for_job`` (a job begins) and ``prepare_result`` (it ended). One job is one
task: unlike Celery's task_prerun/task_postrun, a task that runs another in-process with
``apply()`` is not counted twice, and its watch is not disarmed by the inner task's end.

Reports cost the child almost nothing per task: the end of a task (its RSS before and after)
is appended to a batch that is sent every ``FLUSH_SECONDS`` or when it fills, and a task is
announced only once it has run ``ANNOUNCE_AFTER`` (from the watch thread, which polls while
tasks run). Two messages per task, and the daemon woken for each, cost more CPU than the
no-op tasks they described.

A task that leaves the child past its own soft threshold (the daemon's exact figure: the same
limit and jitter, from the published settings) is sent at once. Where the daemon has granted it
in advance (protocol.grants), the child leaves right after that task on its own; otherwise it rings
the daemon, which decides and signals. Before that, a child near its threshold leaves before
reading the next job when what the tasks it runs likely leave behind would take it across.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery_memguard.agent.batch import FLUSH_SECONDS, Batch
from celery_memguard.agent.headroom import Headroom
from celery_memguard.agent.procfs import StatmReader, start_ticks
from celery_memguard.agent.quarantine import raise_in_body
from celery_memguard.agent.sender import Sender
from celery_memguard.agent.tracing import Tracing
from celery_memguard.agent.watch import Watch
from celery_memguard.errors import MemoryLimitExceeded
from celery_memguard.protocol import grants, hooks, messages, paths, rules, settings
from celery_memguard.protocol.signals import EX_RECYCLE, TRACE_SIGNAL

CHILD_HELLO_SECONDS = 5.0
ANNOUNCE_AFTER = 0.25  # a task running this long is announced (TaskRunning): a tick sees it
RETAKE_SECONDS = 0.1  # a child over its threshold but held tries its grant at most this often
LEFT_RUNS = 32  # runs per task name whose growth a child remembers
MIN_RUNS = 5  # runs of a name before its growth predicts anything
MAX_NAMES = 256
LEAVE_LOCK_SECONDS = 0.5  # leaving never waits longer than this for the report lock


class ChildAgent:
    """Per pool child: its slot, task count, batch of reports, the recycle flag, its watch."""

    def __init__(self, index: int, socket_path: str, node: str = "",
                 max_tasks: int | None = None, pool: int = 0,
                 missing: tuple[str, ...] = ()) -> None:
        self.node = node  # the worker's nodename: per-worker limits in the settings
        self.pool = pool  # the pool size the jitter is computed for (0: unknown)
        self.missing = missing  # hooks the agent could not join (protocol.hooks)
        self.can_leave = not hooks.BLOCK_RECYCLE.intersection(missing)  # between two tasks
        self.socket_path = socket_path
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.index = index
        self.max_tasks = max_tasks  # --max-tasks-per-child, as billiard applies it to this child
        self.born = time.monotonic()
        self.sender = Sender(socket_path)
        self.tasks = 0
        self.recycle_requested = False
        self.exit_reason = "requested"
        self.waiting = False  # blocked in billiard's read of the next job
        self.running = False  # a job runs now (read by wait_for_job, not yet at prepare_result)
        self.announced = False  # the running task was announced
        self.rss_before = 0
        self.last_rss = 0  # what the last task left: the next read's look ahead needs no read
        self.task_name = ""
        self.task_id = ""
        self.task_started = 0.0
        self.statm = StatmReader()
        self.last_hello = 0.0
        self.watch = Watch(self.statm.rss, self.on_hard_limit, self.on_poll, self.on_park)
        self.start_ticks = start_ticks(self.pid)
        self.worker = (self.ppid, start_ticks(self.ppid))  # the identity its grants are for
        self.grant_path = paths.grant_path(socket_path, self.ppid)
        self.growth: deque[int] = deque(maxlen=8)  # RSS each recent task left behind
        self.left: dict[str, deque[int]] = {}  # per task name: what its recent runs left behind
        self.most_left = 0  # the most any run here left behind: is a name's quantile worth it?
        self._likely: int | None = None  # likely_left(), until the next task ends
        self.rang: set[str] = set()  # reasons the daemon was rung for already
        self.retake_at = 0.0
        self._settings_mtime = 0.0
        self._batch = Batch()
        self.headroom = Headroom(paths.room_path(socket_path, self.ppid), self.worker, pool)
        self.container_hit: tuple[int, int] | None = None  # (working set, line) of an interrupt
        self.maxrss_before = 0  # ru_maxrss when the task began (KiB)
        self._untrace: Callable[[], None] | None = None  # a refused task's trace, until it fires
        self.tracing = Tracing(socket_path, self.worker, (self.pid, self.start_ticks), self._send)
        self.tracing.index = index
        self._lock = threading.Lock()  # the batch and the connection: main and watch threads
        # from the published settings
        self.soft_threshold = 0  # this process's own: the soft limit lowered by its jitter
        self.hard = 0
        self.measure = "rss"
        self.ahead = 0  # predictive recycling's look-ahead in tasks (0: off)
        self.dry_run = False
        self.min_lifetime = 0.0
        self.skip_within_tasks = 0

    # -- settings and hellos ----------------------------------------------------------------

    def hello(self) -> None:
        self.last_hello = time.monotonic()
        self.load_settings()
        self._send(messages.ChildHello(pid=self.pid, ppid=self.ppid, index=self.index,
                                       tasks=self.tasks, rss=self.statm.rss(),
                                       node=self.node[: messages.MAX_NAME], jitter_pool=self.pool,
                                       missing=self.missing[: messages.MAX_HOOKS]))

    def load_settings(self) -> None:
        """Pick up the limits and rules the daemon publishes beside its socket, when changed."""
        path = paths.settings_path(self.socket_path)
        try:
            mtime = os.stat(path).st_mtime
            if mtime == self._settings_mtime:
                return
            with open(path, "rb") as fh:
                published = settings.decode(fh.read(65536))
        except OSError:
            return
        if published is None:
            return
        self._settings_mtime = mtime
        limits = published.for_worker(self.node)
        self.hard, self.measure = limits.hard, limits.measure
        self.ahead, self.dry_run = published.ahead, published.dry_run
        self.min_lifetime, self.skip_within_tasks = published.min_lifetime, published.skip_within_tasks
        self.watch.configure(limits.hard, published.watch_interval)
        # A dry run acts on nothing: a child does not wait either.
        self.headroom.configure(limits.container_soft,
                                0.0 if published.dry_run else published.container_hold)
        self.soft_threshold = (rules.child_threshold(limits.soft, published.jitter,
                                                     published.max_share, self.pool, self.pid,
                                                     self.start_ticks)
                               if limits.soft and self.start_ticks else 0)

    # -- tasks (main thread) ----------------------------------------------------------------

    def begin(self, name: str, task_id: str, run_code: CodeType | None,
              refused: str | None = None) -> None:
        """A job begins. ``refused``: why the main process found its task id quarantined."""
        if self.tracing.active:  # leak forensics (tracing.py)
            self.tracing.begin(name, run_code)
        self.rss_before = self.statm.rss() - self.tracing.bytes
        self.task_name, self.task_id = name, task_id
        self.task_started = time.monotonic()
        if self.headroom.line:  # the watch may miss a peak between two reads; this cannot
            self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.announced = False
        self.running = True
        self.watch.task_started(run_code)
        if refused is not None and run_code is not None:
            self._refuse(refused, run_code)

    def _refuse(self, detail: str, run_code: CodeType) -> None:
        """A quarantined task id: it fails as its body starts, and the daemon hears of it."""
        self._untrace = raise_in_body(run_code, MemoryLimitExceeded(0, 0, "quarantined", detail))
        self._send(messages.TaskInterrupted(pid=self.pid, ppid=self.ppid, index=self.index,
                                            task=self.task_name, id=self.task_id,
                                            rss=self.rss_before, limit=0, reason="quarantined"))

    def end(self, ok: bool) -> None:
        self.watch.task_ended()
        if self._untrace is not None:
            self._untrace()
            self._untrace = None
        if self.container_hit is not None:
            used, line = self.container_hit
            self.container_hit = None
            self._send(messages.TaskInterrupted(
                pid=self.pid, ppid=self.ppid, index=self.index, task=self.task_name,
                id=self.task_id, rss=used, limit=line, reason="container"))
        if self.tracing.active:
            self.tracing.measure()
        rss = self.last_rss = self.statm.rss() - self.tracing.bytes
        self.growth.append(rss - self.rss_before)
        self._left(self.task_name, rss - self.rss_before)
        now = time.monotonic()
        with self._lock:  # the watch thread announces under it: never with a half-ended task
            if self.headroom.line:
                self.headroom.learn(self.task_name, self._peak(rss) - self.rss_before)
            self.running = False
            self.tasks += 1
            self._batch.add(self.tasks, self.task_name, self.rss_before, rss, ok, now)
            verdict = None if self.recycle_requested else self.verdict(rss, now)
            if verdict == "ring" or (verdict is None and self._batch.due(now)):
                self._flush(now)
            if verdict == "ring":
                self.sender.ring()
            # "self": leave() follows at once and sends the batch after the exit, so that the
            # daemon knows the child is leaving before it reads the report that crossed.
        if self.tracing.tracer is not None:
            self.tracing.end(rss - self.rss_before)

    def _peak(self, rss: int) -> int:
        """The most this task held as far as known: the watch's reads, the end, and the
        process's lifetime peak when this task raised it (ru_maxrss, KiB on Linux)."""
        peak = max(rss, self.watch.peak)
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if maxrss > self.maxrss_before:
            peak = max(peak, maxrss * 1024)
        return peak

    def _left(self, name: str, grew: int) -> None:
        """What a run of ``name`` left behind. A name's first run in this child is its
        warm-up (imports, caches, connections: memory it keeps once, not per call) and does
        not count towards what the next run is likely to leave."""
        self.most_left = max(self.most_left, grew)
        self._likely = None
        runs = self.left.get(name)
        if runs is None:
            if len(self.left) < MAX_NAMES:
                self.left[name] = deque(maxlen=LEFT_RUNS)
            return
        runs.append(max(grew, 0))

    def likely_left(self) -> int:
        """What the next task, whichever it is, is likely to leave behind: the largest 90th
        percentile (nearest rank) over the names that ran ``MIN_RUNS`` times here after
        their first run. Not the
        mean: a task that keeps memory one call in ten still crosses. Names with fewer runs
        predict nothing; memory a task frees before it returns leaves nothing, so spikes
        never count. Kept until the next task ends."""
        if self._likely is None:
            self._likely = max((sorted(runs)[-(-9 * len(runs) // 10) - 1]
                                for runs in self.left.values() if len(runs) >= MIN_RUNS),
                               default=0)
        return self._likely

    def would_cross(self, rss: int) -> bool:
        """Whether the next task would likely take this child past its soft threshold."""
        threshold = self.soft_threshold
        if threshold <= 0 or rss + self.most_left < threshold:
            return False  # far from it whatever the task: the common case, no sorting
        likely = self.likely_left()
        return likely > 0 and rss + likely >= threshold

    def leave_before(self, rss: int) -> bool:
        """Leave before reading the next job, when the task it brings would likely take this
        child past its soft threshold and a unit of the grant is there. Before the read, not
        after it: nothing is read yet, so nothing is handed back (a child that exits between
        billiard's read of a job and its acknowledgement leaves the prefork pool to recover a
        half-delivered job, which can stall it). False: read and run it (its end decides)."""
        now = time.monotonic()
        if (self.measure != "rss" or self.dry_run or not self.would_cross(rss)
                or rules.max_tasks_soon(self.tasks, self.max_tasks, self.skip_within_tasks)
                or rules.too_young(now - self.born, self.min_lifetime, rss, self.hard)):
            return False
        if not grants.take(self.grant_path, self.pid, self.worker, "soft"):
            return False  # no unit: the task runs, and its end rings the daemon as usual
        self.recycle_requested = True
        self.exit_reason = "soft"
        return True

    def verdict(self, rss: int, now: float) -> str | None:
        """What a task that left ``rss`` calls for: None (nothing), "self" (this child took a
        grant and leaves after the task), "ring" (the daemon must decide: no grant left, a
        dry run, a measure the child does not read, or a hold the daemon should log).

        The rules are the policy's (rules.py). A child held here tries again at most every
        ``RETAKE_SECONDS``, and rings once per reason: later reports reach the daemon with the
        batches, and its tick looks at held children again.
        """
        threshold = self.soft_threshold
        if threshold <= 0 or not self.can_leave:
            return None
        if rss >= threshold:
            reason = "soft"
        elif self.ahead and rules.predicts_crossing(rss, rules.growth_per_task(self.growth),
                                                    self.ahead, threshold):
            reason = "predicted"
        else:
            return None
        if now < self.retake_at:
            return None
        self.retake_at = now + RETAKE_SECONDS
        if (self.measure == "rss" and not self.dry_run
                and not rules.max_tasks_soon(self.tasks, self.max_tasks, self.skip_within_tasks)
                and not rules.too_young(now - self.born, self.min_lifetime, rss, self.hard)
                and grants.take(self.grant_path, self.pid, self.worker, reason)):
            self.recycle_requested = True
            self.exit_reason = reason
            return "self"
        if reason in self.rang:
            return None
        self.rang.add(reason)
        return "ring"

    # -- the watch thread -------------------------------------------------------------------

    def on_poll(self) -> None:
        """Announce a task that has run ``ANNOUNCE_AFTER``; send the batch of an idle child."""
        now = time.monotonic()
        if self.running:
            rose = self.watch.peak - self.rss_before
            if self.headroom.line and rose > 0 and self.headroom.news(self.task_name, rose):
                with self._lock:  # the task may end meanwhile: then end() learns it
                    if self.running:
                        self.headroom.learn(self.task_name, rose, ended=False)
            if self.announced or now - self.task_started < ANNOUNCE_AFTER:
                return
            with self._lock:
                if not self.running or self.announced:
                    return  # it ended meanwhile: its end is in the batch, no announcement
                self.announced = True
                self._flush(now)  # what came before it goes first
                self.sender.send(messages.TaskRunning(
                    pid=self.pid, ppid=self.ppid, index=self.index, task=self.task_name,
                    id=self.task_id, rss=self.statm.rss(), tasks=self.tasks))
        elif self._batch.ends and now - self._batch.opened >= FLUSH_SECONDS:
            self.on_park()

    def on_park(self) -> None:
        """The watch thread goes quiet (or an idle batch is due): send what is waiting. Not
        for a child on its way out, whose exit must reach the daemon before its last report."""
        with self._lock:
            if not self.recycle_requested:
                self._flush(time.monotonic())

    def on_hard_limit(self, rss: int, limit: int) -> None:
        """Called by the watch thread: report the task, and leave after it in any case (as the
        hard case, unless the task's end took a grant meanwhile: one recycle, counted once)."""
        self.recycle_requested = True
        if self.exit_reason == "requested":
            self.exit_reason = "hard"
        self._send(messages.TaskInterrupted(pid=self.pid, ppid=self.ppid, index=self.index,
                                        task=self.task_name, id=self.task_id, rss=rss,
                                        limit=limit))

    def install_forensics(self) -> None:
        """The daemon's trace request signal (tracing.py): it only sets a flag."""
        signal.signal(TRACE_SIGNAL, self.tracing.on_signal)

    # -- leaving ----------------------------------------------------------------------------

    def on_container_signal(self, signum: int, frame: FrameType | None) -> None:
        """The daemon: the container is past its hard line and this child's task grows most.
        The task is interrupted where its own code runs, and the child leaves after it (at
        once when idle, as for a recycle request)."""
        self.on_recycle_signal(signum, frame)
        if self.running and self.watch.in_task_body(frame):
            reading = self.headroom.reading()
            self.container_hit = reading
            raise MemoryLimitExceeded(reading[0], reading[1], "container",
                                      f"(its process grew {self.statm.rss() - self.rss_before} "
                                      f"bytes in this task)")

    def on_recycle_signal(self, signum: int, frame: FrameType | None) -> None:
        self.recycle_requested = True
        if self.waiting:
            # Idle, blocked reading the next job: nothing has been acknowledged to the parent,
            # which puts back a job written to a child that exits before its ACK.
            self.waiting = False
            self.leave()

    def leave(self) -> None:
        """Say so and exit through billiard's recycle path. The exit goes before the last task
        ends (the daemon must not decide on a report of a child that is leaving), and the
        daemon is rung: one fewer child on its way out may free a unit for the next one."""
        locked = self._lock.acquire(timeout=LEAVE_LOCK_SECONDS)
        try:
            for report in self.tracing.leaving():  # what a trace had: the daemon keeps it
                self.sender.send(report)
            self.sender.send(messages.ChildExit(pid=self.pid, ppid=self.ppid, index=self.index,
                                            tasks=self.tasks, reason=self.exit_reason))
            self._flush(time.monotonic())
            self.sender.ring()
        finally:
            if locked:
                self._lock.release()
        sys.exit(EX_RECYCLE)  # billiard's own sys.exit wrapper records the exit code

    def wrap_wait_for_job(self, original: Callable[..., Any],
                          describe: Callable[[Any], tuple[str, str, CodeType | None]],
                          refusal: Callable[[Any], str | None] = lambda job: None,
                          ) -> Callable[..., Any]:
        """billiard's read of the next job, wrapped: where a child leaves, and where a task
        begins. ``describe`` names the job (task name, task id, the body's code object).

        A job that returned ends at ``wrap_prepare_result``; one that raised out of billiard's
        call (it reports the exception itself) ends here, at the next read.
        """
        def wait_for_job(*args: Any, **kwargs: Any) -> Any:
            if self.running:
                self._end_quietly(False)
            if self.recycle_requested or self._leave_before_next():
                self.leave()
            if time.monotonic() - self.last_hello > CHILD_HELLO_SECONDS:
                try:
                    self.hello()
                except Exception:  # noqa: BLE001 - the agent never raises into the worker
                    self.last_hello = time.monotonic()
            self.waiting = True
            try:
                if self.recycle_requested:  # the signal came between the check and now
                    self.waiting = False
                    self.leave()
                job = original(*args, **kwargs)
            finally:
                self.waiting = False
            if job:
                try:
                    name, task_id, run_code = describe(job)
                    refused = refusal(job)
                    if refused is None:
                        self._hold(name, task_id)
                    self.begin(name, task_id, run_code, refused)
                except Exception:  # noqa: BLE001 - the agent never raises into the worker
                    self.running = False
            return job

        return wait_for_job

    def _leave_before_next(self) -> bool:
        """At the read of the next job, by the RSS the last task left (nothing ran since)."""
        try:
            return self.leave_before(self.last_rss)
        except Exception:  # noqa: BLE001 - the agent never raises into the worker
            return False

    def _hold(self, name: str, task_id: str) -> bool:
        """Wait for the container to have room before the task starts (headroom.py). Asked to
        leave meanwhile, the child leaves at once: the job is not acknowledged yet, and the pool
        gives it to another child."""
        self.waiting = True
        try:
            if self.recycle_requested:
                self.waiting = False
                self.leave()
            held = self.headroom.hold(name, self.statm.rss())
        finally:
            self.waiting = False
        if held is None:
            return False
        self._send(messages.TaskHeld(
            pid=self.pid, ppid=self.ppid, index=self.index, task=name, id=task_id,
            waited_ms=int(held.seconds * 1000), working_set=held.working_set,
            line=held.line, gave_up=held.gave_up))
        return True

    def wrap_prepare_result(self, original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """billiard's hook on a job's return value: the task has ended, its result not yet
        handed to the parent. Celery's trace functions return ``(failed, result, runtime)``."""
        def prepare_result(result: Any) -> Any:
            if self.running:
                failed = isinstance(result, tuple) and bool(result) and result[0] == 1
                self._end_quietly(not failed)
            return original(result)

        return prepare_result

    def _end_quietly(self, ok: bool) -> None:
        try:
            self.end(ok)
        except Exception:  # noqa: BLE001 - the agent never raises into the worker
            self.running = False

    # -- sending ----------------------------------------------------------------------------

    def _send(self, message: messages.Message) -> None:
        with self._lock:
            self._flush(time.monotonic())  # in order: the batch holds earlier events
            self.sender.send(message)

    def _flush(self, now: float) -> None:
        """Send the batch; the caller holds the lock. With no daemon to send it to (no
        connection, and none to try yet) it is dropped as it stands, unbuilt: building and
        encoding a 112-entry batch costs about 0.6 µs a task."""
        if self._batch.ends:
            if self.sender.can_send():
                self.sender.send(self._batch.take(self.pid, self.ppid, self.index, now))
            else:
                self._batch.clear()
