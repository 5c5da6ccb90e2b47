"""The shared-memory statistics behind /metrics, as a metric sink.

Counts each job outcome in this worker's block of counters (see stats.py):
by queue, type, model and outcome, with its duration, queue wait and tokens.
Payloads refused unrun count as rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from llm_worker.host.layout import Counters
from llm_worker.host.stats import model_label
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.records import Record

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

_counters: Counters | None = None
_label: Callable[[str], int] | None = None


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    global _counters, _label
    if worker.slot is None:
        return  # the HTTP process counts no jobs
    _counters = worker.shared.slots[worker.slot].counters
    # With ALLOWED_MODELS set, the supervisor registered every label in
    # advance and anything else is "other"; without it, first come first served.
    add = not worker.settings.models.allowed
    _label = lambda model: worker.shared.model_index(model_label(model), add=add)  # noqa: E731


@hookimpl
def llm_worker_record(event: Record) -> None:
    if _counters is None or _label is None or event.outcome is None:
        return
    if event.outcome == "rejected":
        _counters.rejected += 1
        return
    _counters.record(
        event.job_type or "chat",
        _label(event.model or ""),
        event.outcome,
        event.duration or 0.0,
        event.wait,
        event.prompt_tokens,
        event.completion_tokens,
        event.fallback_used,
        event.cache_hit,
        event.cache_lookup,
    )
