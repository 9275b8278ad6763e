"""The rules both sides of the socket agree on, as tables (the jitter's are in
test_thresholds_agree.py)."""

from __future__ import annotations

import pytest

from celery_memguard.protocol import rules
from tests.builders import MiB


@pytest.mark.parametrize(("tasks", "rss_mib", "fresh_mib", "soft_mib", "grown"), [
    (20, 70, 40, 100, True),    # half its way from a fresh child's 40 MiB to 100: a leak
    (20, 69, 40, 100, False),   # not yet half
    (19, 99, 40, 100, False),   # too few tasks: a warm-up, not a leak
    (500, 150, 120, 100, False),  # a fresh child is over the limit already: a storm
    (500, 150, None, 100, False),  # no fresh size known
])
def test_a_child_grown_to_its_limit_by_a_leak_is_told_from_a_storm(
        tasks: int, rss_mib: int, fresh_mib: int | None, soft_mib: int, grown: bool) -> None:
    fresh = fresh_mib * MiB if fresh_mib is not None else None
    assert rules.grown(tasks, rss_mib * MiB, fresh, soft_mib * MiB) is grown
