"""The producer API: submit a job, wait for its result, follow its stream.

It speaks the wire protocol (docs/protocol.md) and nothing more, so it
doubles as a reference for producers in other languages.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import redis

from llm_worker.protocol.jobs import iso
from llm_worker.queue.connection import connect
from llm_worker.queue.keys import Keys
from llm_worker.settings.config import Settings

_encode = msgspec.json.Encoder().encode
MAX_DELAY_MS = 30 * 86_400_000  # a job scheduled further out than 30 days is more likely a unit mistake


class JobFailed(Exception):
    """The job ended in failure; ``result`` holds its failure result."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(f"{result.get('errorType')}: {result.get('error')}")
        self.result = result


class NotReplicated(Exception):
    """The job was pushed, but fewer replicas than asked confirmed it in time.

    It is queued on the master and runs if the master stays up; a failover
    before a replica caught up could lose it. Submitting it again may run it
    twice, so what to do is the producer's choice (wait for its result with a
    deadline, say, and submit again only then).
    """

    def __init__(self, job_id: str, wanted: int, confirmed: int) -> None:
        super().__init__(f"job {job_id} reached {confirmed} of {wanted} replicas")
        self.job_id, self.wanted, self.confirmed = job_id, wanted, confirmed


class Client:
    """A producer: pushes jobs (``submit``), waits for results (``wait``), follows streams (``stream``).

    ``settings`` give the queue names and the key prefix (the defaults when
    None); the connection is the caller's, or the settings' (``from_settings``)::

        client = Client(redis.Redis.from_url("redis://localhost:6379/0"))
        job_id = client.submit("chat", {"messages": [{"role": "user", "content": "Hi"}]}, model="llama3.2")
        result = client.wait(job_id, timeout=60)  # the result object, or None on timeout
        if result and result["success"]:
            print(result["response"]["message"]["content"])
    """

    def __init__(self, client: redis.Redis, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.redis = client
        self.keys = Keys(self.settings.redis.key_prefix, self.settings.queue.dead_letter)
        q = self.settings.queue
        self.queue_of = {"chat": q.chat, "generate": q.chat, "embeddings": q.embeddings, "batch": q.batch}

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(connect(settings, timeout=60.0), settings)

    def submit(
        self,
        type: str,
        request: dict[str, Any],
        *,
        model: str | None = None,
        user_id: str = "llm-worker-client",
        job_id: str | None = None,
        queue: str | None = None,
        correlation_id: str | None = None,
        timeout_ms: int | None = None,
        max_retries: int | None = None,
        priority: int = 0,
        urgent: bool = False,
        delay_ms: int = 0,
        replicas: int = 0,
        replica_timeout_ms: int = 1000,
        **extra: Any,
    ) -> str:
        """Queue a job; return its id. ``urgent`` puts it at the serving end (RPUSH).

        ``delay_ms`` holds it in the delayed set (``llm:delayed``) until due, then
        any host's supervisor queues it at the serving end, as it does a retry;
        its ``createdAt`` is when it is due, so its queueTime is the wait after.

        ``replicas``: wait (Redis WAIT) until that many replicas hold the push,
        so that a Sentinel failover cannot lose it; NotReplicated after
        ``replica_timeout_ms`` if fewer did.
        """
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise ValueError(f"delay_ms must be 0 to {MAX_DELAY_MS}, not {delay_ms}")
        due = time.time() + delay_ms / 1000
        job: dict[str, Any] = {
            "id": job_id or str(uuid.uuid4()),
            "type": type,
            "userId": user_id,
            "request": request,
            "priority": priority,
            "createdAt": iso(due),
            "retryCount": 0,
        }
        for key, value in (
            ("model", model),
            ("correlationId", correlation_id),
            ("timeout", timeout_ms),
            ("maxRetries", max_retries),
        ):
            if value is not None:
                job[key] = value
        job.update(extra)
        target = queue or self.queue_of[type]
        payload = _encode(job)
        if delay_ms > 0:  # as a retry waits: "<queue>\n<job>", scored by the due time in ms (docs/protocol.md)
            self.redis.zadd(self.keys.delayed, {target.encode() + b"\n" + payload: int(due * 1000)})
        elif urgent:
            self.redis.rpush(target, payload)
        else:
            self.redis.lpush(target, payload)
        if replicas > 0:
            confirmed = self.redis.wait(replicas, replica_timeout_ms)
            if confirmed < replicas:
                raise NotReplicated(job["id"], replicas, confirmed)
        return job["id"]

    def result(self, job_id: str) -> dict[str, Any] | None:
        blob = self.redis.get(self.keys.result(job_id))
        return msgspec.json.decode(blob) if blob is not None else None

    def wait(self, job_id: str, timeout: float = 300.0) -> dict[str, Any] | None:
        """Block until the job has its result (None after ``timeout`` seconds)."""
        found = self.result(job_id)
        if found is not None:
            return found
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # BLPOP takes whole seconds on old servers; wait in short turns.
            if self.redis.blpop([self.keys.done(job_id)], timeout=min(left, 5.0)) is not None or self.redis.exists(
                self.keys.result(job_id)
            ):
                return self.result(job_id)

    def stream(self, job_id: str, timeout: float = 300.0) -> Iterator[str]:
        """Yield a streaming job's text as it arrives; raise JobFailed on an error entry.

        A ``reset`` entry (the job is running again after its worker died)
        is yielded as the empty string after a form feed ``"\\f"``: callers
        that show text should clear what they showed.
        """
        key = self.keys.stream(job_id)
        last = "0-0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.redis.xread({key: last}, block=1000, count=256)
            if not reply:
                result = self.result(job_id)
                if result is not None and not self.redis.exists(key):
                    if not result.get("success"):
                        raise JobFailed(result)
                    return  # finished without streaming (e.g. answered before we looked)
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                event = fields.get(b"event")
                if event == b"chunk":
                    yield fields.get(b"content", b"").decode()
                elif event == b"reset":
                    yield "\f"
                elif event == b"done":
                    return
                elif event == b"error":
                    raise JobFailed(
                        self.result(job_id) or {"error": fields.get(b"error", b"").decode(), "errorType": "unknown"}
                    )
        raise TimeoutError(f"no end of stream for job {job_id} within {timeout}s")
