"""When to try a deferred message again, and when to give up (pure logic).

RFC 5321 §4.5.4.1: "the sender MUST delay retrying a particular destination
after one attempt has failed ... retries continue until the message is
transmitted or the sender gives up; the give-up time generally needs to be at
least 4-5 days."  Coffer waits ``retry_initial`` after the first failure and
doubles the wait after each further one, up to ``retry_max``.  Each wait is
spread by ``±retry_jitter`` (a fraction) so that messages deferred together by
one outage do not all come back in the same second.  After ``max_age`` since
the message was received, a temporary failure becomes a bounce.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gateway.config import QueueConfig


def retry_delay(
    attempts: int, cfg: QueueConfig, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 = first failure)."""
    exponent = max(attempts - 1, 0)
    # Cap the exponent: 2**64 * 300 s is already far beyond any retry_max.
    base = min(cfg.retry_max, cfg.retry_initial * (2.0 ** min(exponent, 64)))
    spread = cfg.retry_jitter * (2.0 * rand() - 1.0)  # uniform in [-jitter, +jitter]
    return max(0.0, base * (1.0 + spread))


def expired(received_at: float, now: float, cfg: QueueConfig) -> bool:
    """Whether a message received at ``received_at`` is too old to retry any more."""
    return now - received_at >= cfg.max_age


def next_attempt(
    received_at: float, attempts: int, now: float, cfg: QueueConfig,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """When to try again after the ``attempts``-th failure; None: give up and bounce.

    The last retry is moved up to the expiry time rather than skipped, so every
    message gets an attempt at (about) ``max_age`` before it is bounced.
    """
    if expired(received_at, now, cfg):
        return None
    at = now + retry_delay(attempts, cfg, rand)
    return min(at, received_at + cfg.max_age)
