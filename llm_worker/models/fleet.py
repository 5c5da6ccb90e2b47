"""What each host holds, published for the others: the fleet's half of model affinity.

The model manager publishes, twice a second, the models this host has loaded
or is loading, with their slots and how many are busy, under a key that
expires when it stops (a host that dies drops out of every view within
seconds, whatever the hosts' clocks say). Workers read it to tell a job
whose model another host holds (park it for that host) from one no host
holds (load it here, if that evicts no busy model); /status shows it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from llm_worker.host.layout import SlotState
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.shm import SharedState
from llm_worker.protocol.jobs import iso
from llm_worker.queue.keys import Keys

PUBLISH_EVERY = 0.5  # seconds between two publications of a host's holdings
EXPIRES_MS = 3_000  # a host that stops publishing leaves every view this much later
VIEW_TTL = 0.25  # seconds a worker's view of the fleet is reused before it is read again
LOADED, LOADING = "loaded", "loading"
log = logging.getLogger("llm_worker.models.fleet")


class ModelHeld(msgspec.Struct, kw_only=True, rename="camel"):
    """One model a host holds."""

    state: str  # loaded | loading
    slots: int  # calls it serves at once (OLLAMA_NUM_PARALLEL; 1 for an embedding model)
    busy: int  # the host's workers calling it now


class Holdings(msgspec.Struct, kw_only=True, rename="camel"):
    """What one host holds, as it publishes it."""

    host: str  # WORKER_ID
    hostname: str
    at: str  # when published (ISO 8601, the host's clock: for people; expiry decides liveness)
    cache_size: int  # most models it keeps loaded
    models: dict[str, ModelHeld]  # by model label

    def holds(self, label: str) -> bool:
        return label in self.models


_decode = msgspec.json.Decoder(Holdings).decode
_encode = msgspec.json.Encoder().encode


def busy_by_model(state: SharedState) -> dict[int, int]:
    """How many of the host's workers are in a call of each model (by label index)."""
    out: dict[int, int] = {}
    for slot in state.slots:
        if slot.up() and slot.state == SlotState.BUSY and slot.model > 0:
            out[slot.model] = out.get(slot.model, 0) + 1
    return out


def held_here(state: SharedState, board: LoadBoard, slots_of: Callable[[str], int]) -> dict[str, ModelHeld]:
    """The models this host has loaded or is loading, from shared memory (the manager's board)."""
    busy = busy_by_model(state)
    out = {}
    for index, label in enumerate(state.model_labels()):
        if index == 0:  # "other" lumps unlisted models together: not one model
            continue
        row = board.board.rows[index]
        if row.resident or row.started:
            out[label] = ModelHeld(
                state=LOADED if row.resident else LOADING, slots=slots_of(label), busy=busy.get(index, 0)
            )
    return out


def has_room(held: dict[str, ModelHeld], cache_size: int) -> bool:
    """Whether the host can load one more model without evicting a busy one: a free place in its cache, or a
    loaded model no worker is calling (the manager evicts the least recently used idle one)."""
    if len(held) < cache_size:
        return True
    return any(m.state == LOADED and m.busy == 0 for m in held.values())


def hot(held: dict[str, ModelHeld]) -> list[str]:
    """The loaded models with a free slot, the most free first."""
    free = [(m.slots - m.busy, label) for label, m in held.items() if m.state == LOADED and m.busy < m.slots]
    return [label for _, label in sorted(free, key=lambda f: (-f[0], f[1]))]


class Fleet:
    """The fleet's published holdings in Redis: one host's writes, and everyone's reads."""

    def __init__(self, client: redis.Redis, keys: Keys, me: str) -> None:
        self.redis = client
        self.keys = keys
        self.me = me

    def publish(self, models: dict[str, ModelHeld], cache_size: int) -> None:
        held = Holdings(host=self.me, hostname=os.uname().nodename, at=iso(), cache_size=cache_size, models=models)
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(self.keys.fleet, self.me)
        pipe.set(self.keys.holdings(self.me), _encode(held), px=EXPIRES_MS)
        pipe.execute()

    def withdraw(self) -> None:
        """Leave the fleet's view now (a clean stop), not when the key expires."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.srem(self.keys.fleet, self.me)
        pipe.delete(self.keys.holdings(self.me))
        pipe.execute()

    def read(self) -> dict[str, Holdings]:
        """Every live host's holdings, this host's included; hosts whose key expired are dropped from the set."""
        hosts = sorted(h.decode() for h in self.redis.smembers(self.keys.fleet))
        if not hosts:
            return {}
        blobs = self.redis.mget([self.keys.holdings(h) for h in hosts])
        out, gone = {}, []
        for host, blob in zip(hosts, blobs):
            if blob is None:
                gone.append(host)
                continue
            try:
                out[host] = _decode(blob)
            except msgspec.DecodeError:  # not ours (hand-written): skipped, as the registry skips such entries
                continue
        if gone:
            self.redis.srem(self.keys.fleet, *gone)
        return out


@dataclass(frozen=True)
class FleetSeen:
    """The fleet as the HTTP process last sampled it, for /status."""

    hosts: dict[str, Holdings]
    parked: dict[str, dict[str, int]]  # queue -> model -> jobs parked

    def document(self) -> dict[str, Any]:
        return {
            "hosts": {host: msgspec.to_builtins(held) for host, held in sorted(self.hosts.items())},
            "parked": self.parked,
        }


class FleetView:
    """A worker's view of the other hosts' holdings, read at most every VIEW_TTL."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._others: dict[str, Holdings] = {}
        self._read = -VIEW_TTL

    def others(self) -> dict[str, Holdings]:
        now = time.monotonic()
        if now - self._read >= VIEW_TTL:
            self._others = {h: held for h, held in self.fleet.read().items() if h != self.fleet.me}
            self._read = now
        return self._others

    def held_elsewhere(self) -> set[str]:
        """Model labels another live host has loaded or is loading."""
        return {label for held in self.others().values() for label in held.models}
