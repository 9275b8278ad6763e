"""The in-worker side: Celery signal hooks, reports to the daemon, recycle-after-task.

Per task, nothing goes through Celery's signals: a pool child follows its jobs in billiard's
own loop (``wait_for_job`` and ``prepare_result``, wrapped once at ``worker_process_init``),
which costs less and sees one job as one task, whatever the task does inside.

The only module that imports Celery. It is small on purpose and must never slow or break a
worker: every hook swallows its own errors, sends never block and are simply lost when no
daemon listens, and nothing here waits. A pool child's own bookkeeping (batched reports,
recycling itself under a grant) is in child.py.

How a recycle is carried out: the child decides to leave under a grant (child.py), or the
daemon sends ``RECYCLE_SIGNAL`` (a real-time signal that neither Celery nor billiard uses) to a
verified pool child, whose handler only sets a flag. The
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
import sys
from types import CodeType, FrameType
from typing import Any

from celery import Celery, signals

from celery_memguard._version import __version__
from celery_memguard.channel import Sender
from celery_memguard.child import ChildAgent
from celery_memguard.protocol import messages
from celery_memguard.protocol.paths import DEFAULT_SOCKET, SOCKET_ENV
from celery_memguard.protocol.signals import RECYCLE_SIGNAL

HEARTBEAT_SECONDS = 2.0
# An exited child is looked for again after 2 ms, then twice as long each time up to 20 ms,
# until it is joined: it can be reaped 1-5 ms after its pipe closes (median 1.7 ms here).
JOIN_FIRST_RETRY_SECONDS = 0.002
JOIN_RETRY_SECONDS = 0.02  # the longest wait between two looks
JOIN_RETRIES = 55  # about one second; past it Celery's own five-second maintain_pool timer remains
_VERSION = __version__

_socket_path: str = DEFAULT_SOCKET
_sender: Sender | None = None  # the main process's connection
_child: ChildAgent | None = None
_apps: list[Celery] = []  # the apps installed into: their registries name a job's task
_restart_worker = False
_controller: Any = None  # the WorkController, kept at worker_init: its children inherit it


def _send(message: messages.Message) -> None:
    """Send a report from the worker's main process (a child sends through its ChildAgent)."""
    global _sender
    try:
        if _sender is None or _sender.pid != os.getpid():
            if _sender is not None:
                _sender.close()  # a parent's connection, inherited across fork: ours to close
            _sender = Sender(_socket_path)
        _sender.send(message)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


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
    if any(known is app for known in _apps):
        return
    _apps.append(app)
    uid = f"celery_memguard.{id(app)}"
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid=uid + ".init_worker")
    signals.worker_ready.connect(_on_worker_ready, weak=False, dispatch_uid=uid + ".ready")
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False, dispatch_uid=uid + ".shutdown")
    signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid=uid + ".init")


# -- main process ----------------------------------------------------------------------------

def _on_worker_init(sender: Any = None, **_: Any) -> None:
    global _controller
    _controller = sender
    with contextlib.suppress(Exception):
        _join_exited_children_promptly()


def _pool_size(pool: Any) -> int:
    """The size of a worker's pool as its hello reports it, and as its children take it for
    the jitter: the same expression on both sides, so they compute the same thresholds. 0
    when unknown."""
    try:
        size = getattr(pool, "num_processes", None)
    except Exception:  # noqa: BLE001 - TaskPool.num_processes before billiard's pool exists
        size = None
    size = size or getattr(pool, "limit", None)
    return size if isinstance(size, int) and size > 0 else 0


def _join_exited_children_promptly() -> None:
    """Have Celery's prefork pool replace a child that left as soon as it can be joined.

    Celery's AsynPool learns that a child exited when the child's sentinel pipe closes, stops
    watching that pipe and runs ``maintain_pool`` once. The kernel closes an exiting process's
    descriptors before the process can be reaped, so that run often finds no exit code yet,
    joins nothing, and nothing looks again until the pool's five-second timer: meanwhile the
    slot has no process, and a job the parent had already written to the leaving child waits
    with it. Seen here in about one recycle in three, for every recycle path (this agent's,
    --max-tasks-per-child and --max-memory-per-child alike), as stalls of up to 4.7 s with
    no task finishing; reported upstream as celery/celery#9588. After the original handler,
    a child still in the pool is looked for again after ``JOIN_FIRST_RETRY_SECONDS``, then at
    doubling intervals up to ``JOIN_RETRY_SECONDS``, for about a second; the rest of
    Celery's handling is unchanged. Installed before the pool is created.
    """
    from celery.concurrency import asynpool  # noqa: PLC0415 - only in a worker

    original = getattr(asynpool.AsynPool, "_event_process_exit", None)
    if original is None or getattr(original, "_memguard", False):
        return

    def _event_process_exit(self: Any, hub: Any, proc: Any) -> None:
        original(self, hub, proc)
        _join_later(self, hub, proc, JOIN_RETRIES, JOIN_FIRST_RETRY_SECONDS)

    _event_process_exit._memguard = True  # type: ignore[attr-defined]
    asynpool.AsynPool._event_process_exit = _event_process_exit


def _join_later(pool: Any, hub: Any, proc: Any, tries: int, delay: float) -> None:
    """While ``proc`` is still in the pool, run its ``maintain_pool`` again in ``delay``
    seconds (then twice that, up to ``JOIN_RETRY_SECONDS``). Errors raised by maintain_pool
    are Celery's own and reach its loop as from its own timer."""
    try:
        if tries <= 0 or proc not in pool._pool:
            return

        def again() -> None:
            if proc in pool._pool:
                pool.maintain_pool()
            _join_later(pool, hub, proc, tries - 1, min(delay * 2, JOIN_RETRY_SECONDS))

        hub.call_later(delay, again)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _worker_hello(consumer: Any) -> messages.WorkerHello:
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
    return messages.WorkerHello(
        pid=os.getpid(), node=str(consumer.hostname)[: messages.MAX_NAME],
        pool=type(pool).__module__.rsplit(".", 1)[-1][:40],
        concurrency=_pool_size(pool) or 1, max_tasks=int(max_tasks) if max_tasks else None,
        max_memory_kib=int(max_mem) if max_mem else None,
        recycle_signal=int(RECYCLE_SIGNAL), kids=tuple(kids[: messages.MAX_KIDS]), agent=_VERSION,
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
                    _send(messages.ChildDied(pid=os.getpid(), child=pid, index=index, exitcode=code))

    on_process_down._memguard = True  # type: ignore[attr-defined]
    pool.on_process_down = on_process_down


def _heartbeat(consumer: Any) -> None:
    with contextlib.suppress(Exception):
        _send(_worker_hello(consumer))


def _on_worker_shutdown(**_: Any) -> None:
    with contextlib.suppress(Exception):
        _send(messages.WorkerBye(pid=os.getpid()))


# -- pool child ------------------------------------------------------------------------------

def _find_pool_worker() -> Any:
    """The billiard Worker whose initializer is running us, found on the call stack.

    worker_process_init is sent from the pool initializer, which billiard calls from
    ``Worker.after_fork`` before ``workloop`` binds ``wait_for_job`` and ``prepare_result``:
    wrapping them now is the one place where the agent can join billiard's own loop. None
    outside a pool child (the solo pool sends the same signal from the main process).
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
    global _child, _sender
    try:
        pool_worker = _find_pool_worker()
        if pool_worker is None or not all(hasattr(pool_worker, attr)
                                          for attr in ("wait_for_job", "prepare_result")):
            return
        from billiard.process import current_process  # noqa: PLC0415

        if _sender is not None:  # the parent's connection, inherited across fork: ours to close
            _sender.close()
            _sender = None
        index = getattr(current_process(), "index", None)
        maxtasks = getattr(pool_worker, "maxtasks", None)
        agent = ChildAgent(index if isinstance(index, int) else 0, _socket_path,
                           node=sender if isinstance(sender, str) else "",
                           max_tasks=maxtasks if isinstance(maxtasks, int) else None,
                           pool=_pool_size(getattr(_controller, "pool", None)))
        signal.signal(RECYCLE_SIGNAL, agent.on_recycle_signal)
        agent.watch.install()
        pool_worker.wait_for_job = agent.wrap_wait_for_job(pool_worker.wait_for_job, _describe)
        pool_worker.prepare_result = agent.wrap_prepare_result(pool_worker.prepare_result)
        _child = agent
        agent.hello()
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _describe(job: Any) -> tuple[str, str, CodeType | None]:
    """A billiard job as the agent reports it: task name, task id, and the code object of the
    task's body. Celery's prefork pool runs every task as ``trace(name, id, request, body,
    ...)`` (celery/worker/request.py ``execute_using_pool``); anything else is "unknown"."""
    try:
        args = job[1][3]
        name, task_id = args[0], args[1]
    except (TypeError, IndexError, KeyError):
        return "unknown", "", None
    if not isinstance(name, str):
        return "unknown", "", None
    known = _tasks.get(name)
    if known is None:
        known = (_clean(name), _run_code(_lookup(name)))
        if len(_tasks) < 10000:
            _tasks[name] = known
    return known[0], str(task_id)[: messages.MAX_NAME], known[1]


def _lookup(name: str) -> Any:
    """The task registered under ``name``: in an installed app, else in the app the worker
    runs (Celery's current app in a pool child), should the two ever differ."""
    from celery import current_app  # noqa: PLC0415 - a pool child has its worker's app current

    for app in (*_apps, current_app):
        with contextlib.suppress(Exception):
            task = app.tasks.get(name)
            if task is not None:
                return task
    return None


def _run_code(task: Any) -> CodeType | None:
    """The code object of the task's body, which marks the frames the interrupt may hit."""
    run = getattr(task, "run", None)
    run = getattr(run, "__func__", run)
    code = getattr(run, "__code__", None)
    return code if isinstance(code, CodeType) else None


_tasks: dict[str, tuple[str, CodeType | None]] = {}  # per task name: (clean name, body)


def _clean(name: str) -> str:
    """The task's name, printable and bounded, as the wire format requires."""
    return "".join(ch for ch in name if ch.isprintable())[: messages.MAX_NAME] or "unknown"
