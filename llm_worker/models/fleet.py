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
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import redis

from llm_worker.host.backpressure import bound_for
from llm_worker.host.layout import MAX_MODELS, Phase
from llm_worker.host.loadboard import can_load_without_evicting_busy, endpoint_has_room, managed_up
from llm_worker.host.shm import SharedState
from llm_worker.models.policy import memory_in_use
from llm_worker.protocol.jobs import iso
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import Parking, parked_models
from llm_worker.settings.config import Settings

PUBLISH_EVERY = 0.5  # seconds between two publications of a host's holdings
EXPIRES_MS = 5_000  # a host that stops publishing leaves every view this much later (10 publications missed)
VIEW_TTL = 0.25  # seconds a worker's view of the fleet is reused before it is read again
LOADED, LOADING, DRAINING = "loaded", "loading", "draining"  # draining: to be unloaded once its calls end
DEMAND_RETRY = 60.0  # seconds before a model whose load by demand failed on an endpoint is tried there again
log = logging.getLogger("llm_worker.models.fleet")


class ModelHeld(msgspec.Struct, kw_only=True, rename="camel"):
    """One model a host holds."""

    state: str  # loaded | loading | draining
    slots: int  # calls it serves at once (OLLAMA_NUM_PARALLEL; 1 for an embedding model)
    busy: int  # the host's workers calling it now


class Holdings(msgspec.Struct, kw_only=True, rename="camel"):
    """What one host holds, as it publishes it."""

    host: str  # WORKER_ID
    hostname: str
    at: str  # when published (ISO 8601, the host's clock: for people; expiry decides liveness)
    cache_size: int  # most models it keeps loaded
    queues: list[str] = []  # the queues its workers take from: a job of another queue is not parked for it
    models: dict[str, ModelHeld]  # by model label

    def holds(self, label: str) -> bool:
        return label in self.models


_decode = msgspec.json.Decoder(Holdings).decode
_encode = msgspec.json.Encoder().encode


def held_here(state: SharedState) -> dict[str, ModelHeld]:
    """The models this host has loaded or is loading, on any endpoint its manager keeps that is up.

    A model's slots and busy workers are summed over the endpoints that hold it
    (a worker counts as busy with it while calling, waiting for a slot, or
    bound for it there: backpressure.bound_for).
    """
    labels = state.model_labels()
    bound = bound_for(state)
    out: dict[str, ModelHeld] = {}
    draining_only: set[str] = set()  # held only where it drains: it is leaving this host
    for endpoint in managed_up(state):
        rows = state.loads.endpoints[endpoint].rows
        for index in range(1, min(len(labels), MAX_MODELS)):  # 0 is "other": not one model
            row = rows[index]
            if not (row.resident or row.started):
                continue
            label = labels[index]
            was = out.get(label)
            serving = bool(row.resident) and not row.draining  # takes jobs here
            if was is None:
                draining_only.add(label)
            if not row.draining:
                draining_only.discard(label)
            loaded = serving or (was is not None and was.state == LOADED)
            out[label] = ModelHeld(
                state=LOADED if loaded else LOADING,
                slots=(was.slots if was else 0) + (max(1, row.slots) if serving else 0),
                busy=(was.busy if was else 0) + (bound.get((endpoint, index), 0) if serving else 0),
            )
    for label in draining_only:  # a model draining on every endpoint that has it
        out[label] = msgspec.structs.replace(out[label], state=DRAINING, slots=0)
    return out


def taking_no_jobs(state: SharedState) -> bool:
    """Whether every worker of the host that is up is paused (backpressure); False while none is up yet."""
    up = [slot for slot in state.slots if slot.up()]
    return bool(up) and all(slot.paused for slot in up)


def cache_size_here(state: SharedState) -> int:
    """Models this host keeps loaded, all its managed endpoints together."""
    return sum(state.loads.endpoints[endpoint].cache_size for endpoint in managed_up(state))


def has_room(state: SharedState) -> bool:
    """Whether the host can load one more model without evicting a busy one (loadboard's test, for any model)."""
    return can_load_without_evicting_busy(state, "")


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

    def publish(self, models: dict[str, ModelHeld], cache_size: int, queues: list[str]) -> None:
        held = Holdings(
            host=self.me, hostname=os.uname().nodename, at=iso(), cache_size=cache_size, models=models, queues=queues
        )
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

    def held_elsewhere(self, queue: str) -> set[str]:
        """Model labels another live host that takes jobs of ``queue`` has loaded or is loading (not those it is
        letting go): a job parked for a host that does not serve its queue would only wait out the bound."""
        return {
            label
            for held in self.others().values()
            if queue in held.queues
            for label, model in held.models.items()
            if model.state != DRAINING
        }


class EndpointManager(Protocol):
    """What the fleet duty needs of one endpoint's model manager (models/manager.py)."""

    endpoint: int
    loading: set[str]
    available: set[str]
    demand_failed: dict[str, float]

    def demand(self, label: str) -> None: ...


class FleetDuty:
    """The model manager's part for the fleet, on its main thread: publish what the host holds, and load by
    demand (MODEL_AFFINITY) a model that parked jobs wait for and no host holds, on an endpoint with room."""

    def __init__(self, settings: Settings, state: SharedState, fleet: Fleet, managers: list[EndpointManager]) -> None:
        self.settings = settings
        self.state = state
        self.fleet = fleet
        self.managers = managers
        self.parking = Parking(fleet.redis, fleet.keys, fleet.me)
        self.complaint = ""

    def share(self) -> None:
        """Never raises: Redis away is said once, and the next turn tries again."""
        held = held_here(self.state)
        try:
            if self.state.header.phase in (Phase.DRAINING, Phase.STOPPING) or taking_no_jobs(self.state):
                # This host takes no new jobs (it drains, which may last minutes, or every worker is paused:
                # its provider down, its breakers open): other hosts must not park jobs for it.
                self.fleet.withdraw()
                return
            self.fleet.publish(held, cache_size_here(self.state), self.state.pool_names())
            if self.settings.models.affinity:
                self._load_by_demand(held)
        except redis.RedisError as exc:
            if str(exc) != self.complaint:
                log.warning(f"model manager: cannot publish what the host holds: {exc}")
            self.complaint = str(exc)
            return
        self.complaint = ""

    def _load_by_demand(self, held: dict[str, ModelHeld]) -> None:
        if any(m.loading for m in self.managers) or not has_room(self.state):  # one load at a time, and room
            return
        memory = memory_in_use(self.state.readings)
        if memory is not None and memory.ratio > self.settings.models.memory_threshold:  # no room after all
            return
        elsewhere = {
            label
            for host, h in self.fleet.read().items()
            if host != self.fleet.me
            for label, model in h.models.items()
            if model.state != DRAINING
        }
        now = time.monotonic()
        for label in parked_models(self.fleet.redis, self.fleet.keys, self.state.pool_names()):
            if label in held or label in elsewhere:
                continue
            manager = next(
                (
                    m
                    for m in self.managers
                    if now - m.demand_failed.get(label, -DEMAND_RETRY) >= DEMAND_RETRY
                    and (not m.available or label in m.available)  # a server without it would fail the load
                    and m.endpoint in managed_up(self.state)
                    and endpoint_has_room(self.state, m.endpoint)
                ),
                None,
            )
            if manager is not None and self.parking.claim(label):
                manager.demand(label)
                return
