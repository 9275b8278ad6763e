"""billiard as a release that renamed a method the agent wraps would have it: the pool
worker's ``prepare_result`` is ``_finish_result``, and its job loop calls that instead. The
tasks still run; the agent must notice, say so, and carry on (tests/integration/test_never_silent.py)."""

from __future__ import annotations

import inspect
import textwrap

from billiard import pool


def rename_prepare_result() -> None:
    source = textwrap.dedent(inspect.getsource(pool.Worker.workloop))
    assert "self.prepare_result" in source
    namespace: dict[str, object] = {}
    exec(compile(source.replace("self.prepare_result", "self._finish_result"),  # noqa: S102
                 pool.__file__, "exec"), vars(pool), namespace)
    pool.Worker.workloop = namespace["workloop"]  # type: ignore[method-assign]
    pool.Worker._finish_result = pool.Worker.prepare_result  # type: ignore[attr-defined]
    del pool.Worker.prepare_result
