"""The agent in a worker's main process: announce the worker, report its reaped children.

The hello (when the worker's consumer starts, then every ``HEARTBEAT_SECONDS``) tells the
daemon the worker's nodename, pool, size, --max-tasks-per-child and --max-memory-per-child,
which pid holds which pool slot, and which hooks the agent could not join; a child billiard
reaps is reported with its exit code, so that a SIGKILL the daemon did not send is recognised
as an OOM kill. The goodbye goes at a warm shutdown, a cold one, or the process's exit.

The consumer's start comes from a bootstep (install.py), which every WorkController runs:
worker_ready is sent only by ``celery.apps.worker.Worker`` (the CLI, ``worker_main``,
``app.Worker``), never by an embedded WorkController or ``start_worker``. It stays connected
as a fallback, and is where billiard's exit hook first exists.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import time
from typing import Any, Literal

from celery_memguard._version import __version__
from celery_memguard.agent import hooks, prompt_join
from celery_memguard.agent.context import CONTEXT, POOL_ENV, jitter_pool, pool_size
from celery_memguard.agent.quarantine import MARK, Guard
from celery_memguard.agent.sender import Sender
from celery_memguard.protocol import hooks as hook_names
from celery_memguard.protocol import messages
from celery_memguard.protocol.cgroups import Cgroups, Container
from celery_memguard.protocol.signals import RECYCLE_SIGNAL

HEARTBEAT_SECONDS = 2.0

_sender: Sender | None = None  # this process's connection
_cgroups = Cgroups()
_own_container: Container | Literal[False] | None = None  # False: looked, found none
_guard: Guard | None = None  # quarantined task ids, made at worker_init
_lost: dict[int, tuple[str | None, str | None]] = {}  # child pid -> the task it ran when lost
_hello_pid = 0  # the process that said hello since its last goodbye (not a forked child)
_heartbeat: Any = None  # the consumer timer's entry


def send(message: messages.Message) -> None:
    """Send a report from the worker's main process (a child sends through its ChildAgent)."""
    global _sender
    try:
        if _sender is None or _sender.pid != os.getpid():
            forget_sender()  # a parent's connection, inherited across fork: ours to close
            _sender = Sender(CONTEXT.socket)
        _sender.send(message)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def forget_sender() -> None:
    """Close the main process's connection (in a child that inherited it across fork)."""
    global _sender
    if _sender is not None:
        _sender.close()
        _sender = None


def on_worker_init(sender: Any = None, **_: Any) -> None:
    global _guard
    CONTEXT.controller = sender
    _guard = Guard(CONTEXT.socket)
    with contextlib.suppress(Exception):
        hooks.check_classes()
        prompt_join.install()
        atexit.register(_bye_at_exit, os.getpid())


def freeze_before_fork(**_: Any) -> None:
    """Once, just before the pool forks its first child (``install(app, freeze=True)``):
    freeze every object the main process holds now. The children's cycle collector then
    skips them, and so does not write to, and copy, the pages they share with their parent;
    Celery's own collection before each later fork becomes nearly free. The price: reference
    cycles alive at that moment are never collected (objects are still freed when their last
    reference goes)."""
    if CONTEXT.freeze and not CONTEXT.frozen:
        CONTEXT.frozen = True
        with contextlib.suppress(Exception):
            gc.collect()
            gc.freeze()


def on_task_received(request: Any = None, **_: Any) -> None:
    """Mark the request of a quarantined task id: its child refuses it (agent/quarantine.py)."""
    try:
        if _guard is None or request is None:
            return
        why = _guard.why(str(request.id), time.monotonic())
        if why is not None:
            request.request_dict[MARK] = (f"task {request.id} ({request.name}) is quarantined: "
                                          f"{why}")
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def on_consumer_start(consumer: Any, loop_started: bool = False) -> None:
    """Say hello (once, until a goodbye: a program may run one embedded worker after
    another), and keep the heartbeat going: consumer steps start again after a broker
    reconnect, when Celery 5.7 has cancelled the timer entries they made.
    ``loop_started``: the pool's event-loop handlers exist (worker_ready, the heartbeat)."""
    global _hello_pid, _heartbeat
    try:
        if _watch_child_exits(getattr(consumer.pool, "_pool", None)) is False and loop_started:
            hooks.report(hook_names.PROCESS_DOWN)
        if _hello_pid != os.getpid():
            _hello_pid = os.getpid()
            send(worker_hello(consumer))
        timer = getattr(consumer, "timer", None)
        if timer is not None and (_heartbeat is None or getattr(_heartbeat, "canceled", False)):
            _heartbeat = timer.call_repeatedly(HEARTBEAT_SECONDS, _beat, (consumer,))
            if not loop_started:  # the pool's exit hook is set as the event loop starts
                timer.call_after(0.01, _beat, (consumer,))
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return


def on_consumer_stop(_consumer: Any) -> None:
    global _heartbeat
    with contextlib.suppress(Exception):
        if _heartbeat is not None:
            _heartbeat.cancel()
    _heartbeat = None


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    on_consumer_start(sender, loop_started=True)


def on_worker_shutdown(**_: Any) -> None:
    _bye()


def on_worker_shutting_down(how: str = "", **_: Any) -> None:
    """A cold shutdown (SIGQUIT, a second Ctrl-C) never sends worker_shutdown."""
    if how == "Cold":
        _bye()


def on_before_create_process(**_: Any) -> None:
    """Just before the pool starts a child: a spawned one inherits no agent state, only the
    environment, from which it takes the pool size its jitter is computed for."""
    with contextlib.suppress(Exception):
        os.environ[POOL_ENV] = str(jitter_pool(CONTEXT.controller))


def _bye_at_exit(pid: int) -> None:
    if os.getpid() == pid:
        _bye()


def _bye() -> None:
    global _hello_pid
    if _hello_pid == os.getpid():  # the daemon knows this worker; goodbye once
        _hello_pid = 0
        with contextlib.suppress(Exception):
            send(messages.WorkerBye(pid=os.getpid()))


def worker_hello(consumer: Any) -> messages.WorkerHello:
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
    kind = type(pool).__module__.rsplit(".", 1)[-1][:40]
    maximum = getattr(controller, "max_concurrency", None)
    celery, billiard, python = hooks.versions()
    return messages.WorkerHello(
        pid=os.getpid(), node=str(consumer.hostname)[: messages.MAX_NAME], pool=kind,
        concurrency=pool_size(pool) or 1, max_tasks=int(max_tasks) if max_tasks else None,
        max_memory_kib=int(max_mem) if max_mem else None,
        recycle_signal=int(RECYCLE_SIGNAL), kids=tuple(kids[: messages.MAX_KIDS]),
        agent=__version__, restart=CONTEXT.restart_worker, oom_kills=_oom_kills(),
        max_concurrency=maximum if isinstance(maximum, int) and maximum > 0 else None,
        missing=hooks.missing()[: messages.MAX_HOOKS] if kind == "prefork" else (),
        celery=celery, billiard=billiard, python=python,
        socket=CONTEXT.socket[: messages.MAX_NAME], **_container(),
    )


def _container() -> dict[str, int | None]:
    """This worker's container as the kernel judges it, for the hello (empty: none found)."""
    global _own_container
    try:
        if _own_container is None:
            _own_container = _cgroups.find("self") or False
        reading = _cgroups.read(_own_container) if _own_container else None
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return {}
    if reading is None:
        return {}
    return {"container_usage": reading.usage, "container_working_set": reading.working_set,
            "container_limit": reading.limit}


def _oom_kills() -> int | None:
    """The kernel's OOM kill counter for this worker's container, where it can be read; each
    reading is also the quarantine's baseline (a kill moves it)."""
    try:
        counter = _cgroups.oom_kills()
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return None
    if _guard is not None:
        _guard.oom.observe("self", counter, time.monotonic())
    return counter


def _beat(consumer: Any) -> None:
    """The heartbeat: wrap the exit hook where the event loop has (re)set it, then hello."""
    global _hello_pid
    with contextlib.suppress(Exception):
        if _watch_child_exits(getattr(consumer.pool, "_pool", None)) is False:
            hooks.report(hook_names.PROCESS_DOWN)
        _hello_pid = os.getpid()
        send(worker_hello(consumer))


def _watch_child_exits(pool: Any) -> bool | None:
    """Report each reaped pool child with its exit code (a SIGKILL we did not send is an OOM kill).

    billiard calls ``pool.on_process_down(process)`` after joining an exited child; Celery's
    AsynPool sets it when it joins the event loop, before worker_ready, and again after a
    broker reconnect. The wrapper calls it unchanged. True: wrapped; False: a prefork pool
    without the hook; None: no prefork pool.
    """
    if pool is None or not type(pool).__module__.startswith(("billiard", "celery.concurrency")):
        return None
    original = getattr(pool, "on_process_down", None)
    if original is None:
        return False
    if getattr(original, "_memguard", False):
        return True

    def on_process_down(proc: Any) -> Any:
        try:
            return original(proc)
        finally:
            with contextlib.suppress(Exception):
                code, pid, index = proc.exitcode, proc.pid, getattr(proc, "index", None)
                if isinstance(code, int) and isinstance(pid, int) and isinstance(index, int):
                    task, task_id = _lost.pop(pid, (None, None))
                    if task_id is None:
                        task, task_id = _job_of(pool, pid)
                    send(messages.ChildDied(pid=os.getpid(), child=pid, index=index,
                                            exitcode=code, task=task, id=task_id,
                                            oom_kills=_oom_kills() if code < 0 else None))
                    if code < 0 and _sender is not None:
                        _sender.ring()  # a kill: counted, and quarantined, at once

    on_process_down._memguard = True  # type: ignore[attr-defined]
    pool.on_process_down = on_process_down
    _watch_lost_jobs(pool)
    return True


def _watch_lost_jobs(pool: Any) -> None:
    """Note the task of each job Celery gives up as lost with its child."""
    lost = getattr(pool, "on_job_process_lost", None)
    if lost is None or getattr(lost, "_memguard", False):
        return

    def on_job_process_lost(job: Any, pid: int, exitcode: int) -> Any:
        """Celery fails (and may requeue) a lost job here, before the child is reported
        down: note its task, and whether the kernel killed it, before anything else."""
        with contextlib.suppress(Exception):
            task, task_id = _job_task(job)
            _lost[pid] = (task, task_id)
            if exitcode == -signal.SIGKILL and _guard is not None:
                _guard.killed(task_id, task, _cgroups.oom_kills(), time.monotonic())
        return lost(job, pid, exitcode)

    on_job_process_lost._memguard = True  # type: ignore[attr-defined]
    pool.on_job_process_lost = on_job_process_lost


def _job_of(pool: Any, pid: int) -> tuple[str | None, str | None]:
    """The task the pool gave child ``pid`` and has not seen finish: (name, id), or Nones.

    billiard keeps each job in the pool's ``_cache`` with the pid that acknowledged it, until
    the job is marked lost after ``lost_worker_timeout``; Celery passes the task id as the
    job's ``correlation_id`` and its ``Request.on_success`` as the callback."""
    for job in list(getattr(pool, "_cache", {}).values()):
        if pid in job.worker_pids() and not job.ready():
            return _job_task(job)
    return None, None


def _job_task(job: Any) -> tuple[str | None, str | None]:
    """(task name, task id) of a pool job: Celery passes the task id as the job's
    ``correlation_id`` and its ``Request.on_success`` as the callback."""
    request = getattr(getattr(job, "_callback", None), "__self__", None)
    name, task_id = getattr(request, "name", None), getattr(job, "correlation_id", None)
    return (messages.clean_name(name) if isinstance(name, str) else None,
            task_id[: messages.MAX_NAME] if isinstance(task_id, str) else None)
