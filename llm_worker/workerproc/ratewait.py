"""How long a rate-limited job waits in the delayed set, and when it has waited enough.

A job stopped by a rate limit (``RateLimited``: the provider's 429, or the
host's budget) is not failing: it spends no attempt and waits ``retry_after``
seconds, or, when the provider did not say, the retry backoff (QUEUE_DELAY
doubled per rate limit of the job, with jitter), at least MIN_WAIT. Two
fields added to its payload (docs/protocol.md) carry what it went through
from one run to the next, whichever host runs it: ``rateLimits``, how many
times it was rate limited, and ``rateLimitedMs``, the waits it was given in
all. A job whose next wait would take ``rateLimitedMs`` past
RATE_LIMIT_MAX_WAIT fails at once with errorType ``rate_limit``, rather than
waiting for an answer it would not get in time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from llm_worker.plugin.providers import RateLimited
from llm_worker.queue.reliable import retry_delay
from llm_worker.settings.config import Settings

RATE_LIMITS = "rateLimits"  # payload field: times the job was rate limited
RATE_LIMITED_MS = "rateLimitedMs"  # payload field: milliseconds it was given to wait for rate limits, in all
MIN_WAIT = 1.0  # seconds: a shorter Retry-After (OpenAI's resets say "20ms") still parks the job this long
RETRY_AFTER_JITTER = 0.1  # a provider-given wait is lengthened by up to this share, at random


@dataclass(frozen=True)
class RateWait:
    """The next wait of a rate-limited job, and its payload's counts with it."""

    seconds: float
    count: int  # rateLimits, this one included
    waited_ms: int  # rateLimitedMs, this wait included

    def fields(self) -> dict[str, int]:
        return {RATE_LIMITS: self.count, RATE_LIMITED_MS: self.waited_ms}


def rate_wait(job: dict[str, Any], error: RateLimited, settings: Settings) -> RateWait | None:
    """The wait before the job runs again; None when it would take the job past RATE_LIMIT_MAX_WAIT.

    ``job`` is the payload as ``jobs.loose`` reads it.
    """
    count = counted(job.get(RATE_LIMITS)) + 1
    asked = error.retry_after is not None
    seconds = max(MIN_WAIT, error.retry_after if asked else retry_delay(settings, count - 1))  # type: ignore[arg-type]
    waited_ms = counted(job.get(RATE_LIMITED_MS)) + math.ceil(seconds * 1000)  # what it was asked to wait
    if waited_ms > settings.ratelimit.max_wait:
        return None
    if asked:
        # Up to a tenth more, at random: jobs refused by one 429 must not all come back in the same instant
        # and meet the next. (Without the provider's word, the retry backoff has its own jitter.)
        seconds *= random.uniform(1.0, 1.0 + RETRY_AFTER_JITTER)
    return RateWait(seconds, count, waited_ms)


def gave_up(job: dict[str, Any], error: RateLimited, settings: Settings) -> str:
    """The reason a job that waited enough fails with: the provider's (or the host's) words, and the bound."""
    waited = counted(job.get(RATE_LIMITED_MS)) / 1000
    limits = counted(job.get(RATE_LIMITS))
    return (
        f"{error.message} (gave up: rate limited {limits + 1} times, {waited:g} s of waiting already, and "
        f"the next wait would pass RATE_LIMIT_MAX_WAIT ({settings.ratelimit.max_wait} ms))"
    )


def counted(value: Any) -> int:
    """A count the payload carries, as a worker wrote it: anything else (a producer's mistake) is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
