"""What metric sinks receive: one Record per job, model and breaker event.

``data`` is exactly what goes on the ``llm:events`` stream (PROTOCOL.md's
``data`` object: ids, model, timings, errors, never prompt text). The typed
fields beside it are there so that a sink that aggregates (the shared-memory
statistics, a StatsD or OpenTelemetry sink) need not parse ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Event types, as PROTOCOL.md names them.
STARTED = "llm.request.started"
COMPLETED = "llm.request.completed"
FAILED = "llm.request.failed"
RETRIED = "llm.request.retried"
DEAD_LETTERED = "llm.request.dead_lettered"
PARKED = "llm.request.parked"  # model affinity: left for a host that holds the job's model
MODEL_LOADING = "llm.model.loading"  # a load began (why: preload, a job asked)
MODEL_LOADED = "llm.model.loaded"
MODEL_LOAD_FAILED = "llm.model.load_failed"
MODEL_UNLOADED = "llm.model.unloaded"
BREAKER_OPENED = "llm.breaker.opened"
BREAKER_HALF_OPEN = "llm.breaker.half_open"
BREAKER_CLOSED = "llm.breaker.closed"


@dataclass
class Record:
    type: str  # one of the constants above
    worker_id: str
    timestamp: str  # ISO 8601 UTC
    data: dict[str, Any] = field(default_factory=dict)  # as published on llm:events
    job_id: str | None = None
    queue: str | None = None
    job_type: str | None = None  # chat | generate | embeddings | batch
    model: str | None = None  # the model that answered (or was asked for, on failure)
    outcome: str | None = None  # on job outcomes: completed | failed | retried
    duration: float | None = None  # seconds from take to outcome
    wait: float | None = None  # seconds from the job's createdAt to its take
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    fallback_used: bool = False
    cache_hit: bool = False
    cache_lookup: bool = False  # the response cache was asked: with cache_hit, the hit rate
    error_kind: str | None = None
