"""A worker's model-affinity choices (MODEL_AFFINITY): what to take, and whether to run or park what it took.

A host takes, in order: a parked job waiting past MODEL_AFFINITY_MAX_WAIT
(whatever its model: nothing waits on affinity longer); a parked job whose
model it has loaded with a free slot; a job from the queue itself, run here
when its model is loaded or loading here, or held by no host and loadable
here without evicting a busy model (claimed first, so one host loads it),
and parked otherwise; a parked job of a model no host holds, when it has
room to load one. The facts of this host come from shared memory (fresh),
those of the others from their published holdings (models/fleet.py).

Only models whose loads the model manager makes (the load board's provider)
take part: a job for any other provider runs as it comes. So do batch jobs
(a batch may name many models) and embeddings jobs gathered into shared
calls (ENABLE_BATCH_PROCESSING): those are taken first in, first out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.models import fleet
from llm_worker.models.fleet import FleetView
from llm_worker.protocol.jobs import Decoded
from llm_worker.queue.parking import Parking, Picked
from llm_worker.settings.config import Settings

LOOK_EVERY = 0.25  # seconds between looks at an empty set of parked lists: jobs parked by others meanwhile wait
IDLE_BLOCK = 0.25  # seconds a worker blocks on its queue while jobs are parked, before it looks at them again


class Affinity:
    """One worker's side of model affinity, for its queue."""

    def __init__(
        self,
        settings: Settings,
        state: SharedState,
        board: LoadBoard,
        parking: Parking,
        view: FleetView,
        queue: str,
        managed: Callable[[str], bool],
    ) -> None:
        self.settings = settings
        self.state = state
        self.board = board
        self.parking = parking
        self.view = view
        self.queue = queue
        self.managed = managed  # model -> whether the manager loads its provider's models
        self.max_wait_ms = settings.models.affinity_max_wait
        self.add_labels = not settings.models.allowed
        self.parked = True  # jobs were parked at the last look (first look: maybe)
        self.looked = -LOOK_EVERY

    # ---- what to take ----------------------------------------------------------------------

    def should_look(self) -> bool:
        """Whether to look at the parked lists before the queue: jobs were parked, or it is time to look again."""
        return self.parked or time.monotonic() - self.looked >= LOOK_EVERY

    def block_for(self, block: float) -> float:
        """How long to block on the queue: short while jobs are parked, so that they are looked at again soon."""
        return min(block, IDLE_BLOCK) if self.parked else block

    def pick(self, worker_id: str) -> Picked | None:
        """A parked job this worker should take now, moved into its processing list; None for none."""
        held = fleet.held_here(self.state)
        room = fleet.has_room(self.state)
        # A cold pick skips models other hosts hold, and those draining here (leaving this host).
        elsewhere = (
            self.view.held_elsewhere(self.queue) | {m for m, h in held.items() if h.state == fleet.DRAINING}
            if room
            else set()
        )
        picked, parked_models = self.parking.pick(
            worker_id, self.queue, fleet.hot(held), room, elsewhere, self.max_wait_ms
        )
        self.parked = picked is not None or parked_models > 0
        self.looked = time.monotonic()
        return picked

    # ---- run it or park it -------------------------------------------------------------------

    def park_as(self, decoded: Decoded) -> str | None:
        """The model label to park a job taken from the queue under; None to run it here."""
        if decoded.job.type == "batch" or not self.managed(decoded.model):
            return None
        label = model_label(decoded.model)
        if self.state.model_index(label, add=self.add_labels) == 0:  # "other": no label of its own to follow
            return None
        here = fleet.held_here(self.state).get(label)
        if here is not None:  # loaded or loading here: run it; draining (to be unloaded soon): leave it
            return label if here.state == fleet.DRAINING else None
        if label in self.view.held_elsewhere(self.queue):
            return label
        if fleet.has_room(self.state) and self.parking.claim(label):
            return None
        return label
