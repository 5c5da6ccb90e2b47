"""A chore: work a loop does on a period of its own (the supervisor's Redis chores, the sampler's probes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Chore:
    name: str
    period: float  # seconds between runs
    run: Callable[[], None]
    due: float = 0.0  # monotonic time of the next run; 0: at once
    failing: bool = False  # the last run failed (so a failure is logged once, not every period)
