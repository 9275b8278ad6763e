"""Carries decisions out: verify the target against the live process table, then act.

The only place that turns a Decision into an effect. Every recycle is re-checked right before
its signal (same pid, same start time, same parent, which is the worker's main process), so a
pid reused since the sample is never touched; holds and dry runs are logged and counted.
"""

from __future__ import annotations

import signal
from typing import Any

from celery_memguard.daemon.decision import Decision, Reason
from celery_memguard.daemon.procs import Procs
from celery_memguard.daemon.readings import ProcId
from celery_memguard.daemon.state import State


class Actor:
    def __init__(self, procs: Procs, state: State, log: Any, dry_run: bool) -> None:
        self.procs = procs
        self.state = state
        self.log = log
        self.dry_run = dry_run
        self._last_hold: dict[int, str] = {}  # pid -> hold reason last logged

    def carry_out(self, decisions: list[Decision], now: float) -> None:
        for decision in decisions:
            if decision.hold is not None:
                self._hold(decision)
            else:
                self._recycle(decision, now)

    def _hold(self, d: Decision) -> None:
        if self._last_hold.get(d.proc.pid) == d.hold:
            return
        assert d.hold is not None
        self._last_hold[d.proc.pid] = d.hold
        if len(self._last_hold) > 4096:
            self._last_hold.clear()
        self.log.info("recycle_held", worker=d.worker, index=d.index, pid=d.proc.pid,
                      reason=d.reason.value, held_by=d.hold.value, measured_bytes=d.measured,
                      threshold_bytes=d.threshold)

    def _restart_worker(self, d: Decision, now: float) -> None:
        """Warm (SIGTERM) or cold (SIGQUIT) shutdown of a whole worker, verified first."""
        assert d.signal is not None
        kind = "warm" if d.signal == signal.SIGTERM else "cold"
        fields = {"worker": d.worker, "pid": d.proc.pid, "reason": d.reason.value,
                  "shutdown": kind, "measured_bytes": d.measured, "threshold_bytes": d.threshold}
        live = self.procs.stat(d.proc.pid)
        if live is None or live.proc != d.proc:
            self.log.warning("worker_restart_dropped", why="not_the_verified_worker", **fields)
            return
        if self.dry_run:
            self.state.worker_signalled(d.proc.pid, d.signal, now)
            self.state.dry_run_recycles[(d.worker, f"worker_{d.reason.value}")] += 1
            self.log.info("worker_restart_would_request", dry_run=True, **fields)
            return
        try:
            delivered = self.procs.send_signal(d.proc.pid, d.signal)
        except PermissionError:
            self.log.error("worker_restart_failed", why="permission_denied", **fields)
            return
        if delivered:
            self.state.worker_signalled(d.proc.pid, d.signal, now)
            self.state.restarts[(d.worker, d.reason.value)] += 1
            self.log.warning("worker_restart_requested", **fields)

    def _recycle(self, d: Decision, now: float) -> None:
        if d.whole:
            self._restart_worker(d, now)
            return
        fields: dict[str, Any] = {"worker": d.worker, "index": d.index, "pid": d.proc.pid,
                                  "reason": d.reason.value, "measured_bytes": d.measured,
                                  "threshold_bytes": d.threshold}
        if d.interrupt:
            fields["interrupt"] = True  # the running task is interrupted, then the child leaves
        live = self.procs.stat(d.proc.pid)
        if live is None or live.proc != d.proc or live.ppid != d.ppid or d.ppid != d.worker_pid:
            self.log.warning("recycle_dropped", why="not_a_verified_pool_child", **fields)
            return
        if d.reason is Reason.KILL:
            self._kill(d, now, fields)
            return
        if self.dry_run:
            self.state.noted(d.worker, d.proc.pid, now)
            self.state.dry_run_recycles[(d.worker, d.reason.value)] += 1
            self.log.info("recycle_would_request", dry_run=True, **fields)
            return
        assert d.signal is not None
        try:
            delivered = self.procs.send_signal(d.proc.pid, d.signal)
        except PermissionError:
            self.state.noted(d.worker, d.proc.pid, now)  # said once per child, not every tick
            self.log.error("recycle_failed", why="permission_denied", **fields)
            return
        if not delivered:
            self.log.info("recycle_dropped", why="process_gone", **fields)
            return
        self.state.requested(d.worker, d.proc.pid, now)
        self.state.recycles[(d.worker, d.reason.value)] += 1
        self._last_hold.pop(d.proc.pid, None)
        self.log.info("recycle_requested", by="daemon", **fields)

    def _kill(self, d: Decision, now: float, fields: dict[str, Any]) -> None:
        assert d.signal is not None
        name = signal.Signals(d.signal).name
        if self.dry_run:
            if d.signal == signal.SIGTERM:
                self.state.dry_run_recycles[(d.worker, d.reason.value)] += 1
            self.state.signalled(d.worker, d.proc.pid, d.signal, now)
            self.log.warning("kill_would_send", dry_run=True, signal=name, **fields)
            return
        try:
            delivered = self.procs.send_signal(d.proc.pid, d.signal)
        except PermissionError:
            self.log.error("kill_failed", why="permission_denied", signal=name, **fields)
            return
        self.state.signalled(d.worker, d.proc.pid, d.signal, now)
        if not delivered:
            return
        task = task_id = None
        if d.signal == signal.SIGTERM:
            self.state.recycles[(d.worker, d.reason.value)] += 1
            task, task_id = self.state.task_killed(d.worker, d.proc.pid)
        self.log.warning("kill_sent", signal=name, task=task, task_id=task_id, **fields)

    def ask_to_trace(self, worker: str, proc: ProcId, worker_pid: int, signum: int) -> bool:
        """Signal a verified pool child of ``worker_pid`` to read its trace request (leak
        forensics: not a recycle, so a dry run sends it too); True when delivered."""
        fields = {"worker": worker, "pid": proc.pid}
        live = self.procs.stat(proc.pid)
        if live is None or live.proc != proc or live.ppid != worker_pid:
            self.log.warning("trace_request_dropped", why="not_a_verified_pool_child", **fields)
            return False
        try:
            return self.procs.send_signal(proc.pid, signum)
        except PermissionError:
            self.log.error("trace_request_failed", why="permission_denied", **fields)
            return False
