"""The daemon's end of the agent socket: bind it safely, read datagrams with their sender.

The kernel attaches the sender's pid and uid to every datagram (SO_PASSCRED), so a message
that claims to come from another process is recognised as forged before it is decoded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery_memguard.wire import MAX_DATAGRAM

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
SOCKET_MODE = 0o660
DIR_MODE = 0o755
RECV_BUFFER = 4 * 1024 * 1024


class SocketError(Exception):
    """The socket cannot be bound; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class Datagram:
    data: bytes
    pid: int  # the sender's pid as the kernel saw it; 0 when unknown
    uid: int
    truncated: bool


class Inbox:
    """A bound, non-blocking Unix datagram socket; ``drain`` yields what is waiting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None

    def open(self) -> None:
        _prepare_directory(self.path.parent)
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise SocketError(
                f"cannot bind the agent socket {self.path}: {exc.strerror}. "
                f"Choose a writable path with agent.socket or CELERY_MEMGUARD_SOCKET."
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        sock.setblocking(False)
        self.sock = sock

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def drain(self, limit: int) -> Iterator[Datagram]:
        """Yield up to ``limit`` waiting datagrams without blocking."""
        assert self.sock is not None
        space = socket.CMSG_SPACE(_CREDS.size)
        for _ in range(limit):
            try:
                data, ancdata, flags, _addr = self.sock.recvmsg(MAX_DATAGRAM + 1, space)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            pid = uid = 0
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _gid = _CREDS.unpack(cdata[: _CREDS.size])
            yield Datagram(data=data, pid=pid, uid=uid,
                           truncated=bool(flags & socket.MSG_TRUNC) or len(data) > MAX_DATAGRAM)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


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


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a daemon that died; refuse to steal one that is alive."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it.")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"cannot check the existing socket {path}: {exc.strerror}") from None
        path.unlink()
        return
    finally:
        probe.close()
    raise SocketError(
        f"another celery-memguard daemon is listening on {path}; stop it or choose another socket."
    )
