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

from llm_worker.plugin.context import StashKey
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.records import Record

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

_encode = msgspec.json.Encoder().encode


class AuditLog:
    """One worker's audit log: its file, opened O_APPEND, and its own process for the memory it reports."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.me = psutil.Process()

    def write(self, event: Record) -> None:
        """Append one line for a job outcome, with one write() so that lines never interleave."""
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
            "memoryBytes": self.me.memory_info().rss,
            "cpuSeconds": round(usage.ru_utime + usage.ru_stime, 3),
        }
        os.write(self.fd, _encode(line) + b"\n")


AUDIT_LOG = StashKey[AuditLog]()


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    path = worker.settings.filters.audit_log_path
    if path and worker.role == "worker":  # jobs end in workers only
        worker.stash[AUDIT_LOG] = AuditLog(path)


@hookimpl
def llm_worker_record(event: Record, worker: WorkerContext) -> None:
    audit = worker.stash.get(AUDIT_LOG)
    if audit is not None and event.outcome is not None:
        audit.write(event)
