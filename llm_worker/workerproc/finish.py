"""Turn what happened to a job into exactly one terminal outcome, or a retry.

Success writes the result; a retryable failure with attempts left parks the
job in the delayed set; anything else dead-letters it with its failure
result. Every write goes through the worker's Redis guard, which waits out a
lost Redis, so a job in hand is finished once Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from llm_worker import logs
from llm_worker.config import Settings
from llm_worker.jobs import RAW_KEEP, DeadLetter, Decoded, ErrorKind, Invalid, JobError, Malformed, Result, iso
from llm_worker.queue import DeferredEvents, Event, ReliableQueue, retry_delay
from llm_worker.stats import Counters
from llm_worker.workerproc.execute import Answer

log = logging.getLogger("llm_worker.worker")
Guard = Callable[..., Any]


class Finisher:
    """Writes outcomes for one worker process (``worker_id``) serving ``queue``.

    Each outcome may also take the worker's next job in the same round trip
    (``take_next``); the methods return that job's payload, or None.
    """

    def __init__(self, rq: ReliableQueue, settings: Settings, worker_id: str, queue: str, guard: Guard,
                 take_next: Callable[[], bool], counters: Counters, label: Callable[[str], int]) -> None:
        self.rq = rq
        self.settings = settings
        self.worker_id = worker_id
        self.queue = queue
        self.guard = guard
        self.take_next = take_next
        self.counters = counters  # this worker's block in shared memory; it is the only writer
        self.label = label  # model name -> its index in the shared model table
        self.events = DeferredEvents(rq.redis, rq.keys.events)

    @property
    def _take(self) -> str | None:
        return self.queue if self.take_next() else None

    # ---- jobs that were run ------------------------------------------------

    def started(self, d: Decoded, taken: float) -> None:
        """Announce the job; the reply is read after the provider call (see DeferredEvents)."""
        self.events.send(Event("llm.request.started", self._data(d, taken)))

    def succeeded(self, d: Decoded, taken: float, answer: Answer, stream: bool) -> bytes | None:
        self.events.settle()
        result = self._result(d, taken, success=True, answer=answer)
        data = self._data(d, taken, processingTime=result.processing_time, tokensUsed=result.tokens_used,
                          model=result.model, fallbackUsed=answer.fallback_used)
        done = self.guard(self.rq.complete, self.worker_id, d.raw, result, [Event("llm.request.completed", data)],
                          stream="done" if stream else "", take_from=self._take, queue=self.queue)
        if done.ours:
            self._count(d, taken, "completed", answer.model, answer)
        self._report(done.ours, d, "completed", result.processing_time,
                     **logs.prompt_fields(prompt=d.prompt_text(), completion=_completion_text(answer)))
        return done.next

    def failed(self, d: Decoded, taken: float, error: JobError, *, streamed: int = 0) -> bytes | None:
        """Retry the job later if the error and its attempts allow, else fail it for good.

        A streaming job that has already sent chunks is not retried: a reader
        cannot take back text it has shown.
        """
        self.events.settle()
        attempt = d.job.retry_count + 1
        if error.retryable and attempt < d.max_attempts and not streamed:
            return self._retry(d, taken, error)
        reason = error.message
        if error.retryable and attempt >= d.max_attempts:
            reason = f"{reason} (gave up after {attempt} attempts)"
        return self._dead(d, taken, reason, error.kind, attempt, stream="error" if d.stream else "")

    def _retry(self, d: Decoded, taken: float, error: JobError) -> bytes | None:
        delay = retry_delay(self.settings, d.job.retry_count)
        loose = msgspec.json.decode(d.raw)
        loose["retryCount"] = d.job.retry_count + 1
        payload = msgspec.json.encode(loose)
        data = self._data(d, taken, error=error.message, errorType=error.kind.value,
                          retryCount=d.job.retry_count + 1, delayMs=int(delay * 1000))
        done = self.guard(self.rq.retry_later, self.worker_id, d.raw, self.queue, payload, time.time() + delay,
                          [Event("llm.request.retried", data)], take_from=self._take)
        if done.ours:
            self._count(d, taken, "retried", d.model, None)
        self._report(done.ours, d, "retried", None, errorType=error.kind.value, delayMs=int(delay * 1000))
        return done.next

    def _dead(self, d: Decoded, taken: float, reason: str, kind: ErrorKind, attempts: int, stream: str = "") -> bytes | None:
        result = self._result(d, taken, success=False, error=reason, kind=kind)
        entry = DeadLetter(job=msgspec.Raw(d.raw), queue=self.queue, error=reason, error_type=kind.value,
                           failed_at=result.completed_at, attempts=attempts, worker_id=self.worker_id)
        data = self._data(d, taken, error=reason, errorType=kind.value, attempts=attempts,
                          processingTime=result.processing_time)
        events = [Event("llm.request.failed", data), Event("llm.request.dead_lettered", data)]
        done = self.guard(self.rq.dead_letter, self.worker_id, d.raw, entry, result, events, stream=stream,
                          take_from=self._take)
        if done.ours:
            self._count(d, taken, "failed", d.model, None)
        self._report(done.ours, d, "dead-lettered", result.processing_time, errorType=kind.value, error=reason)
        return done.next

    # ---- payloads that are not runnable jobs -------------------------------

    def malformed(self, raw: bytes, exc: Malformed) -> bytes | None:
        now = iso()
        entry = DeadLetter(raw=raw[:RAW_KEEP].decode(errors="replace"), queue=self.queue, error=exc.reason,
                           error_type=ErrorKind.VALIDATION.value, failed_at=now, worker_id=self.worker_id, attempts=1)
        result = None
        if exc.job_id is not None:
            result = Result(job_id=exc.job_id, success=False, error=exc.reason, error_type="validation",
                            worker_id=self.worker_id, completed_at=now)
        data = {"jobId": exc.job_id, "workerId": self.worker_id, "timestamp": now, "queue": self.queue,
                "error": exc.reason, "errorType": "validation"}
        events = [Event("llm.request.dead_lettered", data)]
        if result is not None:
            events.insert(0, Event("llm.request.failed", data))
        done = self.guard(self.rq.dead_letter, self.worker_id, raw, entry, result, events, take_from=self._take)
        if done.ours:
            self.counters.rejected += 1
        log.warning("malformed payload dead-lettered", extra={"jobId": exc.job_id, "queue": self.queue, "error": exc.reason, "bytes": len(raw)})
        return done.next

    def invalid(self, raw: bytes, exc: Invalid) -> bytes | None:
        now = iso()
        job = exc.job
        job_id = str(job.get("id"))
        correlation = job.get("correlationId") if isinstance(job.get("correlationId"), str) else None
        model = job.get("model") if isinstance(job.get("model"), str) else None
        entry = DeadLetter(job=msgspec.Raw(raw), queue=self.queue, error=exc.reason, error_type="validation",
                           failed_at=now, worker_id=self.worker_id, attempts=1)
        result = Result(job_id=job_id, success=False, error=exc.reason, error_type="validation", model=model,
                        requested_model=model, worker_id=self.worker_id, correlation_id=correlation, completed_at=now)
        data = {"jobId": job_id, "workerId": self.worker_id, "timestamp": now, "queue": self.queue,
                "correlationId": correlation, "error": exc.reason, "errorType": "validation"}
        events = [Event("llm.request.failed", data), Event("llm.request.dead_lettered", data)]
        done = self.guard(self.rq.dead_letter, self.worker_id, raw, entry, result, events, take_from=self._take)
        if done.ours:
            self.counters.rejected += 1
        log.warning("invalid job dead-lettered", extra={"jobId": job_id, "correlationId": correlation, "error": exc.reason})
        return done.next

    # ---- shapes ------------------------------------------------------------

    def _count(self, d: Decoded, taken: float, outcome: str, model: str, answer: Answer | None) -> None:
        wait = max(0.0, taken - d.created) if d.created is not None else None
        self.counters.record(
            d.job.type, self.label(model), outcome, time.time() - taken, wait,
            answer.prompt_tokens if answer else None, answer.completion_tokens if answer else None,
            answer.fallback_used if answer else False, answer.cache_hit if answer else False,
        )

    def _result(self, d: Decoded, taken: float, *, success: bool, answer: Answer | None = None,
                error: str | None = None, kind: ErrorKind | None = None) -> Result:
        job = d.job
        return Result(
            job_id=job.id, success=success, response=answer.response if answer else None,
            error=error, error_type=kind.value if kind else None,
            processing_time=int(round((time.time() - taken) * 1000)),
            queue_time=max(0, int(round((taken - d.created) * 1000))) if d.created is not None else None,
            model=answer.model if answer else d.model, requested_model=d.model,
            tokens_used=answer.tokens if answer else None,
            prompt_tokens=answer.prompt_tokens if answer else None,
            completion_tokens=answer.completion_tokens if answer else None,
            retry_count=job.retry_count, fallback_used=answer.fallback_used if answer else False,
            cache_hit=answer.cache_hit if answer else False, worker_id=self.worker_id,
            correlation_id=job.correlation_id, completed_at=iso(), started_at=iso(taken, micro=True),
        )

    def _data(self, d: Decoded, taken: float, **more: Any) -> dict[str, Any]:
        job = d.job
        data = {"jobId": job.id, "workerId": self.worker_id, "timestamp": iso(), "jobType": job.type,
                "model": d.model, "queue": self.queue, "userId": job.user_id, "correlationId": job.correlation_id,
                "retryCount": job.retry_count}
        data.update(more)
        return data

    def _report(self, ok: bool, d: Decoded, what: str, ms: int | None, **more: Any) -> None:
        fields = {"jobId": d.job.id, "correlationId": d.job.correlation_id, "model": d.model, "processingTime": ms, **more}
        if not ok:
            # The job was recovered from us while we ran it (we were stopped or
            # presumed dead); its new holder answers it, so ours is dropped.
            log.warning(f"job no longer ours; outcome ({what}) dropped", extra=fields)
        elif what == "completed":
            log.info("job completed", extra=fields)
        else:
            log.warning(f"job {what}", extra=fields)


def _completion_text(answer: Answer) -> str:
    response = answer.response
    message = response.get("message")
    if isinstance(message, dict):
        return str(message.get("content", ""))
    return str(response.get("response", ""))
