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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The counters' shape: types x models x outcomes, bucket counts (with +Inf), the arrays a sum adds.
from llm_worker.host.layout import _ARRAYS, _DB, _M, _O, _T, _WB, AFFINITY, Counters


@dataclass
class PoolTotals:
    """One pool's counts, added up over its live slots and retired block."""

    affinity: list[int] = field(default_factory=lambda: [0] * len(AFFINITY))
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
        return _cumulative(self.duration_buckets[job_type * _DB : (job_type + 1) * _DB]), self.duration_sum[job_type]

    def model_count(self, model: int) -> int:
        """Finished attempts on a model, all types and outcomes."""
        return sum(self.jobs[(t * _M + model) * _O + o] for t in range(_T) for o in range(_O))

    def wait(self) -> tuple[list[int], float]:
        return _cumulative(self.wait_buckets), self.wait_sum

    def rows_used(self) -> set[tuple[int, int]]:
        """(type, model) rows with any job counted (computed once)."""
        if self._used is None:
            jobs = self.jobs
            self._used = {
                divmod(row, _M) for row in range(_T * _M) if jobs[row * _O] or jobs[row * _O + 1] or jobs[row * _O + 2]
            }
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
