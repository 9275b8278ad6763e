"""Where the agent and the daemon meet: the socket and the files the daemon keeps beside it."""

from __future__ import annotations

import os

SOCKET_ENV = "CELERY_MEMGUARD_SOCKET"
DEFAULT_SOCKET = "/tmp/celery-memguard/agent.sock"  # noqa: S108 - documented default; the daemon checks the directory's owner


def socket_path(configured: str | None = None) -> str:
    """The socket as both sides pick it: the environment variable, else what the caller was
    configured with (``agent.socket``, ``install(app, socket=...)``), else the default."""
    return os.environ.get(SOCKET_ENV) or configured or DEFAULT_SOCKET


def settings_path(socket: str) -> str:
    """The settings every child reads (protocol.settings)."""
    return socket + ".settings.json"


def bell_path(socket: str) -> str:
    """The daemon's doorbell: a datagram socket beside the agents' socket. Reports reach the
    daemon in batches; a child whose report calls for a decision rings it to be heard now."""
    return socket + ".bell"


def quarantine_path(socket: str) -> str:
    """The task ids no child may run again (protocol.quarantine)."""
    return socket + ".quarantine.json"


def grant_path(socket: str, worker_pid: int) -> str:
    """One worker's grant file (protocol.grants)."""
    return f"{socket}.grant.{worker_pid}"


def room_path(socket: str, worker_pid: int) -> str:
    """One worker's room file: its tasks' needs, and the tasks starting (protocol.room)."""
    return f"{socket}.room.{worker_pid}"


def trace_path(socket: str, worker_pid: int) -> str:
    """One worker's trace request: which child traces which task (protocol.forensics)."""
    return f"{socket}.trace.{worker_pid}"


def trace_glob(socket: str) -> str:
    return os.path.basename(socket) + ".trace.*"


def room_glob(socket: str) -> str:
    return os.path.basename(socket) + ".room.*"


def grant_glob(socket: str) -> str:
    """The file name pattern of every worker's grant file, in the socket's directory."""
    return os.path.basename(socket) + ".grant.*"
