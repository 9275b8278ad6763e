"""The agent in a pool child: join billiard's job loop and leave through its recycle path.

Per task, nothing goes through Celery's signals: a pool child follows its jobs in billiard's
own loop (``wait_for_job`` and ``prepare_result``, wrapped once at ``worker_process_init``: job_loop.py),
which costs less and sees one job as one task, whatever the task does inside. The child's
bookkeeping is in child_agent.py.

How a recycle is carried out: the child decides to leave under a grant (child_agent.py), or the
daemon sends ``RECYCLE_SIGNAL`` (a real-time signal that neither Celery nor billiard uses) to a
verified pool child, whose handler only sets a flag. The child's ``wait_for_job`` - the call
billiard's ``Worker.workloop`` makes between two tasks, after the previous result has been
handed to the parent - is wrapped to check the flag and, when set, to leave with
``sys.exit(EX_RECYCLE)``: the same exit code and the same ``_ensure_messages_consumed`` path
that ``--max-tasks-per-child`` takes, so the pool starts a replacement and no task is lost or
run twice. Celery's pool children block in that read with no timeout, so a child that is idle
when the signal comes leaves from the handler itself: it has acknowledged no job, and the
parent puts back a job written to a child that exits before acknowledging it
(celery/concurrency/asynpool.py ``on_job_process_down``).

Where billiard's loop cannot be joined (hooks.py names what is missing), the child takes its
task boundaries from Celery's task signals (task_signals.py) and does not recycle itself.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from types import CodeType, FrameType
from typing import Any

from celery_memguard.agent import hooks, job_loop, main_process, task_signals
from celery_memguard.agent.child_agent import ChildAgent
from celery_memguard.agent.context import CONTEXT, jitter_pool
from celery_memguard.agent.quarantine import MARK
from celery_memguard.protocol import hooks as protocol_hooks
from celery_memguard.protocol import messages
from celery_memguard.protocol.signals import CONTAINER_SIGNAL, RECYCLE_SIGNAL, TRACE_SIGNAL

_child: ChildAgent | None = None  # this pool child's agent, once installed


def current() -> ChildAgent | None:
    """This pool child's agent (None in a main process, or where it could not be installed)."""
    return _child


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


def on_process_init(sender: Any = None, **_: Any) -> None:
    global _child
    try:
        from billiard.process import current_process  # noqa: PLC0415

        pool_worker = _find_pool_worker()
        if pool_worker is None and current_process().name == "MainProcess":
            return  # the solo pool sends worker_process_init from the main process
        hooks.check_classes()  # a spawned child: its parent's findings were not inherited
        if pool_worker is None:
            hooks.report(protocol_hooks.POOL_WORKER)
        begins = _joinable(pool_worker, "wait_for_job", protocol_hooks.WAIT_FOR_JOB)
        ends = _joinable(pool_worker, "prepare_result", protocol_hooks.PREPARE_RESULT)
        main_process.forget_sender()  # the parent's connection, inherited across fork
        index = getattr(current_process(), "index", None)
        maxtasks = getattr(pool_worker, "maxtasks", None)
        node = sender if isinstance(sender, str) else _initargs_node(pool_worker)
        node = node or str(getattr(CONTEXT.controller, "hostname", "") or "")
        if not node:
            hooks.report(protocol_hooks.NODENAME)
        agent = ChildAgent(index if isinstance(index, int) else 0, CONTEXT.socket, node=node,
                           max_tasks=maxtasks if isinstance(maxtasks, int) else None,
                           pool=jitter_pool(CONTEXT.controller), missing=hooks.missing())
        signal.signal(RECYCLE_SIGNAL, agent.on_recycle_signal)
        signal.signal(CONTAINER_SIGNAL, agent.on_container_signal)
        agent.watch.install()
        signal.signal(TRACE_SIGNAL, agent.tracing.on_signal)  # a trace request: sets a flag
        if begins:
            pool_worker.wait_for_job = job_loop.wrap_wait_for_job(
                agent, pool_worker.wait_for_job, describe, refusal)
        if ends:
            pool_worker.prepare_result = job_loop.wrap_prepare_result(
                agent, pool_worker.prepare_result)
        if not (begins and ends):
            task_signals.connect(agent, begins=not begins, ends=not ends, run_code=_run_code)
        _child = agent
        agent.hello()
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def _joinable(pool_worker: Any, method: str, hook: str) -> bool:
    """Whether the agent can wrap this method of the pool worker (and billiard's loop still
    calls it); a missing one is reported."""
    if pool_worker is None:
        return False
    if hook in hooks.missing():
        return False
    if not callable(getattr(pool_worker, method, None)):
        hooks.report(hook)
        return False
    return True


def _initargs_node(pool_worker: Any) -> str:
    """The nodename Celery passes the pool initializer: ``initargs == (app, hostname)`` in
    every Celery from 5.3 to 5.7. Before 5.7 worker_process_init is sent with no sender."""
    initargs = getattr(pool_worker, "initargs", None)
    if isinstance(initargs, tuple) and len(initargs) == 2 and isinstance(initargs[1], str):
        return initargs[1]
    return ""


def refusal(job: Any) -> str | None:
    """Why the main process marked this job's request as quarantined (agent/quarantine.py)."""
    try:
        why = job[1][3][2].get(MARK)
    except (TypeError, IndexError, KeyError, AttributeError):
        return None
    return why if isinstance(why, str) else None


def describe(job: Any) -> tuple[str, str, CodeType | None]:
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
        known = (messages.clean_name(name), _run_code(_lookup(name)))
        if len(_tasks) < 10000:
            _tasks[name] = known
    return known[0], str(task_id)[: messages.MAX_NAME], known[1]


def _lookup(name: str) -> Any:
    """The task registered under ``name``: in an installed app, else in the app the worker
    runs (Celery's current app in a pool child), should the two ever differ."""
    from celery import current_app  # noqa: PLC0415 - a pool child has its worker's app current

    for app in (*CONTEXT.apps, current_app):
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
