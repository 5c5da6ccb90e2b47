"""Backpressure: take no job the host cannot serve, and no more provider calls than it can bear.

Three pieces, all in shared memory so that every worker of the host agrees,
each per endpoint (a server a provider speaks to; see endpoints.py):

- ``Reachability``: whether each endpoint answers at all. A worker whose
  connect is refused marks its endpoint down at once; paused workers then
  probe it about once a second, one of them at a time (the sampler does too,
  paused or not), and the first success marks it up for everyone.
- ``pause_reason``: a pool's workers stop taking jobs while every model the
  pool has served is unavailable: every endpoint that could serve it down or
  its circuit breaker there open. The jobs stay in the queue, where healthy
  hosts take them; the workers resume on their own when a probe succeeds or a
  breaker half-opens. One endpoint down while another serves pauses nothing.
- ``CallGate``: at most MAX_CONCURRENT_REQUESTS provider calls in flight from
  the host; at most a model's slots per model and endpoint (Ollama serves
  OLLAMA_NUM_PARALLEL requests per loaded model, 1 for embedding models, and
  queues the rest inside itself without limit: a call queued there idles a
  worker and spends its job's deadline while another model's slot may be
  free); at most an endpoint's ``max_concurrent`` (a llama.cpp server with one
  slot interrupts a running generation for a new request). A worker waiting
  for a place marks its slot; the priority pool's waiters go first. Counts are
  derived from the slots, never kept as a running total, so a worker
  SIGKILLed mid-call cannot leak a place.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.breaker import BreakerOpen
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import Call, Pause, ProviderRow, ProviderTable
from llm_worker.host.procs import alive
from llm_worker.host.stats import model_label
from llm_worker.plugin.providers import Deadline, ProviderError, endpoint_of
from llm_worker.protocol.jobs import ErrorKind

if TYPE_CHECKING:
    from llm_worker.host.breaker import Breakers
    from llm_worker.host.shm import SharedState, ShmLock
    from llm_worker.plugin.providers import Provider

PROBE_EVERY = 1.0  # seconds between probes of a provider that is down
PAUSE_CHECK = 0.1  # seconds a paused worker sleeps between looks
GATE_POLL_MAX = 0.01  # longest sleep of a worker waiting for a place among the calls in flight
VERDICT_TTL = 0.05  # seconds a worker trusts "take jobs" before it looks again (a pause may start this late)


class ProviderDown(BreakerOpen):
    """A call refused because its endpoint does not answer: no attempt is spent, the job waits (or goes to another)."""

    kind = ErrorKind.NETWORK

    def __init__(self, provider: str, error: str) -> None:
        super().__init__(provider, time.monotonic() + PROBE_EVERY, f"provider {provider} is unreachable: {error}")


class Reachability:
    """Up or down, per endpoint name (a provider's, when it has one server), shared by the host's processes."""

    def __init__(self, table: ProviderTable, lock: ShmLock) -> None:
        self.table = table
        self.lock = lock
        self.endpoints = EndpointTable(table, lock)

    def is_down(self, provider: str) -> bool:
        row = self._row(provider, add=False)
        return row is not None and bool(row.down)

    def error(self, provider: str) -> str:
        row = self._row(provider, add=False)
        return row.error.decode(errors="replace") if row is not None else ""

    def mark_down(self, provider: str, error: str) -> bool:
        """Record that ``provider`` cannot be reached; True if it was up until now."""
        row = self._row(provider, add=True)
        if row is None:
            return False
        with self.lock.held():
            row.error = error.encode()[:255]
            if row.down:
                return False
            row.down = 1
            row.since = time.time()
            row.probed = time.monotonic()  # the failed call was a probe
            row.outages += 1
            return True

    def mark_up(self, provider: str) -> bool:
        """Record that ``provider`` answered; True if it was down until now."""
        row = self._row(provider, add=False)
        if row is None or not row.down:
            return False
        with self.lock.held():
            if not row.down:
                return False
            row.down = 0
            row.since = time.time()
            return True

    def probe_due(self, provider: str, every: float = PROBE_EVERY) -> bool:
        """Claim the next probe of a down provider: True for one caller per ``every`` seconds."""
        row = self._row(provider, add=False)
        if row is None or not row.down:
            return False
        now = time.monotonic()
        with self.lock.held():
            if now - row.probed < every:
                return False
            row.probed = now
            return True

    def rows(self) -> list[dict[str, object]]:
        """Each endpoint's reachability: ``provider`` is the provider's name, ``endpoint`` the server's."""
        out: list[dict[str, object]] = []
        for endpoint in self.endpoints.all():
            r = self.endpoints.row(endpoint.index)
            out.append(
                {
                    "provider": endpoint.provider,
                    "endpoint": endpoint.name,
                    "url": endpoint.url or None,
                    "up": not r.down,
                    "since": r.since,
                    "outages": r.outages,
                    "error": r.error.decode(errors="replace") if r.down else None,
                }
            )
        return out

    def _row(self, endpoint: str, *, add: bool) -> ProviderRow | None:
        index = self.endpoints.register(endpoint) if add else self.endpoints.find(endpoint)
        return self.endpoints.row(index) if index >= 0 else None


# ---- pausing a pool ---------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    pause: Pause
    why: str = ""
    down: tuple[str, ...] = ()  # the endpoints that are down, for the paused worker to probe


RUNNING = Verdict(Pause.NONE)


def pause_reason(
    models: list[str],
    providers: list[Provider],
    endpoints_for: Callable[[str], list[Provider]],
    reach: Reachability,
    breakers: Breakers,
) -> Verdict:
    """Whether a pool that has served ``models`` should take no jobs now, and why.

    ``providers``: every endpoint of the host; ``endpoints_for(model)``: those
    that could serve a model. A pool that has served nothing yet pauses only
    when every endpoint is down; otherwise it pauses when no model it has
    served could be called anywhere: each of its endpoints down, or its
    breaker there open.
    """
    if not models:
        down = [endpoint_of(p) for p in providers if reach.is_down(endpoint_of(p))]
        if providers and len(down) == len(providers):
            return Verdict(Pause.PROVIDER_DOWN, _down_text(down, reach), tuple(down))
        return RUNNING
    down: list[str] = []
    opened: list[str] = []
    for model in models:
        try:
            endpoints = [endpoint_of(p) for p in endpoints_for(model)]
        except Exception:  # no provider serves it: not a reason to stop serving the others
            return RUNNING
        if not endpoints:
            return RUNNING
        for name in endpoints:
            if reach.is_down(name):
                if name not in down:
                    down.append(name)
            elif any(breakers.refused(label, name) for label in (model, model + ":latest")):
                opened.append(f"{name}:{model}")
            else:
                return RUNNING  # this endpoint can serve the model: the pool has work it can do
    if down and not opened:
        return Verdict(Pause.PROVIDER_DOWN, _down_text(down, reach), tuple(down))
    why = f"circuit breakers open for {', '.join(opened)}"
    if down:
        why = f"{_down_text(down, reach)}; {why}"
    return Verdict(Pause.BREAKERS_OPEN, why, tuple(down))


def _down_text(down: list[str], reach: Reachability) -> str:
    return "; ".join(f"provider {name} is unreachable ({reach.error(name) or 'no answer'})" for name in down)


class PoolWatch:
    """One worker's view of whether its pool should pause: the models the pool has called, and their state."""

    def __init__(
        self,
        state: SharedState,
        pool: int,
        providers: list[Provider],
        endpoints_for: Callable[[str], list[Provider]],
        reach: Reachability,
        breakers: Breakers,
    ) -> None:
        self.state = state
        self.pool = pool
        self.providers = providers
        self.endpoints_for = endpoints_for
        self.reach = reach
        self.breakers = breakers
        self._labels: list[str] = []
        self._running_until = 0.0  # a "take jobs" verdict is trusted this long (monotonic)

    def models(self) -> list[str]:
        """The model labels the pool's workers have called (``Header.pool_models``)."""
        mask = self.state.header.pool_models[self.pool]
        if len(self._labels) != self.state.header.model_count:
            self._labels = self.state.model_labels()
        return [label for i, label in enumerate(self._labels) if i and mask & (1 << i)]

    def verdict(self) -> Verdict:
        """The pool's verdict; "take jobs" is kept for VERDICT_TTL, since a busy worker asks twice a job."""
        now = time.monotonic()
        if now < self._running_until:
            return RUNNING
        verdict = pause_reason(self.models(), self.providers, self.endpoints_for, self.reach, self.breakers)
        if verdict.pause == Pause.NONE:
            self._running_until = now + VERDICT_TTL
        return verdict


# ---- the host's cap on calls in flight ---------------------------------------------


class CallGate:
    """Wraps each provider call of one worker: the in-flight cap and the model bookkeeping.

    While a call runs, the worker's slot names its model and the model's
    last-used time is kept fresh, for the model manager's idle unloading.
    """

    def __init__(self, state: SharedState, slot: int, limit: int, priority_pool: int, add_labels: bool = True) -> None:
        self.state = state
        self.add_labels = add_labels  # False with ALLOWED_MODELS: the supervisor registered every label
        self.slot = state.slots[slot]
        self.pool = self.slot.pool
        self.limit = limit
        self.priority_pool = priority_pool  # index of the priority queue's pool; -1 when there is none

    @contextmanager
    def routed(self, model: str, endpoint: int) -> Iterator[None]:
        """Mark this worker as bound for ``model`` on ``endpoint`` until its call is over.

        From the moment the call is routed, before its model has loaded there
        and before a place at the gate: routing counts it, so that the jobs
        right behind it follow it to that endpoint instead of loading the model
        on another, and the model manager counts the model as in use there.
        """
        self.slot.model = self.state.model_index(model_label(model), add=self.add_labels)
        self.slot.provider = endpoint
        self.slot.call = Call.ROUTED
        try:
            yield
        finally:
            self.slot.model = -1
            self.slot.provider = -1
            self.slot.call = Call.NONE

    @contextmanager
    def call(
        self, model: str, deadline: Deadline, *, model_slots: int = 0, provider: int = -1, provider_cap: int = 0
    ) -> Iterator[None]:
        """Hold a place for one provider call of ``model``.

        ``model_slots``: the most calls of this model at once on its endpoint
        (0: no cap of its own); ``provider``/``provider_cap``: the endpoint's
        index (endpoints.py; -1: none, and the model's cap is host-wide) and
        the most calls to it at once (0: none).
        """
        index = self.state.model_index(model_label(model), add=self.add_labels)
        header = self.state.header
        if not header.pool_models[self.pool] & (1 << index):
            with self.state.lock.held():  # other workers of the pool set their bits too
                header.pool_models[self.pool] |= 1 << index
        self.slot.model = index
        self.slot.provider = provider
        # Each worker makes one call at a time, so a cap at or above the number of
        # workers (read each time: TTIN and reloads change it) cannot bind: no lock then.
        # "other" (index 0) lumps models together: it gets no per-model cap.
        wanted = header.workers_wanted
        caps = Caps(self.limit, model_slots if index > 0 else 0, provider, provider_cap)
        if caps.binds(wanted):
            self._enter(deadline, caps)
        else:
            self.slot.call = Call.CALLING
        self._used(index, provider)
        try:
            yield
        finally:
            self._used(index, provider)
            self.slot.model = -1
            self.slot.provider = -1
            self.slot.call = Call.NONE

    def _used(self, model: int, endpoint: int) -> None:
        """Keep the model's last use on its endpoint fresh, for the model manager's idle unloading there."""
        if endpoint >= 0:
            self.state.loads.endpoints[endpoint].rows[model].last_used = time.monotonic()

    def models_in_use(self) -> set[str]:
        """The model labels other workers of the host are calling now."""
        labels = self.state.model_labels()
        mine = ctypes.addressof(self.slot)
        return {
            labels[s.model]
            for s in self.state.slots
            if ctypes.addressof(s) != mine and s.pid and s.call == Call.CALLING and 0 < s.model < len(labels)
        }

    def _enter(self, deadline: Deadline, caps: Caps) -> None:
        self.slot.call = Call.WAITING
        pause = 0.0005
        while (full := self._admit(caps)) is not None:
            if deadline.left() <= pause:
                self.slot.call = Call.NONE
                raise ProviderError(f"timed out waiting for {full}", ErrorKind.TIMEOUT, counted=False)
            self.slot.beat()
            time.sleep(pause)
            pause = min(pause * 2, GATE_POLL_MAX)

    def _admit(self, caps: Caps) -> str | None:
        """Take a place and return None; or say which cap is full."""
        with self.state.lock.held():
            load = in_flight(self.state, self.priority_pool, self.slot.model, caps.provider)
            if load.calling >= caps.host:
                return f"one of the host's {caps.host} provider calls (MAX_CONCURRENT_REQUESTS)"
            if load.priority_waiting and self.pool != self.priority_pool:
                return "the priority queue's calls to go first"
            if caps.model and load.model >= caps.model:
                return f"one of the model's {caps.model} slots (OLLAMA_NUM_PARALLEL; 1 for embedding models)"
            if caps.provider_cap and load.provider >= caps.provider_cap:
                return f"one of the endpoint's {caps.provider_cap} places (its max_concurrent)"
            self.slot.call = Call.CALLING
            return None


@dataclass(frozen=True)
class Caps:
    """The caps one call is under: the host's, its model's and its provider's (0: none)."""

    host: int
    model: int
    provider: int  # the endpoint's index
    provider_cap: int

    def binds(self, workers: int) -> bool:
        """Whether any cap can bind: each worker makes one call at a time."""
        return any(0 < cap < workers for cap in (self.host, self.model, self.provider_cap))


@dataclass(frozen=True)
class Load:
    calling: int  # provider calls in flight from the host
    priority_waiting: int  # priority-pool workers waiting for a place
    model: int  # calls in flight of the given model (on the given endpoint, when one is given)
    provider: int  # calls in flight to the given endpoint


def in_flight(state: SharedState, priority_pool: int = -1, model: int = -1, provider: int = -1) -> Load:
    """The host's provider calls in flight, and of one model and one endpoint."""
    calling = waiting = of_model = of_provider = 0
    for slot in state.slots:
        if not slot.pid or slot.call == Call.NONE:
            continue
        if slot.call == Call.CALLING:
            if alive(slot.pid):  # a worker killed mid-call holds no place, reaped or not
                calling += 1
                here = provider < 0 or slot.provider == provider
                of_model += here and slot.model == model
                of_provider += provider >= 0 and slot.provider == provider
        elif slot.call == Call.WAITING and slot.pool == priority_pool:
            waiting += 1
    return Load(calling, waiting, of_model, of_provider)


def bound_for(state: SharedState) -> dict[tuple[int, int], int]:
    """Workers bound for each (endpoint, model label): calling, waiting at the gate or for the model's load there.

    What routing and the load board weigh an endpoint's business by; a worker
    killed on the way holds nothing, as in ``in_flight``.
    """
    out: dict[tuple[int, int], int] = {}
    for slot in state.slots:
        if slot.pid and slot.call != Call.NONE and slot.provider >= 0 and slot.model >= 0 and alive(slot.pid):
            key = (slot.provider, slot.model)
            out[key] = out.get(key, 0) + 1
    return out
