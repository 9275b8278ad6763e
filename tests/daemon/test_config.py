"""The config contract: defaults, units, refusals that name the key, the socket override."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from celery_memguard.cli import main
from celery_memguard.daemon import config
from celery_memguard.daemon.config import ConfigError
from tests.support import ROOT

GiB = 1024**3


def test_empty_file_gives_the_documented_defaults() -> None:
    cfg = config.parse(None, env={})
    assert cfg.limits.soft == 512 * 1024**2
    assert cfg.limits.hard == GiB
    assert cfg.limits.kill_after == 10.0
    assert cfg.sampling.interval == 1.0
    assert cfg.metrics.listen == "127.0.0.1:9808"
    assert cfg.recycle.jitter == pytest.approx(0.05)
    assert cfg.recycle.max_per_minute == 6
    assert cfg.recycle.dry_run is False
    assert str(cfg.agent.socket) == config.DEFAULT_SOCKET


def test_example_config_loads_and_matches_the_defaults() -> None:
    """config.example.yaml documents every key with its default, so it cannot rot."""
    example = config.load(ROOT / "config.example.yaml", memory_total=8 * GiB, env={})
    assert example == config.parse({}, memory_total=8 * GiB, env={})
    keys = {f"{section}.{key}" for section, model in config.Config.model_fields.items()
            if section != "workers"
            for key in model.annotation.model_fields}  # type: ignore[union-attr]
    assert "\nworkers: []\n" in (ROOT / "config.example.yaml").read_text()
    text = (ROOT / "config.example.yaml").read_text()
    missing = [key for key in keys if f"  {key.split('.')[1]}:" not in text]
    assert missing == []


def test_units_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("limits: {soft: 25%, hard: 1.5GB, kill_after: 250ms}\nsampling: {interval: 250ms}\n"
                    "recycle: {jitter: 10%, max_share: 1}\n")
    cfg = config.load(path, memory_total=4 * GiB, env={})
    assert cfg.limits.soft == GiB
    assert cfg.limits.hard == 1_500_000_000
    assert cfg.limits.kill_after == 0.25
    assert cfg.sampling.interval == 0.25
    assert cfg.recycle.jitter == pytest.approx(0.1)
    assert cfg.recycle.max_share == 1.0


def test_socket_environment_variable_overrides_the_file() -> None:
    cfg = config.parse({"agent": {"socket": "/from/file.sock"}},
                       env={config.SOCKET_ENV: "/from/env.sock"})
    assert str(cfg.agent.socket) == "/from/env.sock"


def test_forensics_results_live_beside_the_socket_unless_a_directory_is_given() -> None:
    cfg = config.parse({"agent": {"socket": "/run/mg/agent.sock"}}, env={})
    assert str(cfg.forensics_dir) == "/run/mg/forensics"
    cfg = config.parse({"forensics": {"dir": "/var/lib/mg"}}, env={})
    assert str(cfg.forensics_dir) == "/var/lib/mg"


def test_config_is_frozen() -> None:
    cfg = config.parse({}, env={})
    with pytest.raises(ValueError, match="frozen"):
        cfg.limits.soft = 1  # type: ignore[misc]


@pytest.mark.parametrize(("text", "key", "fragment"), [
    ("limits: {soft: 2GiB, hard: 1GiB}", "limits.soft", "must be below limits.hard"),
    ("limits: {soft: 1GiB}", "limits.soft", "must be below limits.hard"),
    ("limits: {soft: big}", "limits.soft", "expected a size"),
    ("limits: {hard: 12 parsecs}", "limits.hard", "unknown size unit"),
    ("sampling: {interval: -1s}", "sampling.interval", "negative"),
    ("sampling: {interval: -2}", "sampling.interval", "negative"),
    ("sampling: {interval: 0}", "sampling.interval", "at least 10ms"),
    ("limits: {sotf: 1GiB}", "limits.sotf", "unknown key"),
    ("limit: {soft: 1GiB}", "limit", "unknown key"),
    ("limits: {soft: 100MiB}\n  bad: [", "<yaml>", "not valid YAML at line"),
    ("metrics: {listen: 'localhost:99999'}", "metrics.listen", "outside 1..65535"),
    ("metrics: {listen: 'no-port'}", "metrics.listen", "host:port"),
    ("metrics: {listen: 'example.invalid:80'}", "metrics.listen", "not an IP address"),
    ("metrics: {listen: '127.0.0.1:http'}", "metrics.listen", "not a number"),
    ("recycle: {max_per_minute: 0}", "recycle.max_per_minute", "greater than or equal to 1"),
    ("recycle: {jitter: 200%}", "recycle.jitter", "outside"),
    ("recycle: {dry_run: perhaps}", "recycle.dry_run", "boolean"),
    ("limits: {measure: vsz}", "limits.measure", "'rss', 'uss' or 'pss'"),
    ("- just a list", "<top>", "mapping"),
    ("forensics: {tool: objgraph}", "forensics.tool", "'tracemalloc' or 'memray'"),
    ("forensics: {calls: 0}", "forensics.calls", "greater than or equal to 1"),
    ("forensics: {frames: 500}", "forensics.frames", "less than or equal to 100"),
    ("forensics: {cooldown: 0s}", "forensics.cooldown", "between 1s and a week"),
    ("forensics: {timeout: 200h}", "forensics.timeout", "between 1s and a week"),
])
def test_bad_configs_are_refused_naming_the_key(tmp_path: Path, text: str, key: str,
                                                fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path, memory_total=8 * GiB, env={})
    assert info.value.key == key
    assert fragment in info.value.reason


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("text", "code"), [
    ("limits: {soft: 100MiB, hard: 200MiB}\n", 0),
    ("limits: {soft: 300MiB, hard: 200MiB}\n", 2),
    ("limits: {soft: [\n", 2),
])
def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                 code: int) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == code
    out = capsys.readouterr()
    if code:
        assert out.err.count("\n") == 1
        assert "invalid:" in out.err
    else:
        assert "valid" in out.out


def test_check_config_command_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    """The installed command refuses a bad file with exit 2 and one line naming the key."""
    path = tmp_path / "c.yaml"
    path.write_text("limits:\n  soft: 2GiB\n  hard: 1GiB\n")
    done = subprocess.run([sys.executable, "-m", "celery_memguard", "check-config", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"{path}: invalid: limits.soft: soft (2147483648 bytes) must be below limits.hard "
        f"(1073741824 bytes)"]


def test_check_config_refuses_a_listen_address_this_host_does_not_have(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """192.0.2.1 (TEST-NET-1) parses but cannot be bound here: exit 2 naming metrics.listen;
    loopback passes, also when its port is taken (by the daemon the file configures)."""
    path = tmp_path / "c.yaml"
    path.write_text("metrics: {listen: '192.0.2.1:9808'}\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "invalid: metrics.listen: 192.0.2.1 is not an address of this host" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path.write_text(f"metrics: {{listen: '127.0.0.1:{taken.getsockname()[1]}'}}\n")
        assert main(["check-config", str(path)]) == 0


def test_the_configuration_reference_is_generated_from_the_models() -> None:
    """docs/configuration.md is exactly what the generator prints, and names every key."""
    text = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_reference.py")],
                          capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "configuration.md").read_text() == text, (
        "regenerate: python scripts/config_reference.py > docs/configuration.md")
    for section, model in config.Config.model_fields.items():
        if section == "workers":
            assert "`workers[].match`" in text
            continue
        for key in model.annotation.model_fields:  # type: ignore[union-attr]
            assert f"`{section}.{key}`" in text


def test_per_worker_limits_inherit_the_top_level_and_match_by_nodename() -> None:
    cfg = config.parse({"limits": {"soft": "100MiB", "hard": "300MiB", "kill_after": "3s"},
                        "workers": [{"match": "reports@*", "limits": {"soft": "1GiB", "hard": "2GiB"}},
                                    {"match": "*@big-*", "limits": {"hard": "400MiB"}}]},
                       memory_total=8 * GiB, env={})
    reports = cfg.limits_for("reports@host1")
    assert (reports.soft, reports.hard, reports.kill_after) == (GiB, 2 * GiB, 3.0)
    big = cfg.limits_for("w@big-box")
    assert (big.soft, big.hard) == (100 * 1024**2, 400 * 1024**2)
    assert cfg.limits_for("other@host") is cfg.limits


@pytest.mark.parametrize(("workers", "key"), [
    ([{"match": "a@*", "limits": {"soft": "2GiB"}}], "workers.0.limits.soft"),
    ([{"match": "a@*", "limits": {"sotf": "1GiB"}}], "workers.0.limits.sotf"),
    ([{"limits": {"soft": "1MiB"}}], "workers.0.match"),
    ([{"match": "a@*", "limits": {}, "extra": 1}], "workers.0.extra"),
])
def test_bad_per_worker_limits_name_the_entry(workers: list[object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse({"limits": {"soft": "100MiB", "hard": "1GiB"}, "workers": workers},
                     memory_total=8 * GiB, env={})
    assert info.value.key == key


SOURCED = {"limits": {"soft": "25%", "hard": "3GiB"},
           "workers": [{"match": "big@*", "limits": {"hard": "2.5GiB", "container_soft": "80%"}}]}


@pytest.mark.parametrize(("worker", "level", "source"), [
    ("big@h", "hard", "workers[0] (match 'big@*') limits.hard"),
    ("big@h", "soft", "limits.soft = 25% of 8.0 GiB (cgroup memory as the daemon sees it)"),
    ("big@h", "container_soft", "workers[0] (match 'big@*') limits.container_soft = 80% of the "
                                "container's limit"),
    ("big@h", "container_hard", "default"),
    ("small@h", "hard", "limits.hard"),
    ("small@h", "container_soft", "default"),
])
def test_each_limit_in_force_says_where_it_comes_from(worker: str, level: str, source: str) -> None:
    cfg = config.parse(SOURCED, memory_total=8 * GiB, env={})
    assert cfg.limit_sources(worker, (8 * GiB, "cgroup"))[level] == source


@pytest.mark.parametrize(("data", "env", "source"), [
    ({}, {}, "default"),
    ({"agent": {"socket": "/run/m/agent.sock"}}, {}, "agent.socket"),
    ({"agent": {"socket": "/run/m/agent.sock"}}, {"CELERY_MEMGUARD_SOCKET": "/x.sock"},
     "the environment variable CELERY_MEMGUARD_SOCKET"),
])
def test_the_socket_path_says_where_it_comes_from(data: dict[str, object], env: dict[str, str],
                                                  source: str) -> None:
    assert config.parse(data, env=env).socket_source == source


def test_where_a_setting_came_from_does_not_make_two_configs_differ() -> None:
    written = config.parse({"limits": {"soft": "512MiB"}}, env={})
    assert written == config.parse({}, env={})
    assert hash(written) == hash(config.parse({}, env={}))
