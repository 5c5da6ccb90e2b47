"""Periodic Redis chores of the supervisor: heartbeats, due retries, dead hosts, Redis health.

Each chore runs on its own period. The client's timeouts are short so that a
Redis that does not answer stalls the loop for at most about a second; after
one failure the rest of the turn's chores wait for the next turn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from llm_worker.host.chores import Chore
from llm_worker.host.shm import SharedState
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo
from llm_worker.settings.config import Settings
from llm_worker.supervisor.recovery import Recovery

log = logging.getLogger("llm_worker.supervisor")
SWEEP_PERIOD = 1.0  # seconds, at most, between looks for other hosts' expired workers


class Housekeeping:
    def __init__(
        self,
        rq: ReliableQueue,
        settings: Settings,
        state: SharedState,
        recovery: Recovery,
        live_workers: Callable[[], dict[str, WorkerInfo]],
    ) -> None:
        self.rq = rq
        self.settings = settings
        self.state = state
        self.recovery = recovery
        self.live_workers = live_workers
        hb = settings.worker.heartbeat_timeout / 1000
        self.chores = [
            Chore("ping", 1.0, self._ping),
            Chore("recover", 1.0, recovery.retry_pending),
            Chore("heartbeats", hb / 3, self._heartbeats),
            Chore("promote", 0.2, self._promote),
            # A dead host's heartbeats expire at most `hb` after it died; sweeping often
            # (one HGETALL and one pipelined EXISTS round) recovers its jobs soon after.
            Chore("sweep", min(hb / 5, SWEEP_PERIOD), lambda: recovery.sweep(set(self.live_workers()))),
        ]
        self.redis_down_since: float | None = None

    def next_due(self) -> float:
        return min(c.due for c in self.chores)

    def tick(self) -> None:
        now = time.monotonic()
        for chore in self.chores:
            if now < chore.due:
                continue
            try:
                chore.run()
            except redis.RedisError as exc:
                self._redis_failed(exc)
                chore.due = now + min(chore.period, 1.0)
                return
            chore.due = now + chore.period

    def _ping(self) -> None:
        self.rq.redis.ping()
        header = self.state.header
        header.redis_checked = time.monotonic()
        if self.redis_down_since is not None:
            log.warning(
                "Redis reachable again", extra={"downSeconds": round(time.monotonic() - self.redis_down_since, 1)}
            )
            self.redis_down_since = None
            warn_if_jobs_can_be_lost(self.rq.redis)
        header.redis_up = 1

    def _heartbeats(self) -> None:
        workers = self.live_workers()
        if workers:
            self.rq.refresh_heartbeats(workers, self.settings.worker.heartbeat_timeout)

    def _promote(self) -> None:
        moved = self.rq.promote_due()
        if moved:
            log.debug("due retries back in their queues", extra={"moved": moved})

    def _redis_failed(self, exc: redis.RedisError) -> None:
        self.state.header.redis_up = 0
        self.state.header.redis_checked = time.monotonic()
        if self.redis_down_since is None:
            self.redis_down_since = time.monotonic()
            if isinstance(exc, redis.AuthenticationError):
                log.error(
                    "Redis refused our credentials (REDIS_URL, REDIS_USERNAME, REDIS_PASSWORD)",
                    extra={"error": str(exc)},
                )
            else:
                log.error("Redis unreachable; workers wait for it and jobs in hand are kept", extra={"error": str(exc)})


def warn_if_jobs_can_be_lost(client: redis.Redis) -> None:
    """Say loudly when this Redis could lose queued jobs: no persistence, or eviction."""
    try:
        config = client.config_get("appendonly")
        config.update(client.config_get("save"))
        config.update(client.config_get("maxmemory-policy"))
    except redis.ResponseError as exc:
        log.info(
            "cannot read Redis persistence settings (CONFIG is not allowed); make sure AOF is on",
            extra={"error": str(exc)},
        )
        return
    if config.get("appendonly") != "yes":
        if config.get("save"):
            log.warning(
                "Redis has no AOF, only snapshots: jobs queued or finished since the last snapshot are lost if "
                "Redis restarts. Set appendonly yes."
            )
        else:
            log.warning(
                "Redis has no persistence at all: every queued and running job is lost if Redis restarts. Set "
                "appendonly yes."
            )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        log.warning(
            f"Redis maxmemory-policy is {policy}: under memory pressure Redis may delete queued jobs. Use noeviction."
        )
