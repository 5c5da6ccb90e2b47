"""The one backoff: how long to wait before the next try of anything that failed.

Every retry, respawn and re-open of the host waits ``compute_backoff``: a job's
retry (QUEUE_DELAY), a worker or service child that keeps dying, a failed
preload, a breaker opened again, a provider call the server refused for load.
Like dramatiq's ``compute_backoff``: ``base * factor ** (attempts - 1)``,
capped, with jitter so that what failed together does not come back together.
"""

from __future__ import annotations

import random

MAX_EXPONENT = 30  # past 2**30 every cap has long been reached; keeps the float finite


def compute_backoff(
    attempts: int,
    base: float,
    *,
    cap: float,
    factor: float = 2.0,
    jitter: str = "none",
    rand: random.Random | None = None,
) -> float:
    """The wait before try ``attempts`` + 1, after ``attempts`` failed ones (1: the first failed).

    ``jitter``: "none"; "equal" (half fixed, half random: between half and the
    whole wait); "up" (up to a fifth more, never less: a breaker must not
    half-open sooner than its reset timeout).
    """
    exponent = min(max(attempts - 1, 0), MAX_EXPONENT)
    wait = min(base * factor**exponent, cap)
    pick = (rand or random).uniform
    if jitter == "equal":
        return wait / 2 + pick(0.0, wait / 2)
    if jitter == "up":
        return wait * pick(1.0, 1.2)
    if jitter != "none":
        raise ValueError(f"unknown jitter {jitter!r}")
    return wait
