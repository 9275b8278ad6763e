"""The release: ``python -m build`` makes the sdist and the wheel without a deprecation warning,
``twine check`` accepts them, and the wheel, installed into a clean virtualenv, runs the command
line. One build serves every test of the module.

The virtualenv is made without pip and filled by this interpreter's pip (``pip --python``),
dependencies included: measured here that takes about 6 s (pip's cache and the local index
answer), against 12 s with a pip of its own, so the full install is kept: it also proves the
wheel's dependency metadata resolves.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

from celery_memguard import __version__
from tests.support import ROOT

NAME = "celery_memguard"
SDIST = f"{NAME}-{__version__}.tar.gz"
WHEEL = f"{NAME}-{__version__}-py3-none-any.whl"


def _run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(arg) for arg in argv], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The dist directory and what the build printed."""
    out = tmp_path_factory.mktemp("dist")
    result = _run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


@pytest.fixture(scope="module")
def venv(built: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtualenv with the wheel and its dependencies installed: its bin directory."""
    root = tmp_path_factory.mktemp("venv") / "clean"
    created = _run(sys.executable, "-m", "venv", "--without-pip", root)
    assert created.returncode == 0, created.stderr
    python = root / "bin" / "python"
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                     built[0] / WHEEL)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return root / "bin"


# -- fast: the changelog and the version --------------------------------------------------------


def test_the_version_is_defined_once() -> None:
    """pyproject.toml reads it from _version.py (tomllib is not in Python 3.10: plain text)."""
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.MULTILINE)
    assert 'dynamic = ["version"]' in text
    assert f'version = {{ attr = "{NAME}._version.__version__" }}' in text
    assert re.search(r'^license = "MIT"$', text, re.MULTILINE)  # SPDX, not the deprecated table


def test_the_changelog_starts_with_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "[Keep a Changelog]" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert versions, "no release section"
    assert versions[0] in (__version__, "Unreleased")
    assert __version__ in versions
    assert re.search(rf"^\[{re.escape(__version__)}\]: ", text, re.MULTILINE), "no link for it"
    first = text.split(f"## [{versions[0]}]", 1)[1].split("\n## [", 1)[0]
    assert re.search(r"^### (Added|Changed|Deprecated|Removed|Fixed|Security)$", first, re.MULTILINE)


# -- slow: the build, twine, the clean virtualenv -------------------------------------------------


@pytest.mark.slow
def test_build_makes_both_without_deprecation_warnings(built: tuple[Path, str]) -> None:
    out, log = built
    assert sorted(path.name for path in out.iterdir()) == sorted([SDIST, WHEEL])
    assert "deprecat" not in log.lower(), [line for line in log.splitlines() if "eprecat" in line]


@pytest.mark.slow
def test_twine_accepts_both(built: tuple[Path, str]) -> None:
    out, _ = built
    result = _run(sys.executable, "-m", "twine", "check", "--strict", out / SDIST, out / WHEEL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


@pytest.mark.slow
def test_the_wheel_is_typed_licensed_and_holds_only_the_package(built: tuple[Path, str]) -> None:
    with zipfile.ZipFile(built[0] / WHEEL) as wheel:
        names = wheel.namelist()
        info = f"{NAME}-{__version__}.dist-info"
        metadata = HeaderParser().parsestr(wheel.read(f"{info}/METADATA").decode())
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert f"{NAME}/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert {name.split("/")[0] for name in names} == {NAME, info}
    assert metadata["Version"] == __version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert "celery-memguard = celery_memguard.cli:main" in entry_points


@pytest.mark.slow
def test_the_sdist_carries_tests_docs_deploy_assets_and_changelog(built: tuple[Path, str]) -> None:
    with tarfile.open(built[0] / SDIST) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("CHANGELOG.md", "LICENSE", "README.md", "config.example.yaml", "Makefile",
                   f"{NAME}/py.typed", "deploy/prometheus/fleet_rules.yaml",
                   "deploy/grafana/celery-memguard.json", "docs/operations.md",
                   "tests/conftest.py", "scripts/ensure-tools"):
        assert needed in names, needed
    assert not [name for name in names if name.endswith(".pyc")]


@pytest.mark.slow
def test_the_wheel_runs_from_a_clean_virtualenv(venv: Path, tmp_path: Path) -> None:
    """From a directory without the checkout: what runs is what the wheel installed."""
    where = _run(venv / "python", "-c", f"import {NAME}; print({NAME}.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv.parent), where.stdout
    version = _run(venv / "celery-memguard", "--version", cwd=tmp_path)
    assert version.stdout.strip() == f"celery-memguard {__version__}"
    valid = _run(venv / "celery-memguard", "check-config", ROOT / "config.example.yaml", cwd=tmp_path)
    assert valid.returncode == 0, valid.stderr
    assert "valid" in valid.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {sotf: 1GiB}\n")
    invalid = _run(venv / "celery-memguard", "check-config", bad, cwd=tmp_path)
    assert invalid.returncode == 2
    assert "limits.sotf" in invalid.stderr
    demo = _run(venv / "celery-memguard", "demo", "--help", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "--duration" in demo.stdout
