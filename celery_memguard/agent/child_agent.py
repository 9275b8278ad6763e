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
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType, FrameType

from celery_memguard.agent.batch import FLUSH_SECONDS, Batch
from celery_memguard.agent.headroom import Headroom
from celery_memguard.agent.left_behind import LeftBehind
from celery_memguard.agent.procfs import StatmReader, start_ticks
from celery_memguard.agent.quarantine import raise_in_body
from celery_memguard.agent.sender import Sender
from celery_memguard.agent.tracing import Tracing
from celery_memguard.agent.watch import Watch
from celery_memguard.errors import MemoryLimitExceeded
from celery_memguard.protocol import grants, hooks, messages, paths, rules, settings
from celery_memguard.protocol.signals import EX_RECYCLE

CHILD_HELLO_SECONDS = 5.0
ANNOUNCE_AFTER = 0.25  # a task running this long is announced (TaskRunning): a tick sees it
RETAKE_SECONDS = 0.1  # a child over its threshold but held tries its grant at most this often
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
        self.left = LeftBehind()  # what its tasks left behind: the leave-before figure
        self.rang: set[str] = set()  # reasons the daemon was rung for already
        self.retake_at = 0.0
        self.waited_for_unit = False  # job_loop's one wait for a unit of the grant
        self._settings_mtime = 0.0
        self._batch = Batch()
        self.headroom = Headroom(paths.room_path(socket_path, self.ppid), self.worker, pool)
        self.container_hit: tuple[int, int] | None = None  # (working set, line) of an interrupt
        self._untrace: Callable[[], None] | None = None  # a refused task's trace, until it fires
        self.tracing = Tracing(socket_path, self.worker, (self.pid, self.start_ticks), self.send)
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
        self.send(messages.ChildHello(pid=self.pid, ppid=self.ppid, index=self.index,
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
        self.headroom.task_began()
        self.announced = False
        self.running = True
        self.watch.task_started(run_code)
        if refused is not None and run_code is not None:
            self._refuse(refused, run_code)

    def _refuse(self, detail: str, run_code: CodeType) -> None:
        """A quarantined task id: it fails as its body starts, and the daemon hears of it."""
        self._untrace = raise_in_body(run_code, MemoryLimitExceeded(0, 0, "quarantined", detail))
        self.send(messages.TaskInterrupted(pid=self.pid, ppid=self.ppid, index=self.index,
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
            self.send(messages.TaskInterrupted(
                pid=self.pid, ppid=self.ppid, index=self.index, task=self.task_name,
                id=self.task_id, rss=used, limit=line, reason="container"))
        if self.tracing.active:
            self.tracing.measure()
        rss = self.last_rss = self.statm.rss() - self.tracing.bytes
        self.left.add(self.task_name, rss - self.rss_before)
        now = time.monotonic()
        with self._lock:  # the watch thread announces under it: never with a half-ended task
            if self.headroom.line:
                self.headroom.learn(self.task_name,
                                    self.headroom.peak(rss, self.watch.peak) - self.rss_before)
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

    def leave_before(self, rss: int) -> bool | None:
        """Leave before reading the next job, when the task it brings would likely take this
        child past its soft threshold and a unit of the grant is there. Before the read, not
        after it: nothing is read yet, so nothing is handed back (a child that exits between
        billiard's read of a job and its acknowledgement leaves the prefork pool to recover a
        half-delivered job, which can stall it). False: read and run it (its end decides);
        None: it would cross, but no unit is there now (job_loop waits a moment for one)."""
        now = time.monotonic()
        if (self.measure != "rss" or self.dry_run
                or not self.left.would_cross(rss, self.soft_threshold)
                or rules.max_tasks_soon(self.tasks, self.max_tasks, self.skip_within_tasks)
                or rules.too_young(now - self.born, self.min_lifetime, rss, self.hard)):
            return False
        if not grants.take(self.grant_path, self.pid, self.worker, "soft"):
            return None
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
        elif self.ahead and rules.predicts_crossing(rss, rules.growth_per_task(self.left.recent),
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
        self.send(messages.TaskInterrupted(pid=self.pid, ppid=self.ppid, index=self.index,
                                           task=self.task_name, id=self.task_id, rss=rss,
                                           limit=limit))

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

    # -- sending ----------------------------------------------------------------------------

    def send(self, message: messages.Message) -> None:
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
