"""The signal numbers and the exit code both sides rely on.

Real-time signals that neither Celery nor billiard uses: billiard's soft time limit is SIGUSR1,
and it resets the common signals in a child after the initializer (billiard/common.py
``reset_signals``).
"""

from __future__ import annotations

import signal

RECYCLE_SIGNAL = int(signal.SIGRTMIN) + 4  # the daemon asks a child to leave after its task
INTERRUPT_SIGNAL = int(signal.SIGRTMIN) + 5  # a child's watch thread interrupts its main thread
CONTAINER_SIGNAL = int(signal.SIGRTMIN) + 6  # the daemon: interrupt the task (its container is
# past its hard line and this task grows most), and leave after it
TRACE_SIGNAL = int(signal.SIGRTMIN) + 7  # the daemon: read the trace request before the next
# task (protocol.forensics)
EX_RECYCLE = 0x9B  # billiard.pool.EX_RECYCLE: the exit --max-tasks-per-child takes
