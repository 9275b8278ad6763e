"""Where the files of a traceback live: the user's code, the standard library, Celery's stack.

A leak site is the innermost frame of the user's code in an allocation's traceback: the line
in the task (or in what it calls) that keeps the memory, not the line of ``json`` or of
Celery's trace function through which it got there.
"""

from __future__ import annotations

import contextlib
import site
import sys
import sysconfig
from pathlib import Path

Frame = tuple[str, int, str]  # file, line, function ("" where the tool does not know it)
Key = tuple[Frame, ...]  # an allocation's traceback, innermost first
AGENT_DIR = str(Path(__file__).resolve().parent)
# Celery's own stack: frames there are how a task is called, not what it does.
CELERY_STACK = ("celery", "billiard", "kombu", "vine", "amqp", "redis", "click",
                "celery_memguard")


class _Where:
    """Where files live: the standard library, site-packages, Celery's own packages."""

    def __init__(self) -> None:
        paths = sysconfig.get_paths()
        self.stdlib = tuple({paths["stdlib"], paths["platstdlib"]})
        sites = {paths["purelib"], paths["platlib"]}
        with contextlib.suppress(AttributeError):  # old virtualenvs lack it
            sites.update(site.getsitepackages())
        self.sites = tuple(sites)
        files = (getattr(sys.modules.get(name), "__file__", None) for name in CELERY_STACK)
        self.stack = tuple(str(Path(file).resolve().parent) for file in files if file)
        self._cache: dict[str, bool] = {}

    def user(self, filename: str) -> bool:
        """A file of the user's code: not the standard library, not Celery's stack, not the
        interpreter's frozen modules."""
        known = self._cache.get(filename)
        if known is None:
            known = not (filename.startswith("<")
                         or (filename.startswith(self.stdlib)
                             and not filename.startswith(self.sites))
                         or filename.startswith(self.stack))
            if len(self._cache) < 4096:
                self._cache[filename] = known
        return known



_where: _Where | None = None


def where() -> _Where:
    """Read once per process, when a trace first needs it (Celery's packages are imported)."""
    global _where
    if _where is None:
        _where = _Where()
    return _where
