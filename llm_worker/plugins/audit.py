"""An audit log, as a metric sink: one JSON line per job outcome in AUDIT_LOG_PATH.

Each line has timestamp, workerId, jobId, userId, action (completed, failed,
retried, rejected), model, processingTime (ms), tokensUsed, success, error,
and the worker's memory (resident bytes) and CPU (seconds) at the time; never
prompt or completion text. Every worker appends with one write() to a file
opened O_APPEND, so lines from many processes do not interleave.
"""

from __future__ import annotations

import os
import resource
from typing import TYPE_CHECKING, Any

import msgspec
import psutil

from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.records import Record

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

_fd: int | None = None
_me: psutil.Process | None = None
_encode = msgspec.json.Encoder().encode


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    global _fd, _me
    path = worker.settings.filters.audit_log_path
    if path and worker.role == "worker":
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        _me = psutil.Process()


@hookimpl
def llm_worker_record(event: Record) -> None:
    if _fd is None or event.outcome is None:
        return
    data = event.data
    usage = resource.getrusage(resource.RUSAGE_SELF)
    line: dict[str, Any] = {
        "timestamp": event.timestamp,
        "workerId": event.worker_id,
        "jobId": event.job_id,
        "userId": data.get("userId"),
        "action": event.outcome,
        "model": event.model,
        "processingTime": data.get("processingTime"),
        "tokensUsed": data.get("tokensUsed"),
        "success": event.outcome == "completed",
        "error": data.get("error"),
        "memoryBytes": _me.memory_info().rss if _me is not None else None,
        "cpuSeconds": round(usage.ru_utime + usage.ru_stime, 3),
    }
    os.write(_fd, _encode(line) + b"\n")
