"""The folders mean what they say: each side of the socket imports only what it may.

Every import in the package is read (also those inside functions, where the agent and the CLI
defer theirs), so a change that breaks a rule fails here, naming the module and the import.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT

PACKAGE = "celery_memguard"
SOURCE = ROOT / PACKAGE

# What each side may import from outside the package (besides the standard library).
AGENT_THIRD_PARTY = {"celery", "billiard"}
# Optional extras the agent may use, each through one module of its own which the rest of the
# agent imports only inside a function, when a request asks for it: a worker without the extra
# installed never loads it. memray: ``forensics.tool: memray`` (pip install celery-memguard[memray]).
AGENT_OPTIONAL = {"memray": f"{PACKAGE}.agent.forensics_memray"}
DAEMON_FORBIDDEN_THIRD_PARTY = {"celery", "billiard", "kombu", "rich"}
# The daemon's pure modules: a snapshot and the config in, values out; no OS, no loop.
PURE = {"policy", "container_policy", "leak_trend", "task_growth", "state", "records", "reports",
        "config", "units", "readings", "snapshot", "decision", "view", "leak_sites",
        "forensics_plan"}
# The rest of the daemon: the OS seam, the loop, metrics, and what drives them. A pure module
# imports pure ones only, so no pure module reaches these through another one either.
IMPURE = {"procs", "loop", "supervisor", "metrics", "http", "status", "actions", "inbox",
          "publisher", "sampler", "forensics", "forensics_store", "containers", "pressure"}
# The demo's Celery app stands for a user's app: it calls the public API as users do.
MAY_IMPORT_THE_ROOT = {f"{PACKAGE}.cli.demo_app"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in SOURCE.rglob("*.py")}


@functools.cache
def imports(name: str) -> tuple[tuple[str, int], ...]:
    """(imported module, line) for every import in module ``name``, type-checking-only ones
    excepted. ``from a import b`` names ``a.b`` when that is a module of the package."""
    return tuple(_imports(name))


def _imports(name: str) -> Iterator[tuple[str, int]]:
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in MODULES else base), node.lineno


@functools.cache
def module_level(name: str) -> frozenset[int]:
    """The lines of module ``name``'s imports that run when it is imported (outside any
    function)."""
    path = MODULES[name]
    lines: set[int] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            lines.add(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return frozenset(lines)


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def is_stdlib(module: str) -> bool:
    return top(module) in sys.stdlib_module_names or top(module) == "__future__"


def violations() -> dict[str, list[str]]:
    """Rule name -> the imports that break it, as 'module:line imports target'."""
    found: dict[str, list[str]] = {}

    def bad(rule: str, name: str, line: int, target: str) -> None:
        found.setdefault(rule, []).append(f"{name}:{line} imports {target}")

    for name in MODULES:
        side = name.split(".")[1] if name.count(".") >= 1 else ""
        leaf = name.rsplit(".", 1)[-1]
        for target, line in imports(name):
            if target == PACKAGE and name not in MAY_IMPORT_THE_ROOT and name != PACKAGE:
                bad("no module imports the package root", name, line, target)
            if side == "protocol" and not (is_stdlib(target)
                                           or target.startswith(f"{PACKAGE}.protocol")):
                bad("protocol imports only the standard library", name, line, target)
            if AGENT_OPTIONAL.get(top(target)) not in (None, name):
                bad("an optional extra is imported by its own module only", name, line, target)
            if target in AGENT_OPTIONAL.values() and line in module_level(name):
                bad("an optional extra's module is imported inside a function only",
                    name, line, target)
            if side == "agent" and not (
                    is_stdlib(target) or top(target) in AGENT_THIRD_PARTY
                    or AGENT_OPTIONAL.get(top(target)) == name
                    or target.startswith((f"{PACKAGE}.protocol", f"{PACKAGE}.agent"))
                    or target in (f"{PACKAGE}.errors", f"{PACKAGE}._version")):
                bad("agent imports the standard library, Celery, billiard and protocol only",
                    name, line, target)
            if side == "daemon":
                if top(target) in DAEMON_FORBIDDEN_THIRD_PARTY or target.startswith(
                        (f"{PACKAGE}.agent", f"{PACKAGE}.cli")):
                    bad("the daemon imports neither Celery nor the agent nor the CLI",
                        name, line, target)
                if (leaf in PURE and target.startswith(f"{PACKAGE}.daemon.")
                        and target.rsplit(".", 1)[-1] not in PURE):
                    bad("the daemon's pure modules import no OS seam, loop or metrics",
                        name, line, target)
                if leaf in PURE and top(target) in {"psutil", "prometheus_client"}:
                    bad("the daemon's pure modules import no OS seam, loop or metrics",
                        name, line, target)
            if side in ("errors", "_version") and not is_stdlib(target):
                bad("errors and the version import only the standard library", name, line, target)
    return found


def cycles() -> list[list[str]]:
    """Import cycles among the package's modules (deferred imports included)."""
    graph = {name: sorted({t for t, _ in imports(name) if t in MODULES and t != name})
             for name in MODULES}
    seen: set[str] = set()
    found: list[list[str]] = []
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:
        seen.add(node)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt in on_stack:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        on_stack.discard(node)

    for name in sorted(graph):
        if name not in seen:
            visit(name)
    return found


def test_the_three_programs_have_a_folder_each() -> None:
    """The agent, the protocol, the daemon and the CLI are folders of their own."""
    for side in ("agent", "protocol", "daemon", "cli"):
        assert (SOURCE / side / "__init__.py").exists(), side


@pytest.mark.parametrize("rule", [
    "no module imports the package root",
    "an optional extra is imported by its own module only",
    "an optional extra's module is imported inside a function only",
    "protocol imports only the standard library",
    "agent imports the standard library, Celery, billiard and protocol only",
    "the daemon imports neither Celery nor the agent nor the CLI",
    "the daemon's pure modules import no OS seam, loop or metrics",
    "errors and the version import only the standard library",
])
def test_import_rule(rule: str) -> None:
    broken = violations().get(rule, [])
    assert not broken, f"{rule}:\n" + "\n".join(broken)


def test_every_daemon_module_is_pure_or_not() -> None:
    """A new daemon module is put on one side: an unlisted one would escape the rule above."""
    daemon = {name.rsplit(".", 1)[-1] for name in MODULES
              if name.startswith(f"{PACKAGE}.daemon.")}
    assert not PURE & IMPURE
    assert daemon == PURE | IMPURE, f"unlisted: {sorted(daemon - PURE - IMPURE)}, " \
                                    f"gone: {sorted((PURE | IMPURE) - daemon)}"


def test_no_import_cycles() -> None:
    found = cycles()
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_the_reader_sees_deferred_and_relative_imports() -> None:
    """The checks above would pass vacuously if the reader missed imports: it must see the
    agent's deferred billiard import and the root's deferred import of the agent."""
    agent_imports = {t for t, _ in imports(f"{PACKAGE}.agent.pool_child")}
    assert "billiard.pool" in agent_imports
    assert f"{PACKAGE}.agent.install" in {t for t, _ in imports(PACKAGE)}
    assert "celery" not in {t for t, _ in imports(PACKAGE)}  # only under TYPE_CHECKING
    optional = f"{PACKAGE}.agent.forensics_memray"
    assert optional in {t for t, _ in imports(f"{PACKAGE}.agent.forensics")}
    assert not {line for t, line in imports(f"{PACKAGE}.agent.forensics") if t == optional} & (
        module_level(f"{PACKAGE}.agent.forensics")), "deferred, inside make_tool"
    assert "memray" in {t for t, _ in imports(optional)}


def test_no_class_reaches_300_lines() -> None:
    """A class that grows past this mixes jobs: the supervisor's loop timing, sampling and
    publishing were one 469-line class once. Split it into collaborators instead."""
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines >= 300:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)


def test_the_readme_layout_names_every_module() -> None:
    """The README's Layout is where a newcomer learns the tree: a new module is named there."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = sorted({path.name for path in SOURCE.rglob("*.py") if path.name not in layout})
    assert not missing, f"not in the README's Layout: {missing}"
