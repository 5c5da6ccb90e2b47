"""Queue administration: depths, dead letters, requeue and purge.

Used by ``llm-worker queues`` and the admin HTTP routes. Requeueing a dead
letter is atomic (it leaves the dead-letter list only as it enters its queue)
and clears the job's old failure result, so a producer waiting afresh does
not read the old answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import parked_counts
from llm_worker.queue.reliable import COMPLETED, FAILED, registered_workers
from llm_worker.queue.scripts import RequeueArgs, RequeueKeys, Script
from llm_worker.settings.config import Settings


@dataclass(frozen=True)
class Depths:
    waiting: dict[str, int]
    processing: dict[str, int]  # per worker id
    delayed: int
    dead_letter: int
    parked: dict[str, dict[str, int]]  # per queue and model: waiting for a host holding the model (affinity)

    def as_dict(self) -> dict[str, Any]:
        return {
            "waiting": self.waiting,
            "processing": self.processing,
            "parked": self.parked,
            "delayed": self.delayed,
            "deadLetter": self.dead_letter,
        }


class QueueAdmin:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
        self._requeue = Script(client, "requeue")

    def queues(self) -> list[str]:
        q = self.settings.queue
        names = [q.chat, q.embeddings, q.batch, q.priority, *q.extra]
        return names + [name for name in self.settings.pools if name not in names]

    def depths(self) -> Depths:
        pipe = self.redis.pipeline(transaction=False)
        names = self.queues()
        for name in names:
            pipe.llen(name)
        pipe.zcard(self.keys.delayed)
        pipe.llen(self.keys.dead_letter)
        *waiting, delayed, dead = pipe.execute()
        processing = {}
        for key in self.redis.scan_iter(match=self.keys.processing("*"), count=500):
            length = self.redis.llen(key)
            if length:
                processing[key.decode()[len(self.keys.processing("")) :]] = length
        parked = parked_counts(self.redis, self.keys, names)
        return Depths(dict(zip(names, waiting)), processing, delayed, dead, parked)

    def stats(self) -> dict[str, Any]:
        """Per queue, across every host: waiting, active (in a worker's hands), completed, failed, parked.

        The shape of the gateway's /admin/queue/stats, plus the jobs parked
        for a host holding their model (also counted as waiting) and the
        delayed and dead-letter totals.
        """
        names = self.queues()
        holders = [(worker, info.queue) for worker, info in registered_workers(self.redis, self.keys).items()]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
            pipe.hgetall(self.keys.stats(name))
        for worker, _ in holders:
            pipe.llen(self.keys.processing(worker))
        pipe.zcard(self.keys.delayed)
        pipe.llen(self.keys.dead_letter)
        replies = pipe.execute()
        out: dict[str, Any] = {}
        for i, name in enumerate(names):
            counts = replies[2 * i + 1]
            out[name] = {
                "waiting": replies[2 * i],
                "parked": 0,
                "active": 0,
                "completed": int(counts.get(COMPLETED.encode(), 0)),
                "failed": int(counts.get(FAILED.encode(), 0)),
            }
        for (_, queue), held in zip(holders, replies[2 * len(names) :]):
            if queue in out:
                out[queue]["active"] += held
        for queue, models in parked_counts(self.redis, self.keys, names).items():
            out[queue]["parked"] = sum(models.values())
            out[queue]["waiting"] += out[queue]["parked"]
        out["delayed"], out["deadLetter"] = replies[-2], replies[-1]
        return out

    def dead_letters(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest dead letters first."""
        return [msgspec.json.decode(raw) for raw in self.redis.lrange(self.keys.dead_letter, 0, max(0, limit - 1))]

    def _raw_dead_letters(self) -> Iterator[bytes]:
        yield from self.redis.lrange(self.keys.dead_letter, 0, -1)

    def requeue(self, job_id: str | None = None) -> tuple[int, list[str]]:
        """Put dead-lettered jobs (one by id, or all) back at the end of their queues.

        Returns how many were requeued and why others were not.
        """
        moved, skipped = 0, []
        for raw in self._raw_dead_letters():
            entry = msgspec.json.decode(raw)
            job = entry.get("job")
            if not isinstance(job, dict) or not isinstance(job.get("id"), str):
                if job_id is None:
                    skipped.append(f"a payload that was not a job ({str(entry.get('error'))[:80]})")
                continue
            if job_id is not None and job["id"] != job_id:
                continue
            job["retryCount"] = 0
            queue = entry.get("queue") or self.settings.queue.chat
            keys = RequeueKeys(
                dead_letter=self.keys.dead_letter,
                queue=queue,
                result_key=self.keys.result(job["id"]),
                done_key=self.keys.done(job["id"]),
                crashes=self.keys.crashes(job["id"]),
            )
            moved += int(self._requeue(keys, RequeueArgs(entry=raw, payload=msgspec.json.encode(job))))
            if job_id is not None:
                break
        return moved, skipped

    def purge(self, name: str) -> int | None:
        """Delete a queue (or the dead-letter list) with everything in it, its parked jobs included; return how
        many jobs.

        None, and nothing deleted, when ``name`` is no queue: neither a queue
        the settings name nor a list in Redis (a key of another kind is left alone).
        """
        kind = self.redis.type(name)
        parked = [self.keys.parked(name, m.decode()) for m in self.redis.zrange(self.keys.parked_index(name), 0, -1)]
        if kind != b"list" and not parked:
            known = kind == b"none" and name in [*self.queues(), self.settings.queue.dead_letter]
            return 0 if known else None
        pipe = self.redis.pipeline()
        for key in [name, *parked]:
            pipe.llen(key)
        pipe.delete(name, self.keys.parked_index(name), *parked)
        *counts, _ = pipe.execute()
        return sum(int(c) for c in counts)
