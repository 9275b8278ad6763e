"""An agent process's connection to the daemon: one SOCK_SEQPACKET connection, never blocking.

A missing daemon costs one failed connect every two seconds at most, a full buffer loses the
message, and nothing here ever waits or raises into the worker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from celery_memguard.protocol import messages, paths

SEND_BUFFER = 1 << 20  # bytes a process may have in flight to a busy daemon


class Sender:
    """This process's connection; a message that cannot go is dropped."""

    RETRY_MIN, RETRY_MAX = 0.1, 2.0  # seconds between connection attempts, doubling

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
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

    def can_send(self) -> bool:
        """Whether a message may go now: connected, or the next connection attempt is due.
        When not, whatever would be sent is dropped before any work is spent on it."""
        return self._sock is not None or time.monotonic() >= self._next_try

    def send(self, message: messages.Message) -> None:
        """Send without blocking. A connection found broken (a restarted daemon) is replaced
        and the message tried once more on the new one, so the first report after a restart,
        often a child's exit, is not the one lost. A message is encoded only once there is a
        connection to send it on."""
        data = b""
        for _ in range(2):
            sock = self._sock or self._connect()
            if sock is None:
                return
            if not data:
                data = messages.encode(message)
            try:
                sock.send(data, socket.MSG_NOSIGNAL)  # never a SIGPIPE into a worker
            except BlockingIOError:
                return  # the daemon is behind: drop this one, keep the connection
            except OSError:
                sock.close()  # the daemon went away: a new one may be up already
                self._sock = None
            else:
                return

    def ring(self) -> None:
        """Ask the daemon to read now: it reads routine reports in batches."""
        try:
            if self._bell is None:
                self._bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._bell.sendto(b"!", paths.bell_path(self.path))
        except OSError:
            return  # no daemon, or its bell is full: it is awake already

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._bell is not None:
            self._bell.close()
            self._bell = None
