"""The shared-memory statistics behind /metrics, as a metric sink.

Counts each job outcome in this worker's block of counters (see stats.py):
by queue, type, model and outcome, with its duration, queue wait and tokens.
Payloads refused unrun count as rejected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_worker.host.layout import Counters
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.plugin.context import StashKey
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.records import Record

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext


class JobCounts:
    """One worker's counters in shared memory, and how it numbers the models it counts."""

    def __init__(self, counters: Counters, shared: SharedState, add_labels: bool) -> None:
        self.counters = counters
        self.shared = shared
        self.add_labels = add_labels

    def count(self, event: Record) -> None:
        """Count a job's outcome; other events (no ``outcome``) are not counted."""
        if event.outcome is None:
            return
        if event.outcome == "rejected":
            self.counters.rejected += 1
            return
        self.counters.record(
            event.job_type or "chat",
            self.shared.model_index(model_label(event.model or ""), add=self.add_labels),
            event.outcome,
            event.duration or 0.0,
            event.wait,
            event.prompt_tokens,
            event.completion_tokens,
            event.fallback_used,
            event.cache_hit,
            event.cache_lookup,
        )


COUNTS = StashKey[JobCounts]()


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    if worker.slot is None:
        return  # the HTTP process and the model manager count no jobs
    # With ALLOWED_MODELS set, the supervisor registered every label in
    # advance and anything else is "other"; without it, first come first served.
    add = not worker.settings.models.allowed
    worker.stash[COUNTS] = JobCounts(worker.shared.slots[worker.slot].counters, worker.shared, add)


@hookimpl
def llm_worker_record(event: Record, worker: WorkerContext) -> None:
    counts = worker.stash.get(COUNTS)
    if counts is not None:
        counts.count(event)
