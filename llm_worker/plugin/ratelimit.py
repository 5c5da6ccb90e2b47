"""How long a provider asked us to wait: Retry-After, and the reset headers OpenAI-style APIs send.

A provider that answers 429 raises ``RateLimited(retry_after=...)``; these
read the seconds from the answer's headers, for the built-in providers and
for a plugin author's own:

- ``retry_after_seconds``: the standard ``Retry-After`` (RFC 9110 10.2.3):
  delay-seconds, or an HTTP-date (past dates are 0).
- ``reset_seconds``: the Go-style durations of ``x-ratelimit-reset-requests``
  and ``x-ratelimit-reset-tokens`` (``1s``, ``6m0s``, ``20ms``), which OpenAI
  documents as "the time until the rate limit resets to its initial state"
  (https://platform.openai.com/docs/guides/rate-limits, "Rate limits in headers").
- ``wait_from_headers``: what a 429's headers say as a whole, in the order
  OpenAI's own client reads them (openai-python ``_parse_retry_after_header``:
  ``retry-after-ms``, then ``Retry-After``), then the reset headers of the
  limit that ran out.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Callable

_DURATION = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
MAX_WAIT = 86_400.0  # a day: longer answers are taken as this, so a bogus header cannot park a job for years


def retry_after_seconds(headers_value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date; None when absent or unreadable.

    ``now`` is the wall clock (``time.time()``) an HTTP-date is measured from.
    A fractional number is taken too, as OpenAI's client does; a date in the
    past, or a negative number, is 0: the server says the wait is over.
    """
    if headers_value is None or not headers_value.strip():
        return None
    text = headers_value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; one without a zone is not one
            return None
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_WAIT)


def reset_seconds(value: str | None) -> float | None:
    """Seconds of a Go-style duration (``1s``, ``6m0s``, ``1h2m3.5s``, ``20ms``); None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return min(sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts), MAX_WAIT)


def wait_from_headers(get: Callable[[str], str | None], now: float) -> float | None:
    """Seconds a 429 asks us to wait, from its headers (``get(name)``, case-insensitive); None when it does not say.

    ``retry-after-ms`` (OpenAI's, in milliseconds), then ``Retry-After``; without
    either, OpenAI's ``x-ratelimit-reset-requests``/``-tokens`` of the limit
    whose ``x-ratelimit-remaining-*`` is 0 (both when neither says), the
    longer when both apply. Those give the time until the limit is whole
    again, which is at least the time until one more call fits.
    """
    milliseconds = _number(get("retry-after-ms"))
    if milliseconds is not None:
        return min(max(0.0, milliseconds / 1000), MAX_WAIT)
    seconds = retry_after_seconds(get("retry-after"), now)
    if seconds is not None:
        return seconds
    resets = {kind: reset_seconds(get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")}
    spent = [kind for kind in resets if (get(f"x-ratelimit-remaining-{kind}") or "").strip() == "0"]
    known = [resets[kind] for kind in (spent or resets) if resets[kind] is not None]
    return max(known) if known else None  # type: ignore[type-var]


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(number) else number
