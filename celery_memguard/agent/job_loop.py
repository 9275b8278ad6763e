"""billiard's job loop, joined: the two calls a pool child's agent wraps.

``Worker.workloop`` reads each job with ``wait_for_job`` and hands each result to
``prepare_result``: the first is where a task begins and where a child leaves between two tasks
(before reading: nothing is acknowledged yet), the second is where a task ends. pool_child.py
wraps both once per child, at ``worker_process_init``; the bookkeeping is child_agent.py's.
The wrappers never raise into billiard: a job the agent cannot name still runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import CodeType
from typing import Any

from celery_memguard.agent.child_agent import CHILD_HELLO_SECONDS, ChildAgent
from celery_memguard.protocol import messages

UNIT_WAIT = 0.5  # seconds a child that would cross waits for a unit of its grant, once
UNIT_STEP = 0.01


def wrap_wait_for_job(agent: ChildAgent, original: Callable[..., Any],
                      describe: Callable[[Any], tuple[str, str, CodeType | None]],
                      refusal: Callable[[Any], str | None] = lambda job: None,
                      ) -> Callable[..., Any]:
    """billiard's read of the next job, wrapped: where a child leaves, and where a task
    begins. ``describe`` names the job (task name, task id, the body's code object);
    ``refusal`` says why the main process found its task id quarantined, if it did.

    A job that returned ends at ``wrap_prepare_result``; one that raised out of billiard's
    call (it reports the exception itself) ends here, at the next read.
    """
    def wait_for_job(*args: Any, **kwargs: Any) -> Any:
        if agent.running:
            _end_quietly(agent, False)
        if agent.recycle_requested or _leave_before_next(agent):
            agent.leave()
        if time.monotonic() - agent.last_hello > CHILD_HELLO_SECONDS:
            try:
                agent.hello()
            except Exception:  # noqa: BLE001 - the agent never raises into the worker
                agent.last_hello = time.monotonic()
        agent.waiting = True
        try:
            if agent.recycle_requested:  # the signal came between the check and now
                agent.waiting = False
                agent.leave()
            job = original(*args, **kwargs)
        finally:
            agent.waiting = False
        if job:
            try:
                name, task_id, run_code = describe(job)
                refused = refusal(job)
                if refused is None:
                    _hold(agent, name, task_id)
                agent.begin(name, task_id, run_code, refused)
            except Exception:  # noqa: BLE001 - the agent never raises into the worker
                agent.running = False
        return job

    return wait_for_job


def wrap_prepare_result(agent: ChildAgent, original: Callable[[Any], Any],
                        ) -> Callable[[Any], Any]:
    """billiard's hook on a job's return value: the task has ended, its result not yet
    handed to the parent. Celery's trace functions return ``(failed, result, runtime)``."""
    def prepare_result(result: Any) -> Any:
        if agent.running:
            failed = isinstance(result, tuple) and bool(result) and result[0] == 1
            _end_quietly(agent, not failed)
        return original(result)

    return prepare_result


def _leave_before_next(agent: ChildAgent) -> bool:
    """At the read of the next job, by the RSS the last task left (nothing ran since). A
    child whose next task would likely cross, but that finds no unit of its grant (a sibling
    just took the last one), waits for one at most ``UNIT_WAIT``, once in its life: the
    daemon grants the worker's units again as soon as the sibling's exit reaches it. Without
    the wait the task ran and crossed; with none left after it, the task runs as before and
    its end asks the daemon (a storm held by the rate limit costs each child one wait)."""
    try:
        verdict = agent.leave_before(agent.last_rss)
        if verdict is None and not agent.waited_for_unit:
            agent.waited_for_unit = True
            deadline = time.monotonic() + UNIT_WAIT
            while verdict is None and time.monotonic() < deadline and not agent.recycle_requested:
                time.sleep(UNIT_STEP)
                verdict = agent.leave_before(agent.last_rss)
        return bool(verdict)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        return False


def _hold(agent: ChildAgent, name: str, task_id: str) -> bool:
    """Wait for the container to have room before the task starts (headroom.py). Asked to
    leave meanwhile, the child leaves at once: the job is not acknowledged yet, and the pool
    gives it to another child."""
    agent.waiting = True
    try:
        if agent.recycle_requested:
            agent.waiting = False
            agent.leave()
        held = agent.headroom.hold(name, agent.statm.rss())
    finally:
        agent.waiting = False
    if held is None:
        return False
    agent.send(messages.TaskHeld(
        pid=agent.pid, ppid=agent.ppid, index=agent.index, task=name, id=task_id,
        waited_ms=int(held.seconds * 1000), working_set=held.working_set,
        line=held.line, gave_up=held.gave_up))
    return True


def _end_quietly(agent: ChildAgent, ok: bool) -> None:
    try:
        agent.end(ok)
    except Exception:  # noqa: BLE001 - the agent never raises into the worker
        agent.running = False
