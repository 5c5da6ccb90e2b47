"""Hand the jobs of dead workers back: ours at once, other hosts' once their heartbeat expired."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

from llm_worker.host.procs import alive
from llm_worker.host.shm import SharedState
from llm_worker.queue.reliable import ReliableQueue

log = logging.getLogger("llm_worker.supervisor")


@dataclass(frozen=True)
class Gone:
    """A worker whose processing list must be handed back."""

    worker_id: str
    queue: str
    crashed: bool  # raise the crash count of what it held
    only_if_expired: bool = False  # another host's: only once its heartbeat key is gone


class Recovery:
    """Recovers processing lists, remembering those Redis could not take yet."""

    def __init__(self, rq: ReliableQueue, host_id: str, state: SharedState) -> None:
        self.rq = rq
        self.host_id = host_id
        self.state = state  # counts what was recovered, for /metrics
        self.pending: dict[str, Gone] = {}

    def worker_gone(self, gone: Gone) -> None:
        """Recover now if Redis answers, else as soon as it does."""
        self.pending[gone.worker_id] = gone
        self.retry_pending()

    def retry_pending(self) -> None:
        for worker_id, gone in list(self.pending.items()):
            try:
                requeued, dead = self.rq.recover(
                    gone.worker_id, gone.queue, crashed=gone.crashed, only_if_expired=gone.only_if_expired
                )
            except redis.RedisError as exc:
                log.warning(
                    "cannot recover a worker's jobs yet; Redis unreachable",
                    extra={"deadWorker": worker_id, "error": str(exc)},
                )
                return
            del self.pending[worker_id]
            if requeued < 0:
                continue  # its heartbeat came back: alive after all
            self.state.header.jobs_requeued += requeued
            self.state.header.jobs_crash_dead_lettered += dead
            if requeued or dead:
                log.warning(
                    "recovered jobs of a dead worker",
                    extra={
                        "deadWorker": worker_id,
                        "queue": gone.queue,
                        "requeued": requeued,
                        "deadLettered": dead,
                        "countedAsCrash": gone.crashed,
                    },
                )

    def sweep(self, own: set[str]) -> None:
        """Recover every registered worker, of any host, whose heartbeat has expired."""
        others = [(w, info) for w, info in self.rq.registered().items() if w not in own and w not in self.pending]
        if not others:
            return
        pipe = self.rq.redis.pipeline(transaction=False)
        for worker_id, _ in others:
            pipe.exists(self.rq.keys.heartbeat(worker_id))
        for (worker_id, info), beating in zip(others, pipe.execute()):
            if not beating:
                self.worker_gone(Gone(worker_id, info.queue, crashed=True, only_if_expired=True))

    def previous_incarnation(self, own_hostname: str) -> None:
        """At start: recover at once the workers this host ran before a restart.

        Their heartbeats may still have seconds to live, but a pid that no
        longer exists on this machine is proof enough that they are gone.
        """
        for worker_id, info in self.rq.registered().items():
            if info.host != self.host_id or info.hostname != own_hostname or alive(info.pid):
                continue
            self.worker_gone(Gone(worker_id, info.queue, crashed=True))
