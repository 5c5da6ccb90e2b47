"""The JSON that the queue's scripts write, rendered here from the protocol's types.

Some of what a script writes holds values only the script knows: recover.lua
reads a crashed job's id, model and retry count from its payload and counts
its crashes. Python renders each such document from ``Result``,
``DeadLetter`` or an event's data with a *slot* wherever one of those values
goes, and the script fills the slots in with JSON text (``fill``, in
lua/json.lua). So the shape of a result or a dead letter, and every name in
it, exists once, in protocol/, whoever writes it.

A slot is the JSON string ``"\\u0001<name>"``. Nothing else in a template can
be one: its other values are queue names, worker ids and times, which never
hold that byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from llm_worker.protocol import records
from llm_worker.protocol.jobs import DeadLetter, ErrorKind, Result

SLOT_MARK = "\x01"
CRASH_REASON = "job was in hand of {crashes} workers that died (JOB_MAX_CRASHES {limit})"
UNPLACED_REASON = "delayed entry names no queue"


def slot(name: str) -> Any:
    """A value the script puts in (Any: it stands in for a value of any type)."""
    return SLOT_MARK + name


def render(value: msgspec.Struct, *, leave_out: str = "") -> bytes:
    """``value`` as JSON, without the field ``leave_out`` (its name on the wire)."""
    fields = msgspec.to_builtins(value)
    fields.pop(leave_out, None)
    return msgspec.json.encode(fields)


@dataclass(frozen=True)
class CrashTemplates:
    """What recover.lua writes for a job dead-lettered for the workers that died holding it.

    Its slots: ``reason`` (``reason_format`` with the crashes counted),
    ``attempts`` (the crashes counted), ``id`` (the job's id, null in the
    event when it has none), ``model``, ``correlation`` and ``retries`` (the
    payload's model, correlationId and retryCount), ``job`` (the payload,
    when it is JSON) and ``raw`` (it as a JSON string, when it is not).
    """

    reason_format: str  # for Lua's string.format: %d is the crashes counted
    result: bytes  # the job's failure result
    entry: bytes  # its dead letter, when the payload is JSON
    raw_entry: bytes  # its dead letter, when it is not
    event: bytes  # the data of its llm.request.failed and llm.request.dead_lettered events
    failed_event: str = records.FAILED
    dead_lettered_event: str = records.DEAD_LETTERED

    @classmethod
    def for_worker(cls, worker_id: str, queue: str, max_crashes: int, now: str) -> CrashTemplates:
        """The templates for the jobs of a dead worker ``worker_id`` that served ``queue``."""
        crashed = ErrorKind.CRASHED.value
        reason = slot("reason")
        result = Result(
            job_id=slot("id"),
            success=False,
            error=reason,
            error_type=crashed,
            model=slot("model"),
            requested_model=slot("model"),
            retry_count=slot("retries"),
            worker_id=worker_id,
            correlation_id=slot("correlation"),
            completed_at=now,
        )
        entry = DeadLetter(
            queue=queue, error=reason, error_type=crashed, failed_at=now, worker_id=worker_id, attempts=slot("attempts")
        )
        event = {
            "jobId": slot("id"),
            "workerId": worker_id,
            "timestamp": now,
            "queue": queue,
            "error": reason,
            "errorType": crashed,
            "attempts": slot("attempts"),
        }
        return cls(
            reason_format=CRASH_REASON.format(crashes="%d", limit=max_crashes),
            # No worker took the job for the last time: its result has no startedAt.
            result=render(result, leave_out="startedAt"),
            entry=msgspec.json.encode(msgspec.structs.replace(entry, job=msgspec.Raw(_slot_json("job")))),
            raw_entry=msgspec.json.encode(msgspec.structs.replace(entry, raw=slot("raw"))),
            event=msgspec.json.encode(event),
        )


def unplaced_entry(delayed: str, now: str) -> bytes:
    """The dead letter of a delayed member that names no queue (promote.lua); slot ``raw``: the member.

    A supervisor, not a worker, finds it: the entry has no workerId.
    """
    entry = DeadLetter(
        queue=delayed,
        error=UNPLACED_REASON,
        error_type=ErrorKind.VALIDATION.value,
        failed_at=now,
        worker_id="",
        raw=slot("raw"),
    )
    return render(entry, leave_out="workerId")


def _slot_json(name: str) -> bytes:
    return msgspec.json.encode(slot(name))
