"""Routing: which of a provider's endpoints a call goes to, when it speaks to several servers.

A host may run one Ollama per GPU (OLLAMA_BASE_URL names each), or one vLLM or
llama.cpp server per GPU (OPENAI_BASE_URL). Each is an endpoint (endpoints.py)
with its own models, slots, reachability and breakers. The model picks the
provider, as ever (the first that serves it); the rule below picks its
endpoint, from what shared memory says now:

1. Only an endpoint that is up and whose breaker for the model admits a call.
   When none is, the first: its own refusal (down, breaker open) is the answer.
2. Not one that already failed this job, while another will do: a retry or a
   fallback after an endpoint's failure goes elsewhere. Nor one where the
   model drains (the manager unloads it there for another model once its
   calls end: models/manager.py), while another will do.
3. By tier: the model loaded with a free slot; then a load of it under way, or
   a worker already bound to load it there (the jobs right behind the first
   follow it instead of loading the model twice); then room in the endpoint's
   model cache; then the model loaded with every slot taken (the call waits
   for a slot rather than load a second copy); then a loaded model no worker
   uses, which the manager unloads to make room; then any.
4. Among equals, the least busy (fewest workers bound for it), then the one
   with the most room, then the first in the setting.

An endpoint whose models no manager keeps (an OpenAI-compatible server, or an
Ollama before its manager started) counts as holding every model, its
``max_concurrent`` as its slots. A provider with one endpoint is routed to at
once, reading nothing: a host with one Ollama behaves as it always did.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.backpressure import bound_for
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import MAX_MODELS, EndpointLoads
from llm_worker.host.stats import model_label
from llm_worker.plugin.providers import Provider, endpoint_of
from llm_worker.protocol.jobs import ErrorKind, JobError

if TYPE_CHECKING:
    from llm_worker.host.backpressure import Reachability
    from llm_worker.host.breaker import Breakers
    from llm_worker.host.loadboard import LoadBoard
    from llm_worker.host.shm import SharedState

UNCAPPED = 1 << 30  # the free slots of an endpoint without a cap of its own


@dataclass(frozen=True)
class Candidate:
    """One endpoint, as routing weighs it for one call."""

    position: int  # its place among the model's endpoints: ties go to the first
    usable: bool  # up, and its breaker for the model admits a call
    avoided: bool  # it failed this job already
    resident: bool  # the model is loaded there (or no manager keeps its models)
    loading: bool  # a load of the model is under way there, or a worker is bound to make one
    free_slots: int  # calls of the model it could take now (<= 0: every slot taken)
    busy: int  # workers bound for it, all models
    room: int  # models it could still load without unloading one
    idle: int  # loaded models no worker is bound for: the manager may unload them for room
    draining: bool = False  # the model drains there (to be unloaded for another once its calls end): last resort

    @property
    def tier(self) -> int:
        if self.resident and self.free_slots > 0:
            return 0
        if self.loading:
            return 1
        if not self.resident and self.room > 0:
            return 2
        if self.resident:
            return 3
        return 4 if self.idle > 0 else 5


def choose(candidates: Iterable[Candidate]) -> Candidate | None:
    """The endpoint a call goes to (rules 2 to 4 of the module docstring); None when none is usable."""
    usable = [c for c in candidates if c.usable]
    if not usable:
        return None
    return min(usable, key=lambda c: (c.avoided, c.draining, c.tier, c.busy, -c.room, c.position))


class Router:
    """One worker's routing over the host's endpoints (its providers, one object per endpoint)."""

    def __init__(
        self,
        providers: list[Provider],
        breakers: Breakers,
        reach: Reachability | None = None,
        loads: LoadBoard | None = None,
        state: SharedState | None = None,
        add_labels: bool = True,
    ) -> None:
        """``add_labels``: a model new to the host gets its label (False with ALLOWED_MODELS, as the call gate)."""
        self.providers = providers
        self.breakers = breakers
        self.reach = reach
        self.loads = loads
        self.state = state
        self.add_labels = add_labels
        table = EndpointTable(state.providers, state.lock) if state is not None else None
        # Every process numbers an endpoint alike (the shared table); without one, by position.
        self._index = {
            id(p): table.register(endpoint_of(p), p.name, str(getattr(p, "url", ""))) if table else i
            for i, p in enumerate(providers)
        }

    def index(self, provider: Provider) -> int:
        """The endpoint's index in the host's endpoint table (-1: the table is full)."""
        return self._index.get(id(provider), -1)

    def endpoints_for(self, model: str) -> list[Provider]:
        """The endpoints that could serve ``model``: those of the first provider that serves it, in order."""
        for provider in self.providers:
            if provider.serves(model):
                return [p for p in self.providers if p.name == provider.name and p.serves(model)]
        raise JobError(f"no provider serves model {model!r}", ErrorKind.MODEL)

    def usable(self, provider: Provider, model: str) -> bool:
        """Whether a call of ``model`` could go to this endpoint now: it is up and its breaker admits calls."""
        name = endpoint_of(provider)
        if self.reach is not None and self.reach.is_down(name):
            return False
        return not self.breakers.refused(model, name)

    def route(self, model: str, *, embedding: bool = False, avoid: Iterable[str] = ()) -> Provider:
        """The endpoint a call of ``model`` goes to (the module docstring's rule); ``avoid``: those that failed it."""
        endpoints = self.endpoints_for(model)
        if len(endpoints) == 1:
            return endpoints[0]
        chosen = choose(self.candidates(endpoints, model, embedding, set(avoid)))
        return endpoints[chosen.position] if chosen is not None else endpoints[0]

    def candidates(self, endpoints: list[Provider], model: str, embedding: bool, avoid: set[str]) -> list[Candidate]:
        """Each endpoint as routing weighs it, read from shared memory now."""
        state = self.state
        bound = bound_for(state) if state is not None else {}
        label = state.model_index(model_label(model), add=self.add_labels) if state is not None else 0
        out = []
        for position, provider in enumerate(endpoints):
            endpoint = self.index(provider)
            busy = sum(n for (e, _), n in bound.items() if e == endpoint)
            mine = bound.get((endpoint, label), 0)
            common = {
                "position": position,
                "usable": self.usable(provider, model),
                "avoided": endpoint_of(provider) in avoid,
                "busy": busy,
            }
            block = self._managed(provider, endpoint)
            if block is None or label <= 0:
                # No manager keeps its models (or the model has no label of its own): it holds them all.
                cap = int(getattr(provider, "max_concurrent", 0) or 0)
                free = cap - busy if cap else UNCAPPED
                out.append(Candidate(resident=True, loading=False, free_slots=free, room=0, idle=0, **common))
                continue
            row = block.rows[label]
            slots_of = getattr(provider, "model_slots", None)
            slots = slots_of(model, embedding) if slots_of is not None else 0
            held = [
                i
                for i in range(1, MAX_MODELS)
                if block.rows[i].resident or block.rows[i].started or bound.get((endpoint, i))
            ]
            idle = sum(
                1 for i in held if block.rows[i].resident and not block.rows[i].started and not bound.get((endpoint, i))
            )
            out.append(
                Candidate(
                    resident=bool(row.resident),
                    loading=not row.resident and (bool(row.started) or mine > 0),
                    free_slots=(slots - mine) if slots else UNCAPPED,
                    room=block.cache_size - max(len(held), block.loaded_count),
                    idle=idle,
                    draining=bool(row.resident and row.draining),
                    **common,
                )
            )
        return out

    def _managed(self, provider: Provider, endpoint: int) -> EndpointLoads | None:
        """The endpoint's block of the load board, when the model manager keeps its models; else None."""
        if self.loads is None or endpoint < 0 or not self.loads.manages(provider.name):
            return None
        block = self.loads.board.endpoints[endpoint]
        return block if block.cache_size > 0 else None
