"""Attempts at a model call: what fallback strategies are told, and what they answer.

A job has one budget of attempts (QUEUE_MAX_ATTEMPTS, or its maxRetries + 1)
for job-level retries and in-call fallbacks together, and one deadline (its
timeout) that every attempt gets only what is left of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llm_worker.protocol.jobs import Task
from llm_worker.settings.config import Settings


@dataclass
class Attempt:
    """The attempt that just failed, as a fallback strategy sees it."""

    number: int  # this try's number, 1-based over the job's whole life, earlier runs included
    budget: int  # the most attempts (provider calls) the job may have
    model: str  # the model that failed
    requested_model: str  # the model the job asked for
    tried: list[str]  # models tried in this run, in order
    left: float  # seconds left of the job's timeout
    settings: Settings
    breaker_open: Callable[[str], bool]  # whether a model's breaker refuses calls now
    reduced: bool = False  # parameters were already reduced once (the timeout strategy)
    unloaded: bool = False  # idle models were already unloaded once (the memory strategy)
    streamed: int = 0  # chunks already sent to the reader: a fallback cannot take them back
    task: Task | None = None  # the call that failed (its request and options)

    @property
    def last(self) -> bool:
        """No attempt is left after this one."""
        return self.number >= self.budget


@dataclass(frozen=True)
class Plan:
    """What to try next: another model, other options, and or unloading idle models first."""

    reason: str  # for the log and the result's error history, e.g. "model fallback"
    model: str | None = None  # call this model next; None: the same one
    options: dict[str, Any] = field(default_factory=dict)  # options to override on the next call
    unload_idle: bool = False  # ask the provider to unload its idle models before the next call
