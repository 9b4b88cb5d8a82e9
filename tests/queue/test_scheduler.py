"""Retry timing: exponential backoff with jitter, capped, and a give-up age (pure)."""

from __future__ import annotations

from gateway.config import QueueConfig
from gateway.queue.scheduler import expired, next_attempt, retry_delay

CFG = QueueConfig(retry_initial=60, retry_max=600, retry_jitter=0.2, max_age=86400)


def test_delay_doubles_from_the_initial_value_up_to_the_maximum() -> None:
    mid = lambda: 0.5  # noqa: E731 - no jitter at the middle of the range
    assert [retry_delay(n, CFG, mid) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_jitter_spreads_delays_within_the_configured_fraction() -> None:
    assert retry_delay(1, CFG, lambda: 0.0) == 48.0
    assert retry_delay(1, CFG, lambda: 1.0) == 72.0
    assert retry_delay(200, CFG, lambda: 1.0) == 720.0  # huge attempt counts do not overflow


def test_next_attempt_never_passes_the_expiry_and_none_once_expired() -> None:
    received = 1000.0
    assert next_attempt(received, 1, received + 10, CFG, lambda: 0.5) == received + 70
    near_end = received + 86400 - 5
    assert next_attempt(received, 9, near_end, CFG, lambda: 0.5) == received + 86400
    assert next_attempt(received, 9, received + 86400, CFG) is None
    assert expired(received, received + 86400, CFG)
    assert not expired(received, received + 86399, CFG)
