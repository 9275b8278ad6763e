"""The daemon's end of the agent socket: bind it safely, read messages with their sender.

The kernel attaches the sender's pid and uid to every message (SO_PASSCRED), so a message
that claims to come from another process is recognised as forged before it is decoded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import select
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery_memguard.protocol.messages import MAX_DATAGRAM
from celery_memguard.protocol.paths import bell_path

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
SOCKET_MODE = 0o660
DIR_MODE = 0o755
LISTEN_BACKLOG = 1024  # agents connecting at once: a worker's children start together
READ_BATCH = 64  # messages read from one connection before the next gets its turn


class SocketError(Exception):
    """The socket cannot be bound; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes
    pid: int  # the sender's pid as the kernel saw it; 0 when unknown
    uid: int
    truncated: bool


class Inbox:
    """A listening Unix SOCK_SEQPACKET socket and the connections of the agents.

    Each agent process keeps one connection and sends one message per packet. A connection
    has its own buffer, where a datagram socket's receive queue holds only
    ``net.unix.max_dgram_qlen`` messages (10 by default): with a daemon a few tens of
    milliseconds behind on a busy host, datagrams were refused and reports lost. ``fileno``
    is an epoll descriptor over the listener and every connection, so the daemon's loop waits
    on one descriptor; ``drain`` accepts and reads what is waiting, without blocking.

    Beside it, ``bell`` is a datagram socket whose messages carry nothing: a child whose
    report calls for a decision rings it after sending the report, so the daemon can read
    routine reports in batches and still answer that one at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._poll: select.epoll | None = None
        self._conns: dict[int, socket.socket] = {}
        self._peers: dict[int, tuple[int, int]] = {}  # fd -> (pid, uid) of the connecting process
        self.bell: socket.socket | None = None

    def open(self) -> None:
        _prepare_directory(self.path.parent)
        sock = _bind(socket.SOCK_SEQPACKET, self.path, stale_ok=False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.listen(LISTEN_BACKLOG)
        try:
            self.bell = _bind(socket.SOCK_DGRAM, Path(bell_path(str(self.path))), stale_ok=True)
        except SocketError:
            sock.close()
            self.path.unlink()
            raise
        self.sock = sock
        self._poll = select.epoll()
        self._poll.register(sock.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        assert self._poll is not None
        return self._poll.fileno()

    def silence(self) -> int:
        """Read every ring waiting on the bell; return how many there were."""
        rings = 0
        while self.bell is not None:
            try:
                self.bell.recv(16)
            except OSError:  # BlockingIOError: none left
                break
            rings += 1
        return rings

    @property
    def connections(self) -> int:
        return len(self._conns)

    def drain(self, limit: int) -> Iterator[Datagram]:
        """Yield up to ``limit`` waiting messages without blocking, connections in turn."""
        assert self._poll is not None
        assert self.sock is not None
        count = 0
        while count < limit:
            ready = self._poll.poll(0)
            if not ready:
                return
            for fd, _events in ready:
                if fd == self.sock.fileno():
                    self._accept()
                    continue
                conn = self._conns.get(fd)
                if conn is None:
                    continue
                for datagram in self._read(conn):
                    yield datagram
                    count += 1
                    if count >= limit:
                        return

    def _accept(self) -> None:
        assert self.sock is not None
        assert self._poll is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors: the agent retries; never stop the loop
                return
            conn.setblocking(False)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            pid, uid, _gid = _CREDS.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
            # Messages sent before SO_PASSCRED took effect carry no credentials: the peer's,
            # taken by the kernel at connect time, stand for them.
            self._peers[conn.fileno()] = (pid, uid)
            self._conns[conn.fileno()] = conn
            self._poll.register(conn.fileno(), select.EPOLLIN)

    def _read(self, conn: socket.socket) -> Iterator[Datagram]:
        space = socket.CMSG_SPACE(_CREDS.size)
        for _ in range(READ_BATCH):
            try:
                data, ancdata, flags, _addr = conn.recvmsg(MAX_DATAGRAM + 1, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if not data and not ancdata:
                self._drop(conn)  # the agent's process closed it (or exited)
                return
            pid, uid = self._peers.get(conn.fileno(), (0, 0))
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _gid = _CREDS.unpack(cdata[: _CREDS.size])
            yield Datagram(data=data, pid=pid, uid=uid,
                           truncated=bool(flags & socket.MSG_TRUNC) or len(data) > MAX_DATAGRAM)

    def _drop(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        self._conns.pop(fd, None)
        self._peers.pop(fd, None)
        if self._poll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._poll.unregister(fd)
        conn.close()

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._poll is not None:
            self._poll.close()
            self._poll = None
        if self.bell is not None:
            self.bell.close()
            self.bell = None
            with contextlib.suppress(FileNotFoundError):
                Path(bell_path(str(self.path))).unlink()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def raise_fd_limit() -> int:
    """One descriptor per agent process: lift the soft limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def _prepare_directory(directory: Path) -> None:
    """Create the socket's directory, or refuse one that other users could tamper with."""
    try:
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise SocketError(
            f"cannot create the socket directory {directory}: {exc.strerror}. "
            f"Choose a writable path with agent.socket or CELERY_MEMGUARD_SOCKET."
        ) from None
    if info.st_uid not in (os.geteuid(), 0):
        raise SocketError(
            f"the socket directory {directory} belongs to uid {info.st_uid}, not to this user "
            f"({os.geteuid()}); another user could replace the socket. Remove it or choose "
            f"another path."
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise SocketError(
            f"the socket directory {directory} is writable by every user; use a private directory."
        )


def _bind(kind: int, path: Path, stale_ok: bool) -> socket.socket:
    """A non-blocking Unix socket bound at ``path`` with mode 0660, never world-writable.

    A socket file already there is probed first (``_remove_stale``); ``stale_ok`` removes it
    unprobed, for the bell, which is bound after the agents' socket proved no daemon is alive.
    """
    if stale_ok and path.is_socket():
        path.unlink()
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o777 & ~SOCKET_MODE)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketError(
            f"cannot bind the agent socket {path}: {exc.strerror}. "
            f"Choose a writable path with agent.socket or CELERY_MEMGUARD_SOCKET."
        ) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, SOCKET_MODE)
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse to steal one that is alive."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EPROTOTYPE):
            raise SocketError(f"cannot check the existing socket {path}: {exc.strerror}") from None
        path.unlink()
        return
    finally:
        probe.close()
    raise SocketError(
        f"another celery-memguard daemon is listening on {path}; stop it or choose another socket."
    )
