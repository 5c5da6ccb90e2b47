"""The Redis reliable queue: take, finish (ack, retry, dead-letter), recover, promote.

A worker takes a job with BLMOVE from its queue into its own processing list;
everything that ends the job is one Lua script that first removes the job from
that list (the fence), so a job recovered from a presumed-dead worker is never
answered twice. Every key's name comes from keys.py, the order of each
script's KEYS and ARGV from scripts.py, and what recover.lua and promote.lua
write for a job they dead-letter from templates.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import redis

from llm_worker.host.backoff import compute_backoff
from llm_worker.protocol.jobs import RAW_KEEP, DeadLetter, Result, iso
from llm_worker.queue.keys import Keys
from llm_worker.queue.scripts import (
    FinishArgs,
    FinishKeys,
    PromoteArgs,
    PromoteKeys,
    RecoverArgs,
    RecoverKeys,
    Script,
    flag,
)
from llm_worker.queue.templates import CrashTemplates, unplaced_entry
from llm_worker.settings.config import Settings

EVENTS_MAXLEN = 100_000
STREAM_MAXLEN = 10_000
CRASH_COUNTER_TTL = 7 * 86_400  # long enough to outlive any queue backlog
DONE_OK, DONE_FAILED = "ok", "failed"  # what a job's done marker says (PROTOCOL.md)
COMPLETED, FAILED = "completed", "failed"  # the fields of a queue's statistics hash
TRIM_LOG_INTERVAL = 60.0  # seconds: trimmed dead letters are logged at most this often, per process
_encode = msgspec.json.Encoder(decimal_format="number").encode  # jobs.loose() keeps numbers as Decimal
log = logging.getLogger("llm_worker.queue")


@dataclass(frozen=True)
class Target:
    """Where a finished job's payload goes besides its result: a list or the delayed set."""

    op: str = ""  # "" | zadd | lpush | rpush
    key: str = ""
    member: bytes | str = b""
    score: int = 0


class Finished(NamedTuple):
    ours: bool  # False: the job had been recovered from us, and nothing was written
    next: bytes | None  # the next job, when the finish was asked to take one


@dataclass(frozen=True)
class Event:
    """One entry of the events stream: a type and its JSON data (no prompt text)."""

    type: str
    data: dict[str, Any]


class WorkerInfo(msgspec.Struct, kw_only=True):
    """What the registry and a heartbeat key say of one worker process."""

    queue: str
    host: str
    hostname: str
    pid: int
    since: str


class DeferredEvents:
    """Events sent without waiting for Redis's reply; the replies are read later.

    The events sink writes every event this way: a job's ``started`` costs no
    round trip before its provider call, and the others none after its
    outcome. Events are telemetry: if the connection breaks, pending ones may
    be lost, never a job.
    """

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.pool = client.connection_pool
        self.key = key
        self.conn: Any = None
        self.pending = 0

    def send(self, event: Event) -> None:
        self.settle()  # the replies of earlier sends have long arrived; read them first
        try:
            if self.conn is None:
                self.conn = self.pool.make_connection()
            self.conn.send_command(
                "XADD", self.key, "MAXLEN", "~", EVENTS_MAXLEN, "*", "type", event.type, "data", _encode(event.data)
            )
            self.pending += 1
        except redis.RedisError:
            self._reset()

    def settle(self) -> None:
        """Read the replies of what was sent."""
        try:
            while self.pending:
                self.conn.read_response()
                self.pending -= 1
        except redis.RedisError:
            self._reset()

    def _reset(self) -> None:
        if self.conn is not None:
            self.conn.disconnect()
        self.conn = None
        self.pending = 0


def registered_workers(client: redis.Redis, keys: Keys) -> dict[str, WorkerInfo]:
    """Every host's registered workers; an entry that is not one of ours (hand-edited, say) is skipped."""
    out = {}
    for worker_id, blob in client.hgetall(keys.registry).items():
        try:
            out[worker_id.decode()] = msgspec.json.decode(blob, type=WorkerInfo)
        except (msgspec.MsgspecError, UnicodeDecodeError):
            continue
    return out


class ReliableQueue:
    """Queue operations over one Redis connection, for one process."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
        self.ttl = settings.queue.result_ttl
        self._finish = Script(client, "finish")
        self._recover = Script(client, "recover")
        self._promote = Script(client, "promote")
        self.keep = settings.queue.remove_on_fail
        self._trimmed = 0  # dead letters this process trimmed and has not logged yet
        self._trim_logged = -TRIM_LOG_INTERVAL  # time.monotonic() of that log

    def _count_trimmed(self, cut: int) -> None:
        """Note dead letters a script trimmed; say so in the log at most once a minute."""
        self._trimmed += cut
        now = time.monotonic()
        if self._trimmed and now - self._trim_logged >= TRIM_LOG_INTERVAL:
            log.warning(
                f"dead-letter list {self.keys.dead_letter} is at QUEUE_REMOVE_ON_FAIL={self.keep}: trimmed the "
                f"{self._trimmed} oldest dead letter(s) since the last such line "
                "(llm_worker_dead_letters_trimmed_total counts them all)",
                extra={"trimmed": self._trimmed, "keep": self.keep, "deadLetterQueue": self.keys.dead_letter},
            )
            self._trimmed, self._trim_logged = 0, now

    # ---- a worker's side -------------------------------------------------

    def take(self, queue: str, worker_id: str, timeout: float) -> bytes | None:
        """Block up to ``timeout`` seconds for a job; it lands in our processing list."""
        return self.redis.blmove(queue, self.keys.processing(worker_id), timeout, "RIGHT", "LEFT")

    def take_waiting(self, queue: str, worker_id: str, most: int) -> list[bytes]:
        """Take up to ``most`` jobs that are waiting now, without blocking, in one round trip.

        Each LMOVE is atomic on its own, so every job taken is in our
        processing list, exactly as a BLMOVE would leave it.
        """
        pipe = self.redis.pipeline(transaction=False)
        processing = self.keys.processing(worker_id)
        for _ in range(most):
            pipe.lmove(queue, processing, "RIGHT", "LEFT")
        return [raw for raw in pipe.execute() if raw is not None]

    def held(self, worker_id: str) -> list[bytes]:
        return self.redis.lrange(self.keys.processing(worker_id), 0, -1)

    def complete(
        self,
        worker_id: str,
        raw: bytes,
        result: Result,
        *,
        stream: str = "",
        take_from: str | None = None,
        queue: str = "",
    ) -> Finished:
        """Write the result and done marker and ack the job, fenced.

        ``stream`` ("done" or "error") also ends the job's chunk stream, in the
        same transaction, so the stream's last entry and the result agree.
        ``take_from`` also takes the next job of that queue, saving a round trip.
        """
        status = DONE_OK if result.success else DONE_FAILED
        return self._run_finish(worker_id, raw, result, status, Target(), stream, take_from, queue)

    def retry_later(
        self, worker_id: str, raw: bytes, queue: str, payload: bytes, due: float, *, take_from: str | None = None
    ) -> Finished:
        """Park the job (``payload``, its retry count raised) in the delayed set until ``due``."""
        member = queue.encode() + b"\n" + payload
        return self._run_finish(
            worker_id, raw, None, "", Target("zadd", self.keys.delayed, member, int(due * 1000)), "", take_from
        )

    def dead_letter(
        self,
        worker_id: str,
        raw: bytes,
        entry: DeadLetter,
        result: Result | None,
        *,
        stream: str = "",
        take_from: str | None = None,
    ) -> Finished:
        """Dead-letter the job with its reason and, when it has an id, its failure result."""
        target = Target("lpush", self.keys.dead_letter, _encode(entry))
        return self._run_finish(worker_id, raw, result, DONE_FAILED, target, stream, take_from, entry.queue)

    def hand_back(self, worker_id: str, raw: bytes, queue: str) -> bool:
        """Give an untouched job back to the serving end of its queue."""
        return self._run_finish(worker_id, raw, None, "", Target("rpush", queue, raw)).ours

    def forget(self, worker_id: str, raw: bytes) -> bool:
        """Drop a job from our processing list that is already answered."""
        return self._run_finish(worker_id, raw, None, "", Target()).ours

    def _run_finish(
        self,
        worker_id: str,
        raw: bytes,
        result: Result | None,
        status: str,
        target: Target,
        stream: str = "",
        take_from: str | None = None,
        queue: str = "",
    ) -> Finished:
        k = self.keys
        processing = k.processing(worker_id)
        job_id = result.job_id if result is not None else "-"
        keys = FinishKeys(
            processing=processing,
            result_key=k.result(job_id),
            done_key=k.done(job_id),
            target=target.key or processing,
            crashes=k.crashes(job_id),
            stream=k.stream(job_id),
            queue=take_from or processing,
            stats=k.stats(queue),
            trimmed=k.dead_letters_trimmed,
        )
        args = FinishArgs(
            payload=raw,
            result_json=_encode(result) if result is not None else "",
            done_status=status,
            ttl=self.ttl,
            target_op=target.op,
            target_member=target.member,
            target_score=target.score,
            stream_maxlen=STREAM_MAXLEN,
            take_next=flag(bool(take_from)),
            counted="" if result is None else (COMPLETED if result.success else FAILED),
            keep=self.keep if target.key == k.dead_letter else 0,
            stream_end=_stream_end(stream, result),
        )
        reply = self._finish(keys, args)
        if reply[2]:
            self._count_trimmed(int(reply[2]))
        return Finished(reply[0] == 1, reply[1])

    # ---- a supervisor's side ---------------------------------------------

    def register(self, worker_id: str, info: WorkerInfo, ttl_ms: int) -> None:
        """Announce a worker before it takes a job, so its list can always be found."""
        blob = _encode(info)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.registry, worker_id, blob)
        pipe.set(self.keys.heartbeat(worker_id), blob, px=ttl_ms)
        pipe.execute()

    def refresh_heartbeats(self, workers: dict[str, WorkerInfo], ttl_ms: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for worker_id, info in workers.items():
            blob = _encode(info)
            # The registry entry is rewritten too: another host may have removed
            # it while our heartbeats could not reach Redis.
            pipe.hset(self.keys.registry, worker_id, blob)
            pipe.set(self.keys.heartbeat(worker_id), blob, px=ttl_ms)
        pipe.execute()

    def registered(self) -> dict[str, WorkerInfo]:
        return registered_workers(self.redis, self.keys)

    def recover(self, worker_id: str, queue: str, *, crashed: bool, only_if_expired: bool = False) -> tuple[int, int]:
        """Hand back a gone worker's jobs. Returns (requeued, dead-lettered); (-1, 0) if alive."""
        k = self.keys
        s = self.settings
        crash = CrashTemplates.for_worker(worker_id, queue, s.worker.max_crashes, iso())
        keys = RecoverKeys(
            processing=k.processing(worker_id),
            queue=queue,
            dead_letter=k.dead_letter,
            events=k.events,
            heartbeat=k.heartbeat(worker_id),
            registry=k.registry,
            stats=k.stats(queue),
            trimmed=k.dead_letters_trimmed,
        )
        args = RecoverArgs(
            count_crash=flag(crashed),
            max_crashes=s.worker.max_crashes,
            only_if_expired=flag(only_if_expired),
            worker_id=worker_id,
            max_job_bytes=s.limits.max_job_bytes,
            raw_keep=RAW_KEEP,
            result_prefix=k.result(""),
            done_prefix=k.done(""),
            crashes_prefix=k.crashes(""),
            result_ttl=self.ttl,
            crash_counter_ttl=CRASH_COUNTER_TTL,
            events_maxlen=EVENTS_MAXLEN,
            done_status=DONE_FAILED,
            counted=FAILED,
            reason_format=crash.reason_format,
            result_template=crash.result,
            entry_template=crash.entry,
            raw_entry_template=crash.raw_entry,
            event_template=crash.event,
            failed_event=crash.failed_event,
            dead_lettered_event=crash.dead_lettered_event,
            keep=self.keep,
        )
        requeued, dead, cut = self._recover(keys, args)
        if cut:
            self._count_trimmed(int(cut))
        return int(requeued), int(dead)

    def promote_due(self, now: float | None = None, limit: int = 500) -> int:
        now = time.time() if now is None else now
        keys = PromoteKeys(
            delayed=self.keys.delayed, dead_letter=self.keys.dead_letter, trimmed=self.keys.dead_letters_trimmed
        )
        args = PromoteArgs(
            now_ms=int(now * 1000),
            most=limit,
            raw_keep=RAW_KEEP,
            entry_template=unplaced_entry(self.keys.delayed, iso(now)),
            keep=self.keep,
        )
        moved, cut = self._promote(keys, args)
        if cut:
            self._count_trimmed(int(cut))
        return int(moved)


def _stream_end(stream: str, result: Result | None) -> tuple[str, ...]:
    """The last entry of a streaming job's stream, field and value pairs: done, error, or none."""
    if stream == "done":
        return ("event", "done")
    if stream == "error":
        return ("event", "error", "error", result.error or "" if result is not None else "")
    return ()


def retry_delay(settings: Settings, retry_count: int) -> float:
    """Seconds to wait before attempt ``retry_count`` + 1: QUEUE_DELAY, doubled per retry unless fixed, capped.

    Equal jitter (half the delay fixed, half random), so that jobs failed
    together by one outage do not all return in the same instant.
    """
    q = settings.queue
    return compute_backoff(
        retry_count + 1,
        q.delay / 1000.0,
        cap=q.max_delay / 1000.0,
        factor=1.0 if q.backoff == "fixed" else 2.0,
        jitter="equal",
    )
