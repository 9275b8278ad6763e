"""Parsing of sizes, durations and percentages: the units a config file is written in."""

from __future__ import annotations

import pytest

from celery_memguard.daemon.units import format_bytes, parse_duration, parse_percent, parse_size

GiB = 1024**3


@pytest.mark.parametrize(("text", "expected"), [
    (1048576, 1048576),
    ("512MiB", 512 * 1024**2),
    ("1.5GB", 1_500_000_000),
    ("1GiB", GiB),
    ("100 kib", 102400),
    ("2048", 2048),
    ("25%", 4 * GiB),
    (" 10 % ", int(0.1 * 16 * GiB)),
    (2048.0, 2048),
])
def test_sizes_parse_to_bytes(text: object, expected: int) -> None:
    """Every accepted spelling of a size gives bytes; percentages take the memory total."""
    assert parse_size(text, memory_total=16 * GiB) == expected


@pytest.mark.parametrize(("text", "fragment"), [
    ("512 parsecs", "unknown size unit"),
    ("lots", "expected a size"),
    (-5, "positive"),
    (0, "positive"),
    ("0MiB", "positive"),
    (True, "boolean"),
    ("150%", "outside"),
    (1.5, "whole"),
    (None, "expected a size"),
])
def test_bad_sizes_are_refused_with_a_reason(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text, memory_total=GiB)


def test_percentage_without_a_memory_total_is_refused() -> None:
    """A percentage cannot be resolved when the caller does not know the memory total."""
    with pytest.raises(ValueError, match="total memory is unknown"):
        parse_size("10%", memory_total=None)


@pytest.mark.parametrize(("text", "seconds"), [
    (2, 2.0), (0.5, 0.5), ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("1.5s", 1.5), ("0", 0.0),
])
def test_durations_parse_to_seconds(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "fragment"), [
    (-1, "negative"), ("-1s", "negative"), ("10 fortnights", "unknown duration unit"),
    ("soon", "expected a duration"), (False, "boolean"), (float("nan"), "negative"),
])
def test_bad_durations_are_refused(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize(("text", "fraction"), [("5%", 0.05), (0.2, 0.2), ("100%", 1.0), (0, 0.0)])
def test_percentages(text: object, fraction: float) -> None:
    assert parse_percent(text) == pytest.approx(fraction)


@pytest.mark.parametrize("text", ["5", "120%", -0.1, 2, "five percent", True])
def test_bad_percentages(text: object) -> None:
    with pytest.raises(ValueError, match="percentage"):
        parse_percent(text)


@pytest.mark.parametrize(("size", "text"), [
    (12, "12 B"), (2048, "2.0 KiB"), (125 * 1024**2, "125.0 MiB"), (3 * GiB, "3.0 GiB"),
])
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text
