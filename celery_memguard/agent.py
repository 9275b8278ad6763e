"""The in-worker side: Celery signal hooks, reports to the daemon, recycle-after-task.

The only module that imports Celery. It is small on purpose and must never slow or break a
worker: every hook swallows its own errors, sends are non-blocking datagrams that are simply
lost when no daemon listens, and nothing here waits.

How a recycle is carried out: the daemon sends ``RECYCLE_SIGNAL`` (a real-time signal that
neither Celery nor billiard uses) to a verified pool child. The handler only sets a flag. The
child's ``wait_for_job`` - the call billiard's ``Worker.workloop`` makes between two tasks,
after the previous result has been handed to the parent - is wrapped to check the flag and,
when set, to leave with ``sys.exit(EX_RECYCLE)``: the same exit code and the same
``_ensure_messages_consumed`` path that ``--max-tasks-per-child`` takes, so the pool starts a
replacement and no task is lost or run twice. Celery's pool children block in that read with
no timeout, so a child that is idle when the signal comes leaves from the handler itself:
it has acknowledged no job, and the parent puts back a job written to a child that exits
before acknowledging it (celery/concurrency/asynpool.py ``on_job_process_down``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from celery import Celery, signals

from celery_memguard import __version__, wire
from celery_memguard.watch import Watch
from celery_memguard.wire import DEFAULT_SOCKET, SOCKET_ENV

RECYCLE_SIGNAL = wire.RECYCLE_SIGNAL
EX_RECYCLE = 0x9B  # billiard.pool.EX_RECYCLE, repeated to avoid importing billiard internals here
HEARTBEAT_SECONDS = 2.0
CHILD_HELLO_SECONDS = 5.0
SEND_BUFFER = 1 << 20  # bytes a process may have in flight to a busy daemon
VERDICT_WAIT = 0.02  # how long a child past its own soft threshold waits for the daemon's word
_VERSION = __version__

_socket_path: str = DEFAULT_SOCKET
_sender: _Sender | None = None
_child: _ChildAgent | None = None
_installed_apps: set[int] = set()
_restart_worker = False


class _Sender:
    """This process's connection to the daemon; a message that cannot go is only counted.

    Non-blocking throughout: a missing daemon costs one failed connect per second at most,
    a full buffer loses the message, and nothing here ever waits.
    """

    RETRY_MIN, RETRY_MAX = 0.1, 2.0  # seconds between connection attempts, doubling

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.sent = 0
        self.lost = 0
        self._sock: socket.socket | None = None
        self._bell: socket.socket | None = None
        self._next_try = 0.0
        self._retry = self.RETRY_MIN

    def _connect(self) -> socket.socket | None:
        """A restarted daemon is found again within a tenth of a second; a missing one costs a
        failed connect every two seconds at most."""
        now = time.monotonic()
        if now < self._next_try:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # room for a burst while the daemon is busy
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self._next_try = now + self._retry
            self._retry = min(self._retry * 2, self.RETRY_MAX)
            return None
        self._retry = self.RETRY_MIN
        self._sock = sock
        return sock

    def send(self, message: wire.Message) -> None:
        sock = self._sock or self._connect()
        if sock is None:
            self.lost += 1
            return
        try:
            sock.send(wire.encode(message), socket.MSG_NOSIGNAL)  # never a SIGPIPE into a worker
            self.sent += 1
        except BlockingIOError:
            self.lost += 1  # the daemon is behind: drop this one, keep the connection
        except OSError:
            self.lost += 1  # the daemon went away: reconnect (a new one may be up already)
            sock.close()
            self._sock = None

    def ring(self) -> None:
        """Ask the daemon to read now: it reads routine reports in batches."""
        try:
            if self._bell is None:
                self._bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._bell.sendto(b"!", wire.bell_path(self.path))
        except OSError:
            return  # no daemon, or its bell is full: it is awake already

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None


def _send(message: wire.Message, ring: bool = False) -> None:
    """Send a report; ``ring`` when it calls for a decision now (the bell follows the report,
    so the daemon finds the report when it wakes)."""
    global _sender
    try:
        if _sender is None or _sender.pid != os.getpid():
            if _sender is not None:
                _sender.close()  # the parent's connection, inherited across fork: ours to close
            _sender = _Sender(_socket_path)
        _sender.send(message)
        if ring:
            _sender.ring()
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


class _StatmReader:
    """Reads this process's RSS through one open descriptor (pread regenerates the file)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0


class _ChildAgent:
    """Per pool child: its index, task count, the recycle flag, the task in progress, its watch."""

    def __init__(self, index: int, node: str = "") -> None:
        self.node = node  # the worker's nodename: per-worker limits in the settings
        self.pid = os.getpid()
        self.ppid = os.getppid()
        self.index = index
        self.tasks = 0
        self.recycle_requested = False
        self.exit_reason = "requested"
        self.waiting = False  # blocked in billiard's read of the next job
        self.rss_before = 0
        self.task_name = ""
        self.task_id = ""
        self.statm = _StatmReader()
        self.last_hello = 0.0
        self.watch = Watch(self.statm.rss, self.on_hard_limit)
        self._settings_mtime = 0.0
        self.start_ticks = _start_ticks()
        self.soft_threshold = 0  # this process's own, from the published soft limit and jitter
        self.verdict_due = False  # crossed it at the last task end: the daemon's word is coming
        self.waited = False  # waited once already (a held recycle must not slow every task)
        self.ahead = 0  # predictive recycling's look-ahead in tasks, from the settings (0: off)
        self.growth: deque[int] = deque(maxlen=8)  # RSS each recent task left behind
        self.rang_near = False  # rang once already for a predicted crossing

    def hello(self) -> None:
        self.last_hello = time.monotonic()
        self.load_settings()
        _send(wire.ChildHello(pid=self.pid, ppid=self.ppid, index=self.index,
                              tasks=self.tasks, rss=self.statm.rss()))

    def load_settings(self) -> None:
        """Pick up the hard limit the daemon publishes beside its socket, when it changed."""
        path = wire.settings_path(_socket_path)
        try:
            mtime = os.stat(path).st_mtime
            if mtime == self._settings_mtime:
                return
            with open(path, "rb") as fh:
                settings = wire.decode_settings(fh.read(4096))
        except OSError:
            return
        if settings is not None:
            self._settings_mtime = mtime
            hard, soft = settings.for_worker(self.node)
            self.ahead = settings.ahead
            self.watch.configure(hard, settings.watch_interval)
            self.soft_threshold = (wire.soft_threshold(soft, settings.jitter, self.pid,
                                                       self.start_ticks)
                                   if soft and self.start_ticks else 0)

    def on_hard_limit(self, rss: int, limit: int) -> None:
        """Called by the watch thread: report the task, and leave after it in any case."""
        self.recycle_requested = True
        self.exit_reason = "hard"
        _send(wire.TaskInterrupted(pid=self.pid, ppid=self.ppid, index=self.index,
                                   task=self.task_name, id=self.task_id, rss=rss, limit=limit))

    def on_recycle_signal(self, signum: int, frame: FrameType | None) -> None:
        self.recycle_requested = True
        if self.waiting:
            # Idle, blocked reading the next job: nothing has been acknowledged to the parent,
            # which puts back a job written to a child that exits before its ACK.
            self.waiting = False
            self.leave()

    def leave(self) -> None:
        _send(wire.ChildExit(pid=self.pid, ppid=self.ppid, index=self.index,
                             tasks=self.tasks, reason=self.exit_reason))
        sys.exit(EX_RECYCLE)  # billiard's own sys.exit wrapper records the exit code

    def await_verdict(self) -> None:
        """Past its own soft threshold, the child gives the daemon a moment to answer before it
        reads the next job: otherwise the request often lands a task or more later. Bounded,
        once per process, over as soon as the request arrives, and only when a recycle is what
        the daemon is about to ask. (100 ms kept workload W under the limit but, with both
        children of a pool waiting, cost throughput and a 1.2 s stall; see BENCHMARKS.md.)"""
        self.verdict_due = False
        self.waited = True
        deadline = time.monotonic() + VERDICT_WAIT
        while not self.recycle_requested and time.monotonic() < deadline:
            time.sleep(0.0005)  # the recycle signal cuts the sleep short

    def calls_for_decision(self, rss: int) -> bool:
        """Whether the report of a task that left ``rss`` can make the daemon act: past this
        child's own soft threshold (RSS bounds USS and PSS, so this covers every measure), or
        near it by the growth of its recent tasks when predictive recycling is on. Once per
        process for each: a held recycle is looked at again with the routine reports."""
        self.growth.append(rss - self.rss_before)
        threshold = self.soft_threshold
        if threshold <= 0 or self.waited:
            return False
        if rss >= threshold:
            self.verdict_due = True
            return True
        if (self.ahead and not self.rang_near
                and rss + self.ahead * max(self.growth) >= threshold):
            self.rang_near = True
            return True
        return False

    def wrap_wait_for_job(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def wait_for_job(*args: Any, **kwargs: Any) -> Any:
            if self.verdict_due and not self.recycle_requested:
                self.await_verdict()
            if self.recycle_requested:
                self.leave()
            if time.monotonic() - self.last_hello > CHILD_HELLO_SECONDS:
                self.hello()
            self.waiting = True
            try:
                return original(*args, **kwargs)
            finally:
                self.waiting = False

        return wait_for_job


def install(app: Celery, socket: str | None = None, restart_worker: bool = False) -> None:
    """Hook celery-memguard into a Celery app; call once in the module that defines ``app``.

    The socket path is taken from ``CELERY_MEMGUARD_SOCKET`` when set, else ``socket``, else
    the documented default. ``restart_worker`` lets the daemon restart a worker whose pool
    has no children (solo, threads, gevent, eventlet) as a whole: a warm shutdown past the
    soft limit, a cold one past the hard limit; its process manager must start it again.
    Installing twice is harmless.
    """
    global _socket_path, _restart_worker
    _socket_path = os.environ.get(SOCKET_ENV) or socket or DEFAULT_SOCKET
    _restart_worker = restart_worker
    if id(app) in _installed_apps:
        return
    _installed_apps.add(id(app))
    uid = f"celery_memguard.{id(app)}"
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid=uid + ".ready")
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid=uid + ".shutdown")
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid=uid + ".init")
    signals.task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid=uid + ".prerun")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid=uid + ".postrun")


# -- main process ----------------------------------------------------------------------------

def _worker_hello(consumer: Any) -> wire.WorkerHello:
    pool = consumer.pool
    controller = getattr(consumer, "controller", None)
    conf = consumer.app.conf
    max_tasks = getattr(controller, "max_tasks_per_child", None) or conf.worker_max_tasks_per_child
    max_mem = getattr(controller, "max_memory_per_child", None) or conf.worker_max_memory_per_child
    kids: list[tuple[int, int]] = []
    inner = getattr(pool, "_pool", None)
    for proc in list(getattr(inner, "_pool", None) or ()):
        pid, index = getattr(proc, "pid", None), getattr(proc, "index", None)
        if isinstance(pid, int) and isinstance(index, int):
            kids.append((pid, index))
    concurrency = getattr(pool, "num_processes", None) or getattr(pool, "limit", None) or 1
    return wire.WorkerHello(
        pid=os.getpid(), node=str(consumer.hostname)[: wire.MAX_NAME],
        pool=type(pool).__module__.rsplit(".", 1)[-1][:40],
        concurrency=int(concurrency), max_tasks=int(max_tasks) if max_tasks else None,
        max_memory_kib=int(max_mem) if max_mem else None,
        recycle_signal=int(RECYCLE_SIGNAL), kids=tuple(kids[: wire.MAX_KIDS]), agent=_VERSION,
        restart=_restart_worker,
    )


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    consumer = sender
    try:
        _watch_child_exits(getattr(consumer.pool, "_pool", None))
        _send(_worker_hello(consumer))
        timer = getattr(consumer, "timer", None)
        if timer is not None:
            timer.call_repeatedly(HEARTBEAT_SECONDS, _heartbeat, (consumer,))
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _watch_child_exits(pool: Any) -> None:
    """Report each reaped pool child with its exit code (a SIGKILL we did not send is an OOM kill).

    billiard calls ``pool.on_process_down(process)`` after joining an exited child; Celery's
    AsynPool sets it once at start, before worker_ready. The wrapper calls it unchanged.
    """
    original = getattr(pool, "on_process_down", None)
    if original is None or getattr(original, "_memguard", False):
        return

    def on_process_down(proc: Any) -> Any:
        try:
            return original(proc)
        finally:
            with contextlib.suppress(Exception):
                code, pid, index = proc.exitcode, proc.pid, getattr(proc, "index", None)
                if isinstance(code, int) and isinstance(pid, int) and isinstance(index, int):
                    _send(wire.ChildDied(pid=os.getpid(), child=pid, index=index, exitcode=code))

    on_process_down._memguard = True  # type: ignore[attr-defined]
    pool.on_process_down = on_process_down


def _heartbeat(consumer: Any) -> None:
    with contextlib.suppress(Exception):
        _send(_worker_hello(consumer))


def _on_worker_shutdown(**_: Any) -> None:
    with contextlib.suppress(Exception):
        _send(wire.WorkerBye(pid=os.getpid()))


# -- pool child ------------------------------------------------------------------------------

def _find_pool_worker() -> Any:
    """The billiard Worker whose initializer is running us, found on the call stack.

    worker_process_init is sent from the pool initializer, which billiard calls from
    ``Worker.after_fork`` before ``workloop`` binds ``wait_for_job``: wrapping it now is the
    one place where the recycle check can join billiard's own loop. None outside a pool child
    (the solo pool sends the same signal from the main process).
    """
    try:
        from billiard.pool import Worker  # noqa: PLC0415 - only meaningful inside a child
    except ImportError:  # pragma: no cover - billiard always ships with Celery
        return None
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Worker):
            return candidate
        frame = frame.f_back
    return None


def _on_process_init(sender: Any = None, **_: Any) -> None:
    global _child
    try:
        pool_worker = _find_pool_worker()
        if pool_worker is None or not hasattr(pool_worker, "wait_for_job"):
            return
        from billiard.process import current_process  # noqa: PLC0415

        index = getattr(current_process(), "index", None)
        agent = _ChildAgent(index if isinstance(index, int) else 0,
                            node=sender if isinstance(sender, str) else "")
        signal.signal(RECYCLE_SIGNAL, agent.on_recycle_signal)
        agent.watch.install()
        pool_worker.wait_for_job = agent.wrap_wait_for_job(pool_worker.wait_for_job)
        _child = agent
        agent.hello()
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _on_task_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    agent = _child
    if agent is None or agent.pid != os.getpid():
        return
    try:
        agent.rss_before = rss = agent.statm.rss()
        agent.task_name, agent.task_id = _name(task), str(task_id)[: wire.MAX_NAME]
        _send(wire.TaskStart(pid=agent.pid, ppid=agent.ppid, index=agent.index,
                             task=agent.task_name, id=agent.task_id, rss=rss))
        agent.watch.task_started(_run_code(task))
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _on_task_postrun(task_id: str | None = None, task: Any = None, state: str | None = None,
                     **_: Any) -> None:
    agent = _child
    if agent is None or agent.pid != os.getpid():
        return
    try:
        agent.watch.task_ended()
        agent.tasks += 1
        rss = agent.statm.rss()
        _send(wire.TaskEnd(pid=agent.pid, ppid=agent.ppid, index=agent.index, task=agent.task_name,
                           id=agent.task_id, rss_before=agent.rss_before,
                           rss=rss, tasks=agent.tasks, ok=state == "SUCCESS"),
              ring=agent.calls_for_decision(rss))
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _run_code(task: Any) -> CodeType | None:
    """The code object of the task's body, which marks the frames the interrupt may hit."""
    run = getattr(task, "run", None)
    run = getattr(run, "__func__", run)
    code = getattr(run, "__code__", None)
    return code if isinstance(code, CodeType) else None


_names: dict[str, str] = {}


def _start_ticks() -> int:
    """This process's start time in clock ticks (/proc/self/stat field 22): with the pid, the
    identity the daemon's jitter is computed from."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _name(task: Any) -> str:
    """The task's name, printable and bounded, as the wire format requires (cached per name)."""
    name = str(getattr(task, "name", None) or "unknown")
    clean = _names.get(name)
    if clean is None:
        clean = "".join(ch for ch in name if ch.isprintable())[: wire.MAX_NAME]
        if len(_names) < 10000:
            _names[name] = clean
    return clean
