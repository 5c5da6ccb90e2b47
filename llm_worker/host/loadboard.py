"""Model loads belong to the host: workers ask for them here, the model manager makes them.

Ollama loads a model on the first request that names it, under that
request's context (server/sched.go, v0.33): when the request's client goes
away (a job's deadline closing the connection), the load is abandoned. A
70B model that takes minutes to load would then never finish loading for
jobs with short timeouts, and each abandoned load looked like a provider
failure to the breaker. So jobs never load. A worker whose model is not
resident posts a request on this board (shared memory) and waits; the model
manager loads each asked-for model once, under its own long deadline
(OLLAMA_MODEL_LOAD_TIMEOUT), and posts the outcome. A job's deadline may end
its own wait, never the load; waiting is never a provider failure.

One block of rows per endpoint (an Ollama server: several when OLLAMA_BASE_URL
names several, each with its own models), one row per model label in it (the
index of ``SharedState.model_index``). Writers: workers write ``asked`` (any
of them, a plain store of a time: the latest wins, which is all the manager
needs) and ``last_used`` (the call gate); the manager writes everything else.

At the end, two questions about the whole host, for whoever publishes what
it holds to other hosts: ``resident_labels`` and ``can_load_without_evicting_busy``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.backpressure import bound_for
from llm_worker.host.layout import ERROR_BYTES, MAX_MODELS, Board, LoadRow
from llm_worker.host.procs import alive
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.protocol.jobs import ErrorKind, JobError

if TYPE_CHECKING:
    from llm_worker.host.shm import SharedState

POLL = 0.02  # seconds between a waiting worker's looks at its row
UNSERVED = 5.0  # seconds after which a request no manager took up is given up: the call loads on demand
MANAGER_CHECK = 0.5  # seconds between looks, while a load is under way, at whether its manager still lives
_KINDS = list(ErrorKind)


# Why a load started (``LoadRow.why``), as /status and the events say it.
PRELOAD, ASKED, DEMAND = 1, 2, 3
WHY = {PRELOAD: "preload", ASKED: "a job asked", DEMAND: "queued jobs"}  # DEMAND: parked jobs no host holds


class ModelLoading(JobError):
    """A job's deadline came while its model was still loading: retried later, never a provider failure."""

    kind = ErrorKind.TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.counted = False


@dataclass(frozen=True)
class InProgress:
    label: str
    seconds: float
    why: str
    endpoint: int  # the endpoint's index (endpoints.py)


def waiting_error(row: LoadRow, model: str) -> ProviderError:
    """The failure of the last load of ``model``, as the job that waited for it sees it."""
    text = row.error.decode(errors="replace") or "the model could not be loaded"
    return ProviderError(
        f"loading {model}: {text}", _KINDS[row.error_kind], retryable=bool(row.retryable), crashed=bool(row.crashed)
    )


class LoadBoard:
    """The host's load requests and their outcomes, over ``Board`` in shared memory."""

    def __init__(self, board: Board) -> None:
        self.board = board

    # ---- the workers' side ---------------------------------------------------------

    def manages(self, provider: str) -> bool:
        """Whether the model manager loads this provider's models (then jobs wait for loads here)."""
        return bool(self.board.provider) and self.board.provider.decode() == provider

    def row(self, endpoint: int, index: int) -> LoadRow:
        """Model label ``index`` on endpoint ``endpoint``."""
        return self.board.endpoints[endpoint].rows[index]

    def wait_resident(
        self, endpoint: int, index: int, model: str, deadline: Deadline, beat: Callable[[], None]
    ) -> float:
        """Return at once when the model is loaded on the endpoint; else ask for it and wait. Return the seconds waited.

        Raises the load's own error when it fails (a model Ollama lacks is a
        model error; a crashed runner is transient), or ModelLoading when the
        job's deadline comes first; the load goes on for the jobs after it.
        """
        row = self.row(endpoint, index)
        if index <= 0 or row.resident:
            return 0.0
        began = time.monotonic()
        seen = row.done
        if row.failed and row.started == 0 and began - row.failed_at < 1.0:
            raise waiting_error(row, model)  # it failed just now: asking again would fail the same way
        row.asked = began
        looked = began
        while not row.resident:
            if row.done != seen and row.failed:
                raise waiting_error(row, model)
            left = deadline.left()
            if left <= POLL:
                since = f"for {time.monotonic() - row.started:.1f}s" if row.started else "not yet started"
                raise ModelLoading(
                    f"{model} is still loading ({since}; the host loads it once for every job): "
                    f"this job's time ran out first"
                )
            if not row.started and row.done == seen and time.monotonic() - began > UNSERVED:
                return time.monotonic() - began  # no manager at work (restarting?): Ollama loads it for the call
            if row.started and time.monotonic() - looked > MANAGER_CHECK:
                looked = time.monotonic()
                if self.manager_gone():  # its load died with it; during a drain no manager comes back
                    return time.monotonic() - began  # Ollama loads it for the call
            beat()
            if row.done != seen and not row.failed and not row.resident:
                seen = row.done  # loaded, then let go before we looked (evicted): ask again
                row.asked = time.monotonic()
            time.sleep(min(POLL, left - POLL))
        return time.monotonic() - began

    # ---- the manager's side --------------------------------------------------------

    def serve(self, provider: str) -> None:
        self.board.provider = provider.encode()[:31]
        self.board.manager_pid = os.getpid()

    def manager_gone(self) -> bool:
        """Whether the model manager that serves the board has died (killed with its process group, say)."""
        pid = self.board.manager_pid
        return pid > 0 and not alive(pid)

    def forget_unfinished(self, endpoint: int) -> None:
        """Let go of what a manager that died (or was replaced on HUP) had under way: loads it had begun (asked
        again, they are made anew) and a model it was draining for one (it takes jobs again)."""
        for row in self.board.endpoints[endpoint].rows:
            row.started = 0.0
            row.draining = 0

    def begin(self, endpoint: int, index: int, why: int) -> None:
        row = self.row(endpoint, index)
        row.why = why
        row.started_wall = time.time()
        row.started = time.monotonic()

    def succeeded(self, endpoint: int, index: int, seconds: float) -> None:
        row = self.row(endpoint, index)
        row.seconds = seconds
        row.failed = 0
        row.resident = 1
        row.started = 0.0
        row.done += 1

    def failed(self, endpoint: int, index: int, error: ProviderError) -> None:
        row = self.row(endpoint, index)
        row.error = error.message.encode(errors="replace")[: ERROR_BYTES - 1]
        row.error_kind = _KINDS.index(error.kind)
        row.crashed = int(error.crashed)
        row.retryable = int(error.retryable)
        row.failed_at = time.monotonic()
        row.failed = 1
        row.started = 0.0
        row.done += 1

    def set_resident(self, endpoint: int, index: int, resident: bool) -> None:
        self.row(endpoint, index).resident = int(resident)

    def in_progress(self, labels: list[str]) -> list[InProgress]:
        """Loads under way now, on every endpoint, for /status and /metrics."""
        now = time.monotonic()
        out = []
        for endpoint, block in enumerate(self.board.endpoints):
            for index, label in enumerate(labels[:MAX_MODELS]):
                row = block.rows[index]
                if row.started:
                    out.append(InProgress(label, max(0.0, now - row.started), WHY.get(row.why, "unknown"), endpoint))
        return out


# ---- the host as a whole, for other hosts -------------------------------------------------


def resident_labels(state: SharedState) -> dict[str, int]:
    """Which model labels are loaded on this host, on any endpoint, and how many free slots each has.

    Label -> free slots summed over the endpoints that hold it (a slot is free
    while no worker of the host calls, waits for, or is bound for it there).
    Only endpoints that are up count, and only what the model manager saw
    loaded at its last look (every MODEL_MANAGER_INTERVAL, and after each of
    its loads and unloads). A label loaded with every slot taken maps to 0.
    """
    labels = state.model_labels()
    bound = bound_for(state)
    out: dict[str, int] = {}
    for endpoint in managed_up(state):
        rows = state.loads.endpoints[endpoint].rows
        for index in range(1, min(len(labels), MAX_MODELS)):
            row = rows[index]
            if row.resident:
                free = max(0, max(1, row.slots) - bound.get((endpoint, index), 0))
                out[labels[index]] = out.get(labels[index], 0) + free
    return out


def can_load_without_evicting_busy(state: SharedState, label: str, cache_size: int = 0) -> bool:
    """Whether this host could load model ``label`` without unloading a model a worker is busy with.

    True when an endpoint that is up has it loaded already, or room under its
    cache size for one more model (a load under way counts as loaded), or a
    loaded model no worker calls, waits for or is bound for (the manager
    unloads that one to make room). ``cache_size``: models an endpoint keeps
    loaded; 0 (or less) takes each endpoint's own, as its manager applies it
    (MODEL_CACHE_SIZE, else Ollama's default). A label the host never saw
    (``""``) asks whether there is room for any new model.
    """
    return any(endpoint_has_room(state, endpoint, label, cache_size) for endpoint in managed_up(state))


def endpoint_has_room(state: SharedState, endpoint: int, label: str = "", cache_size: int = 0) -> bool:
    """``can_load_without_evicting_busy`` for one endpoint."""
    labels = state.model_labels()
    wanted = labels.index(label) if label in labels else -1
    bound = bound_for(state)
    block = state.loads.endpoints[endpoint]
    size = cache_size if cache_size > 0 else block.cache_size
    held = [i for i in range(1, min(len(labels), MAX_MODELS)) if block.rows[i].resident or block.rows[i].started]
    if wanted in held or max(len(held), block.loaded_count) < size:
        return True
    return any(not block.rows[i].started and not bound.get((endpoint, i)) for i in held)


def managed_up(state: SharedState) -> list[int]:
    """The endpoints whose models the model manager keeps, and that answer (not marked down)."""
    table = state.providers
    return [
        i
        for i in range(min(table.count, len(state.loads.endpoints)))
        if state.loads.endpoints[i].cache_size > 0 and not table.rows[i].down
    ]
