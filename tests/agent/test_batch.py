"""A child's batch of task ends: however full it gets, it fits one message."""

from __future__ import annotations

import pytest

from celery_memguard.agent.batch import Batch
from celery_memguard.protocol import messages


@pytest.mark.parametrize("char", ["n", "\u00e9", "\U0001f600", '"'])
def test_the_fullest_batch_an_agent_sends_fits_one_message(char: str) -> None:
    """Long names (escaped six or twelve bytes a character) and the largest numbers: the
    agent sends its batch before it passes the size the daemon reads."""
    batch = Batch()
    n = 0
    while not batch.due(0.0):
        name = char * (messages.MAX_NAME - 4) + f"{n % 97:03d}"
        batch.add(n + 1, name, 2**62 - 1, 2**62 - 1, True, 0.0)
        n += 1
    message = batch.take(2**31, 2**31, 1023, 2**31 / 1000 - 1)
    assert messages.decode(messages.encode(message)) == message
