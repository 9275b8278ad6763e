"""The Celery and billiard internals the agent joins, by the names both sides report them.

The agent checks each at start; one that is missing is named in the worker's log, in the
hellos (``missing``), in the daemon's metrics and ``status``, and by ``celery-memguard doctor``
with what it costs and what to do. The agent carries on with what still works.
"""

from __future__ import annotations

POOL_WORKER = "billiard.pool.Worker"  # found on a pool child's stack at worker_process_init
WAIT_FOR_JOB = "billiard.pool.Worker.wait_for_job"  # a task begins; the safe point to leave
PREPARE_RESULT = "billiard.pool.Worker.prepare_result"  # a task ends
EX_RECYCLE = "billiard.pool.EX_RECYCLE"  # the exit code through which the pool replaces a child
PROCESS_DOWN = "billiard.pool.Pool.on_process_down"  # a reaped child, with its exit code
PROCESS_EXIT = "celery.concurrency.asynpool.AsynPool._event_process_exit"  # prompt replacement
NODENAME = "celery.signals.worker_process_init.sender"  # the child's nodename (or initargs)
HELLO = "celery_memguard.worker_hello"  # the worker's main process never announced itself

TESTED = "Celery 5.3-5.7 with billiard 4.3"  # each minor pulls in 4.3.2 today
_UPGRADE = (f"celery-memguard was tested with {TESTED}: run a tested pair (pin billiard<4.4 and "
            "celery<5.8), or upgrade celery-memguard")

# hook -> (what is lost without it, what to do)
EFFECTS: dict[str, tuple[str, str]] = {
    POOL_WORKER: ("children neither leave through billiard's recycle path nor report task "
                  "boundaries from its loop (Celery's task signals stand in)", _UPGRADE),
    WAIT_FOR_JOB: ("children cannot leave safely between tasks: the daemon does not recycle "
                   "them (the hard limit still interrupts tasks)", _UPGRADE),
    PREPARE_RESULT: ("task ends come from Celery's task_postrun signal instead of billiard's "
                     "loop", _UPGRADE),
    EX_RECYCLE: ("a child leaving to be recycled may not be replaced by the pool", _UPGRADE),
    PROCESS_DOWN: ("reaped children are not reported: OOM kills are not told from other exits",
                   "use the prefork pool with Celery's event loop (a broker transport that "
                   "supports it: Redis, RabbitMQ), or " + _UPGRADE),
    PROCESS_EXIT: ("an exited child may be replaced only by Celery's 5-second maintain_pool timer",
                   _UPGRADE),
    NODENAME: ("the children do not know their worker's nodename: per-worker limits (workers:) "
               "do not reach their in-child watch", _UPGRADE),
    HELLO: ("the worker's main process never announced itself: no pool slots, max-tasks or "
            "reaped children are known, and the worker is named after its children",
            "call celery_memguard.install(app) in the module that defines the app, before the "
            "worker starts (its consumer step sends the hello in every start mode)"),
}

# Without these a child cannot leave safely between two tasks: it is not asked to recycle.
BLOCK_RECYCLE = frozenset({POOL_WORKER, WAIT_FOR_JOB})


def effect(hook: str) -> tuple[str, str]:
    """(what is lost, what to do) for a hook name, also one this release does not know."""
    return EFFECTS.get(hook, ("an internal the agent relies on is missing", _UPGRADE))
