"""The daemon's main loop: wait, handle what arrived, tick, publish.

One thread owns the supervisor. It waits on the agent socket, the bell, and a wake-up pipe
(signals, ``stop()``) until the next tick; signal handlers only enqueue, and the loop
dispatches them. Binding the socket and the HTTP port, and cleaning up after them, are here
too; what is decided is the supervisor's (supervisor.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from celery_memguard.daemon.config import Config, ConfigError, split_listen
from celery_memguard.daemon.http import HttpServer
from celery_memguard.daemon.inbox import Inbox, raise_fd_limit
from celery_memguard.daemon.pressure import StallTriggers
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.status import status_document
from celery_memguard.daemon.supervisor import Supervisor

DRAIN_BATCH = 512  # datagrams read before the loop looks at its clock again
BATCH_GAP = 0.05  # seconds routine reports wait to be read together; the bell cuts it short


class ListenError(Exception):
    """The metrics address cannot be bound; the message says what to do."""


class Daemon:
    def __init__(
        self,
        config: Config,
        procs: Procs | None = None,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
        reload: Callable[[], Config] | None = None,
        batch_gap: float = BATCH_GAP,
    ) -> None:
        self.log = log if log is not None else structlog.get_logger("celery_memguard")
        self.supervisor = Supervisor(config, procs if procs is not None else Procs(), clock,
                                     self.log)
        self.clock = clock
        self._reload = reload
        self.batch_gap = batch_gap
        self.stopping = threading.Event()
        self.signals: deque[int] = deque()
        self.inbox: Inbox | None = None
        self.http: HttpServer | None = None
        self.triggers = StallTriggers()  # memory stalls wake the loop between ticks
        self._wake_r, self._wake_w = -1, -1

    @property
    def config(self) -> Config:
        return self.supervisor.config

    # -- life cycle ----------------------------------------------------------------------------

    def run(self, ready: Callable[[Daemon], None] | None = None) -> int:
        """Bind, serve and loop until SIGTERM/SIGINT or ``stop()``; returns an exit code."""
        supervisor = self.supervisor
        inbox = Inbox(self.config.agent.socket)
        inbox.open()
        self.inbox = inbox
        supervisor.connections = lambda: inbox.connections
        supervisor.stall_triggers = self.triggers.status
        raise_fd_limit()
        supervisor.publisher.remove_grants()  # a previous daemon's: each is written anew
        supervisor.publisher.settings(self.config)
        supervisor.state.quarantined.update(supervisor.publisher.load_quarantine())
        supervisor.publisher.write_quarantine(supervisor.state.quarantined,
                                              self.config.quarantine.after)  # the after in force
        supervisor.publisher.prune_rooms(supervisor.procs.alive)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            host, port = split_listen(self.config.metrics.listen)
            self.http = HttpServer(host, port, supervisor.metrics, lambda: supervisor.view,
                                   self.healthy, status_document)
        except OSError as exc:
            inbox.close()
            raise ListenError(
                f"cannot listen on {self.config.metrics.listen} for /metrics: {exc.strerror}. "
                f"Is another daemon running? Set metrics.listen to a free address.") from None
        previous = self._install_signal_handlers()
        self.http.start()
        limits = self.config.limits
        self.log.info("daemon_started", socket=str(self.config.agent.socket),
                      listen="{}:{}".format(*self.http.address), soft_bytes=limits.soft,
                      hard_bytes=limits.hard, measure=limits.measure,
                      interval_seconds=self.config.sampling.interval,
                      dry_run=self.config.recycle.dry_run, pid=os.getpid())
        if ready is not None:
            ready(self)
        try:
            self._loop(inbox)
        finally:
            self._restore_signal_handlers(previous)
            self.http.stop()
            inbox.close()
            self.triggers.close()
            supervisor.procs.close()
            supervisor.publisher.remove_all()  # no daemon: children no longer leave on their own
            os.close(self._wake_r)
            os.close(self._wake_w)
            self.log.info("daemon_stopped")
        return 0

    def stop(self) -> None:
        self.stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")

    def healthy(self) -> bool:
        """The loop has ticked lately (what /healthz answers)."""
        interval = self.config.sampling.interval
        return self.clock() - self.supervisor.last_tick < max(5.0, 3 * interval)

    def _loop(self, inbox: Inbox) -> None:
        """Wait; handle what arrived; tick when due (sample, decide and act, publish); look at
        the containers near their hard line when due.

        Waking for every report cost the daemon more CPU than the reports themselves on a
        busy host (each wake-up ran cold, between the worker's processes), and that CPU is
        taken from the workers. After reading, the reports' descriptor is left out of the
        wait for ``batch_gap``; a child whose report calls for a decision rings the bell,
        which is always watched, and everything waiting is read at once.
        """
        supervisor = self.supervisor
        waits = _Waits(inbox, self._wake_r, self.triggers)
        next_tick = next_watch = self.clock()  # next_watch: containers near their hard line
        try:
            while not self.stopping.is_set():
                stalled = []
                for what, pressure_file in waits.wait(min(next_tick, next_watch), self.clock):
                    if pressure_file is not None:
                        stalled.append(pressure_file)
                    elif self._handle(what, inbox):
                        waits.rest(self.clock() + self.batch_gap)  # let the next ones gather
                if stalled:  # the containers they measure are read and decided on at once
                    supervisor.on_stall(stalled, self.clock())
                while self.signals:
                    self._dispatch_signal(self.signals.popleft())
                now = self.clock()
                if now >= next_tick:
                    self._tick(inbox, now)
                    interval = self.config.sampling.interval
                    next_tick += interval
                    if next_tick <= now:  # fell behind: skip, do not burst
                        next_tick = now + interval
                if now >= next_watch:
                    next_watch = supervisor.watch_containers(self.clock())
        finally:
            waits.close()

    def _tick(self, inbox: Inbox, now: float) -> None:
        """Sample every worker, reading the reports that wait between two; decide and act;
        keep a stall trigger on each container's pressure; publish."""
        for _ in self.supervisor.sample(now):
            self._drain(inbox)
        self.supervisor.decide_all(now)
        for path, why in self.triggers.arm(
                self.supervisor.containers.stall_files(self.supervisor.state.workers.values()),
                self.clock()):
            self.log.warning("stall_trigger_unavailable", pressure_file=str(path), why=why,
                             advice="memory pressure is still read every tick; a stall does "
                                    "not wake the daemon sooner")
        self.supervisor.publish(now)

    def _drain(self, inbox: Inbox) -> int:
        """Fold in what the agents sent, up to DRAIN_BATCH datagrams; return how many."""
        read = 0
        for datagram in inbox.drain(DRAIN_BATCH):
            self.supervisor.receive(datagram, self.clock())
            read += 1
        return read

    def _handle(self, what: str, inbox: Inbox) -> bool:
        """One ready descriptor; True when the reports' descriptor should rest a while (some
        were read and none are left: a full batch means more wait, and a new connection alone
        read nothing yet)."""
        if what == "wake":
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
        elif what == "bell":
            inbox.silence()
            self._drain(inbox)
        else:
            read = self._drain(inbox)
            return 0 < read < DRAIN_BATCH and self.batch_gap > 0
        return False

    # -- signals -------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # embedded in a test or the demo: stop() is the way out
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            if signum == -1:
                signal.set_wakeup_fd(handler)
            else:
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def _dispatch_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.log.info("stop_requested", signal=signal.Signals(signum).name)
            self.stopping.set()
        elif signum == signal.SIGHUP:
            self.handle_reload()

    def handle_reload(self) -> None:
        """Re-read the config file; a bad one is refused and the old config stays."""
        if self._reload is None:
            return
        try:
            new = self._reload()
        except ConfigError as exc:
            self.log.error("config_reload_refused", key=exc.key, why=exc.reason)
            return
        old = self.config
        if (new.agent != old.agent or new.log != old.log
                or new.metrics.listen != old.metrics.listen):
            self.log.warning("config_reload_partial",
                             why="agent.socket, metrics.listen and log.* change only on restart")
            new = new.model_copy(update={
                "agent": old.agent, "log": old.log,
                "metrics": new.metrics.model_copy(update={"listen": old.metrics.listen})})
        self.supervisor.reload(new, publish=self.http is not None)


class _Waits:
    """What the loop waits on: the wake-up pipe, the bell, the reports, and each stall
    trigger (for ``EPOLLPRI``). The reports can rest out of the wait for a while so that
    routine ones are read together."""

    def __init__(self, inbox: Inbox, wake: int, triggers: StallTriggers) -> None:
        self.inbox = inbox
        self.triggers = triggers
        self.poll = select.epoll()
        self.names: dict[int, str] = {wake: "wake", inbox.fileno(): "inbox"}
        if inbox.bell is not None:
            self.names[inbox.bell.fileno()] = "bell"
        for fd in self.names:
            self.poll.register(fd, select.EPOLLIN)
        self.resume_at: float | None = None  # the reports are out of the wait until then
        self._stalls: dict[int, tuple[Path, int]] = {}  # the trigger descriptors registered
        self._revision = -1

    def wait(self, until: float, clock: Callable[[], float]) -> list[tuple[str, Path | None]]:
        """What is ready, waiting at most until ``until`` (sooner when the reports' rest
        ends): (name, None), or ("stall", the pressure file) for a trigger that fired."""
        if self.resume_at is not None and clock() >= self.resume_at:
            self.poll.register(self.inbox.fileno(), select.EPOLLIN)
            self.resume_at = None
        if self.resume_at is not None:
            until = min(until, self.resume_at)
        if self._revision != self.triggers.revision:
            self._watch_triggers()
        ready: list[tuple[str, Path | None]] = []
        try:
            events = self.poll.poll(max(0.0, until - clock()))
        except InterruptedError:
            return ready
        for fd, mask in events:
            stall = self._stalls.get(fd)
            if stall is None:
                ready.append((self.names[fd], None))
            elif mask & (select.EPOLLERR | select.EPOLLHUP):
                self.triggers.gone(fd)  # its cgroup went away
            elif mask & select.EPOLLPRI:
                ready.append(("stall", stall[0]))
        return ready

    def _watch_triggers(self) -> None:
        """Poll the triggers armed now. Only the descriptors that changed are registered anew:
        registering one makes the kernel look at it, which clears a stall it had to report
        (closing a descriptor took it out of the poll already)."""
        now = self.triggers.descriptors()
        for fd, (_, serial) in self._stalls.items():
            if now.get(fd, (None, -1))[1] != serial:
                with contextlib.suppress(OSError, ValueError):
                    self.poll.unregister(fd)
        for fd, (_, serial) in now.items():
            if self._stalls.get(fd, (None, -1))[1] != serial:
                self.poll.register(fd, select.EPOLLPRI)
        self._stalls = now
        self._revision = self.triggers.revision

    def rest(self, until: float) -> None:
        """Leave the reports out of the wait until ``until``."""
        if self.resume_at is None:
            self.poll.unregister(self.inbox.fileno())
            self.resume_at = until

    def close(self) -> None:
        self.poll.close()
