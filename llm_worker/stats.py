"""Job statistics in shared memory: what each worker counts, and how readers add it up.

Each worker slot has one ``Counters`` block that only its worker writes, so
recording a job is a handful of plain stores, no lock. A reader (the HTTP
process) adds the blocks of live slots to the ``retired`` block of their pool,
into which the supervisor folds the counts of every worker that died: so each
exported counter only ever grows, across any number of respawns.

Labels are bounded: four job types, three outcomes, and a model table of
``MAX_MODELS`` names whose index 0 is ``other``. Latency histograms are kept
per job type; per model there are a count and a sum (a mean), because a
histogram per model and type multiplies series past what a scrape should carry.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

TYPES = ("chat", "generate", "embeddings", "batch")
OUTCOMES = ("completed", "failed", "retried")
MAX_MODELS = 24  # index 0 is "other": a bounded label set for Prometheus
# Seconds. LLM jobs run from milliseconds (embeddings) to minutes (long generations).
DURATION_BUCKETS = (0.05, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Seconds from enqueue to take: sub-millisecond when idle, minutes under a backlog.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0)

_T, _M, _O = len(TYPES), MAX_MODELS, len(OUTCOMES)
_DB = len(DURATION_BUCKETS) + 1  # the last is +Inf
_WB = len(WAIT_BUCKETS) + 1
TYPE_INDEX = {name: i for i, name in enumerate(TYPES)}
OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}

_ARRAYS = ("jobs", "duration_buckets", "duration_sum", "model_seconds", "wait_buckets", "prompt_tokens",
           "completion_tokens", "fallbacks", "cache_hits", "cache_misses")


class Counters(ctypes.Structure):
    """One worker's counts (or a pool's retired total). Flat arrays, indexed as noted."""

    _fields_ = [
        ("jobs", ctypes.c_uint64 * (_T * _M * _O)),  # [type][model][outcome]
        ("duration_buckets", ctypes.c_uint64 * (_T * _DB)),  # [type][bucket], not cumulative
        ("duration_sum", ctypes.c_double * _T),
        ("model_seconds", ctypes.c_double * _M),  # time spent per model (its count: the model's jobs)
        ("wait_buckets", ctypes.c_uint64 * _WB),
        ("wait_sum", ctypes.c_double),
        ("prompt_tokens", ctypes.c_uint64 * _M),
        ("completion_tokens", ctypes.c_uint64 * _M),
        ("fallbacks", ctypes.c_uint64 * _M),
        ("cache_hits", ctypes.c_uint64 * _M),
        ("cache_misses", ctypes.c_uint64 * _M),
        ("rejected", ctypes.c_uint64),  # payloads dead-lettered unrun: not a job, or an invalid one
    ]

    def record(self, job_type: str, model: int, outcome: str, duration: float, wait: float | None,
               prompt_tokens: int | None = None, completion_tokens: int | None = None,
               fallback: bool = False, cache_hit: bool = False, cache_lookup: bool = False) -> None:
        """Count one finished attempt of a job (by its worker, the block's only writer)."""
        t = TYPE_INDEX[job_type]
        self.jobs[(t * _M + model) * _O + OUTCOME_INDEX[outcome]] += 1
        self.duration_buckets[t * _DB + bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum[t] += duration
        self.model_seconds[model] += duration
        if wait is not None:
            self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, wait)] += 1
            self.wait_sum += wait
        if prompt_tokens:
            self.prompt_tokens[model] += prompt_tokens
        if completion_tokens:
            self.completion_tokens[model] += completion_tokens
        if fallback:
            self.fallbacks[model] += 1
        if cache_hit:
            self.cache_hits[model] += 1
        elif cache_lookup:
            self.cache_misses[model] += 1

    def add_to(self, total: Counters) -> None:
        """Fold these counts into ``total`` (the supervisor retiring a dead worker's slot)."""
        for name in _ARRAYS:
            theirs = getattr(total, name)
            for i, value in enumerate(getattr(self, name)):
                if value:
                    theirs[i] += value
        total.wait_sum += self.wait_sum
        total.rejected += self.rejected

    def clear(self) -> None:
        ctypes.memset(ctypes.addressof(self), 0, ctypes.sizeof(self))


@dataclass
class PoolTotals:
    """One pool's counts, added up over its live slots and retired block."""

    jobs: list[int] = field(default_factory=lambda: [0] * (_T * _M * _O))
    duration_buckets: list[int] = field(default_factory=lambda: [0] * (_T * _DB))
    duration_sum: list[float] = field(default_factory=lambda: [0.0] * _T)
    model_seconds: list[float] = field(default_factory=lambda: [0.0] * _M)
    wait_buckets: list[int] = field(default_factory=lambda: [0] * _WB)
    prompt_tokens: list[int] = field(default_factory=lambda: [0] * _M)
    completion_tokens: list[int] = field(default_factory=lambda: [0] * _M)
    fallbacks: list[int] = field(default_factory=lambda: [0] * _M)
    cache_hits: list[int] = field(default_factory=lambda: [0] * _M)
    cache_misses: list[int] = field(default_factory=lambda: [0] * _M)
    wait_sum: float = 0.0
    rejected: int = 0
    _used: set[tuple[int, int]] | None = None

    @classmethod
    def of(cls, blocks: Sequence[Counters]) -> PoolTotals:
        """Add up blocks: each array is copied out with one C-level slice, then summed column-wise."""
        if not blocks:
            return cls()
        arrays = {name: _sum_columns(getattr(b, name)[:] for b in blocks) for name in _ARRAYS}
        return cls(**arrays, wait_sum=sum(b.wait_sum for b in blocks), rejected=sum(b.rejected for b in blocks))

    def jobs_of(self, job_type: int, model: int, outcome: int) -> int:
        return self.jobs[(job_type * _M + model) * _O + outcome]

    def duration_of(self, job_type: int) -> tuple[list[int], float]:
        """Cumulative bucket counts (Prometheus' ``le``), and the sum, of one job type."""
        return _cumulative(self.duration_buckets[job_type * _DB:(job_type + 1) * _DB]), self.duration_sum[job_type]

    def model_count(self, model: int) -> int:
        """Finished attempts on a model, all types and outcomes."""
        return sum(self.jobs[(t * _M + model) * _O + o] for t in range(_T) for o in range(_O))

    def wait(self) -> tuple[list[int], float]:
        return _cumulative(self.wait_buckets), self.wait_sum

    def rows_used(self) -> set[tuple[int, int]]:
        """(type, model) rows with any job counted (computed once)."""
        if self._used is None:
            jobs = self.jobs
            self._used = {divmod(row, _M) for row in range(_T * _M) if jobs[row * _O] or jobs[row * _O + 1] or jobs[row * _O + 2]}
        return self._used


def _sum_columns(rows: Iterable[list]) -> list:  # type: ignore[type-arg]
    return [sum(column) for column in zip(*rows)]


def _cumulative(counts: Sequence[int]) -> list[int]:
    out, running = [], 0
    for count in counts:
        running += count
        out.append(running)
    return out


def model_label(model: str) -> str:
    """The label a model is counted under: its name, with Ollama's default tag left off."""
    return model[: -len(":latest")] if model.endswith(":latest") else model
