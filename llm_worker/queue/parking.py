"""Model affinity's side of the queue: jobs parked by model, taken by the hosts that hold it.

Producers push to the same queues as ever. A worker that takes a job whose
model another host holds (or that this host could only load by evicting a
busy model) parks it: a fenced move from its processing list to the end of
that model's parked list of the queue (park.lua). Hosts then take parked jobs
of the models they hold with a free slot, of models they can load without
evicting a busy one (claimed, so that one host loads it), and, past
MODEL_AFFINITY_MAX_WAIT, the oldest parked job whatever its model (pick.lua).
A job is always in exactly one list; a parked job taken lands in the
worker's processing list exactly as a BLMOVE leaves it, so the fence, crash
recovery and reconcile work unchanged (a recovered job goes back to its
queue and is sorted again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from llm_worker.queue.keys import Keys
from llm_worker.queue.scripts import (
    ClaimArgs,
    ClaimKeys,
    ParkArgs,
    ParkKeys,
    PickArgs,
    PickKeys,
    Script,
    UnparkArgs,
    UnparkKeys,
    flag,
)

CLAIM_MS = 5_000  # a claim outlives the load's start until the host's holdings say it holds the model


@dataclass(frozen=True)
class Picked:
    """A parked job taken into a worker's processing list."""

    raw: bytes
    model: str
    why: str  # hot | cold | overdue
    waited_ms: int  # how long it was parked


class Parking:
    """The parked lists of every queue, over one Redis connection."""

    def __init__(self, client: redis.Redis, keys: Keys, host: str) -> None:
        self.redis = client
        self.keys = keys
        self.host = host
        self._park = Script(client, "park")
        self._pick = Script(client, "pick")
        self._claim = Script(client, "claim")

    def park(self, worker_id: str, raw: bytes, queue: str, model: str) -> bool:
        """Move a taken job to its model's parked list; False when it was no longer ours (recovered)."""
        k = self.keys
        keys = ParkKeys(processing=k.processing(worker_id), parked=k.parked(queue, model), index=k.parked_index(queue))
        return self._park(keys, ParkArgs(payload=raw, model=model)) == 1

    def pick(
        self, worker_id: str, queue: str, hot: list[str], cold: bool, elsewhere: set[str], max_wait_ms: int
    ) -> tuple[Picked | None, int]:
        """Take a parked job for this worker: overdue, hot, then (``cold``: the host has room to load one) of a
        model no host in ``elsewhere`` holds. Returns it, or None and how many models have parked jobs."""
        k = self.keys
        args = PickArgs(
            parked_prefix=k.parked(queue, ""),
            claim_prefix=k.claim(""),
            max_wait_ms=max_wait_ms,
            host=self.host,
            claim_ms=CLAIM_MS,
            cold=flag(cold),
            hot_count=len(hot),
            models=tuple(hot) + tuple(sorted(elsewhere - set(hot))),
        )
        reply = self._pick(PickKeys(processing=k.processing(worker_id), index=k.parked_index(queue)), args)
        if len(reply) == 1:
            return None, int(reply[0])
        raw, model, why, waited = reply
        return Picked(raw, model.decode(), why.decode(), int(waited)), 0

    def claim(self, model: str) -> bool:
        """Claim a model no host holds, for this host to load; False when another host's claim is live."""
        return self._claim(ClaimKeys(claim=self.keys.claim(model)), ClaimArgs(host=self.host, claim_ms=CLAIM_MS)) == 1

    def claims(self, models: list[str]) -> dict[str, str]:
        """Who claimed each of ``models`` (models nobody claims are left out)."""
        if not models:
            return {}
        held = self.redis.mget([self.keys.claim(m) for m in models])
        return {m: h.decode() for m, h in zip(models, held) if h is not None}


def parked_counts(client: redis.Redis, keys: Keys, queues: list[str]) -> dict[str, dict[str, int]]:
    """Jobs parked now, per queue and model (queues with none are left out); two round trips."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrange(keys.parked_index(queue), 0, -1)
    indexes: list[Any] = pipe.execute()
    pipe = client.pipeline(transaction=False)
    wanted = [(queue, m.decode()) for queue, models in zip(queues, indexes) for m in models]
    for queue, model in wanted:
        pipe.llen(keys.parked(queue, model))
    out: dict[str, dict[str, int]] = {}
    for (queue, model), length in zip(wanted, pipe.execute()):
        if length:
            out.setdefault(queue, {})[model] = int(length)
    return out


def parked_models(client: redis.Redis, keys: Keys, queues: list[str]) -> list[str]:
    """Models with parked jobs in any of ``queues``, the one parked longest first."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrange(keys.parked_index(queue), 0, -1, withscores=True)
    oldest: dict[str, float] = {}
    for entries in pipe.execute():
        for model, ms in entries:
            label = model.decode()
            oldest[label] = min(ms, oldest.get(label, ms))
    return sorted(oldest, key=oldest.__getitem__)


def oldest_parked(client: redis.Redis, keys: Keys, queues: list[str]) -> dict[str, tuple[str, float]]:
    """Per queue with parked jobs: the model of its oldest one and when it was parked (epoch seconds)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.zrange(keys.parked_index(queue), 0, 0, withscores=True)
    out = {}
    for queue, first in zip(queues, pipe.execute()):
        if first:
            model, ms = first[0]
            out[queue] = (model.decode(), ms / 1000.0)
    return out


def unpark_all(client: redis.Redis, keys: Keys, queue: str, most: int = 1000) -> int:
    """Move every parked job of ``queue`` back to the queue, to be taken first in first out (unpark.lua)."""
    script = Script(client, "unpark")
    moved = 0
    while True:
        step = int(script(UnparkKeys(keys.parked_index(queue), queue), UnparkArgs(keys.parked(queue, ""), most)))
        moved += step
        if step < most:
            return moved
