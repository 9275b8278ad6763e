"""memray as the forensics tool: native stacks too, for leaks Python's allocators never see.

Imported only when a trace request names memray (``forensics.tool: memray``), so that a
worker without the extra (``pip install celery-memguard[memray]``) never loads it. One memray
Tracker per traced call, into a file of its own: what is left allocated when the call ends is
what that call left behind. Unlike tracemalloc's snapshot differences, a call that frees what
an earlier call kept is not counted against it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import memray

from celery_memguard.agent.code_paths import AGENT_DIR, Frame, Key, where

ALLOCATORS = {"malloc", "calloc", "realloc", "free", "posix_memalign", "aligned_alloc",
              "memalign", "valloc", "pvalloc", "mmap", "mmap64", "<unknown>"}
INTERPRETER_FUNCTIONS = ("_Py", "Py", "ffi_", "_ctypes", "_call_function_pointer")
INTERPRETER_SOURCES = ("Objects/", "Python/", "Include/", "./Include/", "Modules/", "Parser/")


class MemrayTool:
    name = "memray"
    in_body = False  # a Tracker started from a trace function records nothing: the whole job

    def __init__(self, frames: int) -> None:
        self.frames = frames
        self.directory: str | None = None
        self._tracker: Any = None
        self._path = ""
        self._calls = 0

    def start(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="celery-memguard-memray-")

    def before_call(self) -> None:
        assert self.directory is not None
        self._calls += 1
        self._path = os.path.join(self.directory, f"call-{self._calls}.bin")
        tracker = memray.Tracker(self._path, native_traces=True)
        tracker.__enter__()
        self._tracker = tracker

    def after_call(self) -> object:
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return None
        tracker.__exit__(None, None, None)
        return self._path

    def left(self, taken: object) -> dict[Key, tuple[int, int]]:
        if not isinstance(taken, str):
            return {}
        left: dict[Key, tuple[int, int]] = {}
        reader = memray.FileReader(taken)
        try:
            for record in reader.get_leaked_allocation_records(merge_threads=True):
                stack = record.hybrid_stack_trace(max_stacks=3 * self.frames)
                key: Key = tuple((file, line, function) for function, file, line in stack)
                if any(file.startswith(AGENT_DIR) for file, _, _ in key):
                    continue  # the agent's own thread
                size, blocks = left.get(key, (0, 0))
                left[key] = (size + record.size, blocks + record.n_allocations)
        finally:
            reader.close()
            os.unlink(taken)
        return left

    def overhead(self) -> int:
        return 0  # memray writes to its file as it goes: what it holds is not the task's

    def user(self, frame: Frame) -> bool:
        """Python frames of the user's code, and native frames outside the interpreter (the
        libraries and extensions that allocate)."""
        file, _line, function = frame
        if file.endswith(".py") or file.startswith("<frozen"):
            return where().user(file)
        return not (function in ALLOCATORS or function.startswith(INTERPRETER_FUNCTIONS)
                    or file.startswith(INTERPRETER_SOURCES) or "/Modules/" in file
                    or "/Objects/" in file)

    def stop(self) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
