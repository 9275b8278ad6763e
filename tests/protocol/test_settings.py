"""The settings file: it round-trips; anything malformed is ignored, never half applied."""

from __future__ import annotations

import pytest

from celery_memguard.protocol import settings


def test_settings_round_trip_and_bad_settings_are_ignored() -> None:
    published = settings.AgentSettings(hard=300 * 1024 * 1024, watch_interval=0.01, ahead=2)
    assert settings.decode(settings.encode(published)) == published
    for bad in (b"", b"{", b"[]", b'{"v":1,"hard":-1,"watch_interval":0.01}',
                b'{"v":1,"hard":1,"watch_interval":0.01,"ahead":-1}',
                b'{"v":1,"hard":1,"watch_interval":0.01,"ahead":true}',
                b'{"v":1,"hard":1,"watch_interval":60}', b'{"v":1,"hard":1,"watch_interval":true}',
                b'{"v":2,"hard":1,"watch_interval":0.01}', b'{"v":1,"hard":"1","watch_interval":0.01}'):
        assert settings.decode(bad) is None


def test_settings_carry_per_worker_limits_matched_by_nodename() -> None:
    published = settings.AgentSettings(
        hard=300, watch_interval=0.01, soft=100, jitter=0.05, max_share=0.25,
        container_soft=0.8, container_hold=12.0,
        workers=(("reports@*", 3000, 1000, "uss", None),))
    decoded = settings.decode(settings.encode(published))
    assert decoded == published
    assert decoded.for_worker("reports@h1") == settings.ChildLimits(3000, 1000, "uss", None)
    assert decoded.for_worker("default@h1") == settings.ChildLimits(300, 100, "rss", 0.8)


def test_settings_from_a_daemon_without_container_lines_have_none() -> None:
    data = (b'{"v": 1, "hard": 300, "watch_interval": 0.01, "soft": 100, "jitter": 0.05,'
            b' "workers": [["reports@*", 3000, 1000, "uss"]]}')
    decoded = settings.decode(data)
    assert decoded is not None
    assert (decoded.container_soft, decoded.container_hold) == (None, 0.0)
    assert decoded.for_worker("reports@h1").container_soft is None


@pytest.mark.parametrize("bad", [b'"container_soft": 0', b'"container_soft": 1.5',
                                 b'"container_hold": -1', b'"container_soft": "85%"'])
def test_settings_with_container_lines_out_of_range_are_refused(bad: bytes) -> None:
    data = b'{"v": 1, "hard": 300, "watch_interval": 0.01, ' + bad + b'}'
    assert settings.decode(data) is None


def test_settings_from_a_daemon_without_measures_per_worker_read_as_rss() -> None:
    data = (b'{"v": 1, "hard": 300, "watch_interval": 0.01, "soft": 100, "jitter": 0.05,'
            b' "workers": [["reports@*", 3000, 1000]]}')
    decoded = settings.decode(data)
    assert decoded is not None
    assert decoded.for_worker("reports@h1") == settings.ChildLimits(3000, 1000, "rss")
    assert (decoded.dry_run, decoded.min_lifetime, decoded.skip_within_tasks) == (False, 0.0, 0)
    assert decoded.max_share is None  # unknown: the children keep the full jitter


@pytest.mark.parametrize("share", ["0.5", "1.5", "-0.1", "true", "[0.5]"])
def test_settings_with_a_share_out_of_range_are_refused(share: str) -> None:
    data = (b'{"v": 1, "hard": 300, "watch_interval": 0.01, "soft": 100, "jitter": 0.05,'
            b' "max_share": ' + share.encode() + b'}')
    assert (settings.decode(data) is None) is (share != "0.5")
