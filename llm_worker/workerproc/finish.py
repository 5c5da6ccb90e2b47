"""Record a job's Outcome as exactly one terminal outcome, or a retry; tell the sinks; say what was done.

Success writes the result; a retryable failure with attempts left parks the
job in the delayed set; a job refused by open circuit breakers waits there
until one could half-open, without spending an attempt; anything else
dead-letters it with its failure result. A job stopped by a rate limit waits
there as long as it asks, without spending an attempt, until
RATE_LIMIT_MAX_WAIT (workerproc/ratewait.py). Every write goes through the Redis
guard the finisher is given, which waits out a lost Redis, so a job in hand
is finished once Redis is back. After an outcome is written, the metric sinks
get its Record (the event stream, the shared-memory statistics, ...).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from llm_worker import logs
from llm_worker.host.breaker import BreakerOpen
from llm_worker.plugin.manager import PluginManager
from llm_worker.plugin.providers import RateLimited
from llm_worker.protocol import jobs, records
from llm_worker.protocol.jobs import (
    RAW_KEEP,
    Answer,
    DeadLetter,
    Decoded,
    ErrorKind,
    Invalid,
    JobError,
    Malformed,
    Result,
    iso,
)
from llm_worker.protocol.records import Record
from llm_worker.queue.reliable import Finished, ReliableQueue, retry_delay
from llm_worker.settings.config import Settings
from llm_worker.workerproc.outcome import Outcome
from llm_worker.workerproc.ratewait import gave_up, rate_wait

log = logging.getLogger("llm_worker.worker")
T = TypeVar("T")
FREE_PROBES = 2  # failed breaker probes a job may make without spending an attempt


def _probe_failures(raw: bytes) -> int:
    value = jobs.loose(raw).get("probeFailures")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class Guard(Protocol):
    """Runs one Redis call, waiting out a lost Redis (the worker's ``_guard``; a test may just call it)."""

    def __call__(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class Fate(enum.Enum):
    """What recording an outcome did to the job."""

    COMPLETED = "completed"
    RETRIED = "retried"
    DEAD_LETTERED = "dead-lettered"
    DROPPED = "dropped"  # no longer ours (recovered from us while we held it): nothing written


@dataclass(frozen=True)
class Recorded:
    """What the finisher did with a job, and the next job when its finish took one (a drop may take one too)."""

    fate: Fate
    next: bytes | None


def _recorded(done: Finished, fate: Fate) -> Recorded:
    return Recorded(fate if done.ours else Fate.DROPPED, done.next)


class Finisher:
    """Records outcomes for one worker process (``worker_id``) serving ``queue_name``.

    Its writes go through ``guard``, a plain dependency: the finisher knows
    nothing of the worker beyond it. Asked to ``take_next``, a finish also takes
    the worker's next job in the same round trip and returns it in Recorded.
    """

    def __init__(
        self,
        reliable_queue: ReliableQueue,
        settings: Settings,
        worker_id: str,
        queue_name: str,
        guard: Guard,
        plugins: PluginManager,
    ) -> None:
        self.reliable_queue = reliable_queue
        self.settings = settings
        self.worker_id = worker_id
        self.queue_name = queue_name
        self.guard = guard
        self.plugins = plugins

    def _take_from(self, take_next: bool) -> str | None:
        """The queue a finish takes the worker's next job from, when it takes one."""
        return self.queue_name if take_next else None

    # ---- jobs that were run ------------------------------------------------

    def started(self, d: Decoded, taken: float, **more: Any) -> None:
        self.plugins.record(self._record(records.STARTED, d, taken, **more))

    def parked(self, d: Decoded, taken: float, model: str) -> None:
        """The job was parked for a host that holds its model (model affinity): it waits, nothing is written."""
        self.plugins.record(self._record(records.PARKED, d, taken, parkedFor=model))

    def record(self, d: Decoded, taken: float, outcome: Outcome, *, take_next: bool) -> Recorded:
        """Write the job's outcome: its result, a retry or a dead letter; take the next job if ``take_next``."""
        take_from = self._take_from(take_next)
        if outcome.answer is not None:
            return self._completed(d, taken, outcome.answer, outcome.attempts, take_from)
        assert outcome.error is not None  # an outcome has one or the other
        return self._failed(d, taken, outcome.error, outcome.attempts, outcome.streamed, take_from)

    def _completed(self, d: Decoded, taken: float, answer: Answer, attempts: int, take_from: str | None) -> Recorded:
        result = self._result(d, taken, success=True, answer=answer, attempts=attempts)
        done = self.guard(
            self.reliable_queue.complete,
            self.worker_id,
            d.raw,
            result,
            stream="done" if d.stream else "",
            take_from=take_from,
            queue=self.queue_name,
        )
        if done.ours:
            self.plugins.record(
                self._record(records.COMPLETED, d, taken, outcome="completed", answer=answer, result=result)
            )
        self._report(
            done.ours,
            d,
            "completed",
            result.processing_time,
            **logs.prompt_fields(prompt=d.prompt_text(), completion=answer.text),
        )
        return _recorded(done, Fate.COMPLETED)

    def _failed(
        self, d: Decoded, taken: float, error: JobError, attempts: int, streamed: int, take_from: str | None
    ) -> Recorded:
        """Retry the job later if the error and its attempts allow, else fail it for good.

        ``attempts`` is how many of the job's attempts this run used. A
        streaming job that has already sent chunks is not retried: a reader
        cannot take back text it has shown.
        """
        if isinstance(error, RateLimited) and not streamed:
            return self._rate_limited(d, taken, error, attempts, take_from)
        if isinstance(error, BreakerOpen) and not streamed and not self._probed_enough(d, error):
            # An outage, not the job's fault: wait for the breaker; refusals spend no attempt.
            due = time.time() + max(0.0, error.retry_at - time.monotonic())
            return self._retry(d, taken, error, due, attempts, take_from, probed=error.probe_failed)
        if isinstance(error, BreakerOpen) and error.probe_failed:
            attempts = max(1, attempts)  # its free probes are spent: this one counts
        attempt = d.job.retry_count + max(1, attempts)
        if error.retryable and attempt < d.max_attempts and not streamed:
            due = time.time() + retry_delay(self.settings, attempt - 1)
            return self._retry(d, taken, error, due, attempts, take_from)
        reason = error.message
        if error.retryable and attempt >= d.max_attempts:
            reason = f"{reason} (gave up after {attempt} attempts)"
        return self._dead(d, taken, reason, error.kind, attempt, take_from)

    def _rate_limited(
        self, d: Decoded, taken: float, error: RateLimited, attempts: int, take_from: str | None
    ) -> Recorded:
        """Park the job as long as the rate limit asks, spending no attempt; fail it once it has waited enough.

        ``attempts`` are the run's calls before the rate limit (a timeout, say,
        then a fallback that was rate limited): those are spent as usual.
        """
        loose = jobs.loose(d.raw)
        wait = rate_wait(loose, error, self.settings)
        if wait is None:
            reason = gave_up(loose, error, self.settings)
            return self._dead(d, taken, reason, error.kind, d.job.retry_count + max(1, attempts), take_from)
        return self._retry(d, taken, error, time.time() + wait.seconds, attempts, take_from, extra=wait.fields())

    @staticmethod
    def _probed_enough(d: Decoded, error: BreakerOpen) -> bool:
        """Whether this failed probe must spend an attempt: the job already failed FREE_PROBES probes.

        A job whose own request makes the provider fail would otherwise probe,
        fail and re-open the breaker for ever, holding every other job back.
        """
        return error.probe_failed and _probe_failures(d.raw) >= FREE_PROBES

    def _retry(
        self,
        d: Decoded,
        taken: float,
        error: JobError,
        due: float,
        spent: int,
        take_from: str | None,
        probed: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> Recorded:
        loose = jobs.loose(d.raw)
        loose["retryCount"] = d.job.retry_count + spent
        if probed:  # an addition to the job (docs/protocol.md): failed breaker probes, which spend no attempt
            loose["probeFailures"] = _probe_failures(d.raw) + 1
        loose.update(extra or {})  # more additions (docs/protocol.md): a rate-limited job's waits
        payload = jobs.encode(loose)
        limit = self.settings.limits.max_job_bytes
        if len(payload) > limit:
            # The counters we add would make the next take refuse it as malformed,
            # with no result when its id is not the first key: fail it now, answered.
            reason = (
                f"{error.message} (not retried: with its retry count the job is {len(payload)} bytes, "
                f"over MAX_JOB_BYTES ({limit}))"
            )
            return self._dead(d, taken, reason, error.kind, d.job.retry_count + max(1, spent), take_from)
        delay_ms = int(max(0.0, due - time.time()) * 1000)
        done = self.guard(
            self.reliable_queue.retry_later, self.worker_id, d.raw, self.queue_name, payload, due, take_from=take_from
        )
        if done.ours:
            self.plugins.record(
                self._record(
                    records.RETRIED,
                    d,
                    taken,
                    outcome="retried",
                    error=error,
                    retryCount=loose["retryCount"],
                    delayMs=delay_ms,
                    **(extra or {}),
                )
            )
        self._report(done.ours, d, "retried", None, errorType=error.kind.value, delayMs=delay_ms)
        return _recorded(done, Fate.RETRIED)

    def _dead(
        self, d: Decoded, taken: float, reason: str, kind: ErrorKind, attempts: int, take_from: str | None
    ) -> Recorded:
        result = self._result(d, taken, success=False, error=reason, kind=kind, attempts=attempts - d.job.retry_count)
        entry = DeadLetter(
            job=msgspec.Raw(d.raw),
            queue=self.queue_name,
            error=reason,
            error_type=kind.value,
            failed_at=result.completed_at,
            attempts=attempts,
            worker_id=self.worker_id,
        )
        done = self.guard(
            self.reliable_queue.dead_letter,
            self.worker_id,
            d.raw,
            entry,
            result,
            stream="error" if d.stream else "",
            take_from=take_from,
        )
        if done.ours:
            failure = JobError(reason, kind)
            self.plugins.record(
                self._record(
                    records.FAILED, d, taken, outcome="failed", error=failure, result=result, attempts=attempts
                )
            )
            self.plugins.record(self._record(records.DEAD_LETTERED, d, taken, error=failure, attempts=attempts))
        self._report(done.ours, d, "dead-lettered", result.processing_time, errorType=kind.value, error=reason)
        return _recorded(done, Fate.DEAD_LETTERED)

    # ---- payloads that are not runnable jobs -------------------------------

    def malformed(self, raw: bytes, exc: Malformed, *, take_next: bool) -> Recorded:
        now = iso()
        entry = DeadLetter(
            raw=raw[:RAW_KEEP].decode(errors="replace"),
            queue=self.queue_name,
            error=exc.reason,
            error_type=ErrorKind.VALIDATION.value,
            failed_at=now,
            worker_id=self.worker_id,
            attempts=1,
        )
        result = None
        if exc.job_id is not None:
            result = Result(
                job_id=exc.job_id,
                success=False,
                error=exc.reason,
                error_type="validation",
                worker_id=self.worker_id,
                completed_at=now,
            )
        done = self._dead_letter(raw, entry, result, take_next)
        if done.ours:
            self._rejected(exc.job_id, None, exc.reason, now, failed=result is not None)
        _say(
            done.ours,
            "malformed payload dead-lettered",
            {"jobId": exc.job_id, "queue": self.queue_name, "error": exc.reason, "bytes": len(raw)},
        )
        return _recorded(done, Fate.DEAD_LETTERED)

    def _dead_letter(self, raw: bytes, entry: DeadLetter, result: Result | None, take_next: bool) -> Any:
        """Dead-letter a payload with its failure result (when it has an id), through the fenced script."""
        return self.guard(
            self.reliable_queue.dead_letter, self.worker_id, raw, entry, result, take_from=self._take_from(take_next)
        )

    def invalid(self, raw: bytes, exc: Invalid, *, take_next: bool) -> Recorded:
        now = iso()
        job = exc.job
        job_id = str(job.get("id"))
        correlation = job.get("correlationId") if isinstance(job.get("correlationId"), str) else None
        model = job.get("model") if isinstance(job.get("model"), str) else None
        entry = DeadLetter(
            job=msgspec.Raw(raw),
            queue=self.queue_name,
            error=exc.reason,
            error_type="validation",
            failed_at=now,
            worker_id=self.worker_id,
            attempts=1,
        )
        result = Result(
            job_id=job_id,
            success=False,
            error=exc.reason,
            error_type="validation",
            model=model,
            requested_model=model,
            worker_id=self.worker_id,
            correlation_id=correlation,
            completed_at=now,
        )
        done = self._dead_letter(raw, entry, result, take_next)
        if done.ours:
            self._rejected(job_id, correlation, exc.reason, now, failed=True)
        _say(
            done.ours, "invalid job dead-lettered", {"jobId": job_id, "correlationId": correlation, "error": exc.reason}
        )
        return _recorded(done, Fate.DEAD_LETTERED)

    def _rejected(self, job_id: str | None, correlation: str | None, reason: str, now: str, *, failed: bool) -> None:
        data = {
            "jobId": job_id,
            "workerId": self.worker_id,
            "timestamp": now,
            "queue": self.queue_name,
            "correlationId": correlation,
            "error": reason,
            "errorType": "validation",
        }
        common = {
            "worker_id": self.worker_id,
            "timestamp": now,
            "data": data,
            "job_id": job_id,
            "queue": self.queue_name,
            "error_kind": "validation",
        }
        if failed:
            self.plugins.record(Record(records.FAILED, **common))
        self.plugins.record(Record(records.DEAD_LETTERED, outcome="rejected", **common))

    # ---- shapes ------------------------------------------------------------

    def _result(
        self,
        d: Decoded,
        taken: float,
        *,
        success: bool,
        answer: Answer | None = None,
        error: str | None = None,
        kind: ErrorKind | None = None,
        attempts: int = 1,
    ) -> Result:
        """The result; its retryCount counts every earlier attempt, job-level retries and fallbacks alike."""
        job = d.job
        return Result(
            job_id=job.id,
            success=success,
            response=answer.response if answer else None,
            error=error,
            error_type=kind.value if kind else None,
            processing_time=int(round((time.time() - taken) * 1000)),
            queue_time=max(0, int(round((taken - d.created) * 1000))) if d.created is not None else None,
            model=answer.model if answer else d.model,
            requested_model=d.model,
            tokens_used=answer.tokens if answer else None,
            prompt_tokens=answer.prompt_tokens if answer else None,
            completion_tokens=answer.completion_tokens if answer else None,
            retry_count=job.retry_count + max(0, attempts - 1),
            fallback_used=answer.fallback_used if answer else False,
            cache_hit=answer.cache_hit if answer else False,
            worker_id=self.worker_id,
            correlation_id=job.correlation_id,
            completed_at=iso(),
            started_at=iso(taken, micro=True),
        )

    def _record(
        self,
        kind: str,
        d: Decoded,
        taken: float,
        *,
        outcome: str | None = None,
        answer: Answer | None = None,
        result: Result | None = None,
        error: JobError | None = None,
        **more: Any,
    ) -> Record:
        """A job's event for the sinks: PROTOCOL.md's data, and the same facts typed."""
        job = d.job
        now = iso()
        model = answer.model if answer else d.model
        data: dict[str, Any] = {
            "jobId": job.id,
            "workerId": self.worker_id,
            "timestamp": now,
            "jobType": job.type,
            "model": model,
            "queue": self.queue_name,
            "userId": job.user_id,
            "correlationId": job.correlation_id,
            "retryCount": job.retry_count,
        }
        if result is not None:
            data["processingTime"] = result.processing_time
            data["tokensUsed"] = result.tokens_used
        if answer is not None:
            data["fallbackUsed"] = answer.fallback_used
        if error is not None:
            data["error"] = error.message
            data["errorType"] = error.kind.value
        data.update(more)
        return Record(
            kind,
            self.worker_id,
            now,
            data,
            job_id=job.id,
            queue=self.queue_name,
            job_type=job.type,
            model=model,
            outcome=outcome,
            duration=time.time() - taken if outcome else None,
            wait=max(0.0, taken - d.created) if d.created is not None and outcome else None,
            prompt_tokens=answer.prompt_tokens if answer else None,
            completion_tokens=answer.completion_tokens if answer else None,
            fallback_used=answer.fallback_used if answer else False,
            cache_hit=answer.cache_hit if answer else False,
            cache_lookup=answer.cache_lookup if answer else False,
            error_kind=error.kind.value if error else None,
        )

    def _report(self, ours: bool, d: Decoded, what: str, ms: int | None, **more: Any) -> None:
        fields = {
            "jobId": d.job.id,
            "correlationId": d.job.correlation_id,
            "model": d.model,
            "processingTime": ms,
            **more,
        }
        _say(ours, f"job {what}", fields)


def _say(ours: bool, outcome: str, fields: dict[str, Any]) -> None:
    """Log an outcome, or that it was dropped because the job is no longer ours."""
    if not ours:
        # The job was recovered from us while we held it (we were stopped or
        # presumed dead); its new holder finishes it, so ours is dropped. The
        # chaos drill counts these lines as duplicates suppressed.
        log.warning(f"job no longer ours; outcome dropped: {outcome}", extra=fields)
    elif outcome == "job completed":
        log.info(outcome, extra=fields)
    else:
        log.warning(outcome, extra=fields)
