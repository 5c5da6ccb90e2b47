"""Each loaded model's slots (OLLAMA_NUM_PARALLEL), and the counters behind /_sim/stats.

A loaded model serves ``num_parallel`` requests at once; the rest wait in FIFO
order for as long as it takes, as on the semaphore Ollama's runner acquires
for each call (llm/llama_server.go, golang.org/x/sync/semaphore, FIFO). No
limit applies to those waiters: OLLAMA_MAX_QUEUE counts only requests waiting
for the scheduler (see scheduler.py). A waiter whose client leaves gives up
its place, as ``sem.Acquire(ctx)`` returns when the request's context ends.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime, timezone

from msgspec import Struct

from llm_worker.devtools.simulator.config import Fault

POLL_SECONDS = 0.1  # how often a waiting request looks whether its client has left


class ServerBusy(Exception):
    """More requests wait for the scheduler than OLLAMA_MAX_QUEUE holds."""


class Stopping(Exception):
    """The simulator is shutting down; drop the request."""


class ClientGone(Exception):
    """The client closed its connection while its request waited."""


class SimStats(Struct, kw_only=True):
    """What the simulator saw since it started or was last reset."""

    started_at: str
    uptime_s: float
    requests: dict[str, int]  # per endpoint
    requests_by_model: dict[str, int]
    responses: dict[int, int]  # per HTTP status
    loads: dict[str, int]  # per model, finished loads (reloads for changed options included)
    aborted_loads: dict[str, int]  # per model, loads stopped because the client that asked left
    unloads: dict[str, int]
    pulls: dict[str, int]
    loaded: list[str]
    loading: str | None  # the model being loaded now (the scheduler loads one at a time)
    unloading: list[str]  # loaded models set to unload once their requests finish (keep_alive 0, evicted)
    parallel: dict[str, int]  # per loaded model, its slots (1 for embedding models)
    slots: int  # num_parallel, the setting
    in_slots: int  # requests holding a slot now, all models together
    max_in_slots: int
    waiting: int  # requests waiting for a slot of their (loaded) model
    max_waiting: int
    pending: int  # requests waiting for the scheduler (to load, reload or make room), their clients still there
    max_pending: int
    rejected_busy: int  # 503s for a full OLLAMA_MAX_QUEUE
    busy_slot_seconds: float  # sum over requests of the time each held a slot
    faults_fired: int
    faults: list[Fault]  # still armed, each with its remaining count


class Counters:
    """Per-endpoint, per-model and per-status tallies, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.started_wall = time.time()
            self.started = time.monotonic()
            self.requests: Counter[str] = Counter()
            self.by_model: Counter[str] = Counter()
            self.responses: Counter[int] = Counter()
            self.loads: Counter[str] = Counter()
            self.aborted_loads: Counter[str] = Counter()
            self.unloads: Counter[str] = Counter()
            self.pulls: Counter[str] = Counter()

    def request(self, endpoint: str, model: str | None) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            if model:
                self.by_model[model] += 1

    def response(self, status: int) -> None:
        with self._lock:
            self.responses[status] += 1

    def event(self, table: Counter[str], model: str) -> None:
        """Count a load, aborted load, unload or pull of a model (``table`` is one of those counters)."""
        with self._lock:
            table[model] += 1

    def fill(self, **others: object) -> SimStats:
        """Return the tallies as SimStats, with the other fields given."""
        with self._lock:
            return SimStats(
                started_at=datetime.fromtimestamp(self.started_wall, timezone.utc).isoformat(),
                uptime_s=time.monotonic() - self.started,
                requests=dict(self.requests),
                requests_by_model=dict(self.by_model),
                responses=dict(self.responses),
                loads=dict(self.loads),
                aborted_loads=dict(self.aborted_loads),
                unloads=dict(self.unloads),
                pulls=dict(self.pulls),
                **others,  # type: ignore[arg-type]
            )


class _Turn:
    """A request waiting in line; the pool fills in taken_at when it hands the slot over."""

    __slots__ = ("event", "taken_at")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.taken_at: float | None = None


class SlotFigures:
    """Utilisation across every model's pool; its lock guards the pools too."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pools: weakref.WeakSet[SlotPool] = weakref.WeakSet()
        self.stopping = False
        self.in_use = 0
        self.waiting = 0
        self.reset()

    def reset(self) -> None:
        """Restart the figures; requests in slots now count from now on."""
        with self.lock:
            self.max_in_use = self.in_use
            self.max_waiting = self.waiting
            self.busy_seconds = 0.0
            self.reset_at = time.monotonic()
            self.start_sum = self.in_use * self.reset_at  # sum of the start times of slots in use

    def stop(self) -> None:
        """Wake every waiter of every pool with Stopping, and refuse new requests."""
        with self.lock:
            self.stopping = True
            for pool in list(self.pools):
                pool.wake_all_locked()

    def snapshot(self) -> dict[str, float | int]:
        with self.lock:
            ongoing = self.in_use * time.monotonic() - self.start_sum
            return {
                "in_slots": self.in_use,
                "max_in_slots": self.max_in_use,
                "waiting": self.waiting,
                "max_waiting": self.max_waiting,
                "busy_slot_seconds": max(0.0, self.busy_seconds + ongoing),
            }

    def took(self, now: float) -> None:
        """Count a slot taken (the lock is held)."""
        self.in_use += 1
        self.max_in_use = max(self.max_in_use, self.in_use)
        self.start_sum += now


class SlotPool:
    """One loaded model's FIFO semaphore of ``slots``, with no limit on its waiters."""

    def __init__(self, slots: int, figures: SlotFigures) -> None:
        self.slots = slots
        self._figures = figures
        self._waiters: deque[_Turn] = deque()
        self._in_use = 0
        with figures.lock:
            figures.pools.add(self)

    def acquire(self, gone: Callable[[], bool]) -> float:
        """Take a slot, waiting in line for one; return the time it was taken.

        Raise ClientGone when ``gone()`` says the client left first, Stopping
        when the simulator stops.
        """
        figures = self._figures
        with figures.lock:
            if figures.stopping:
                raise Stopping
            if self._in_use < self.slots and not self._waiters:
                now = time.monotonic()
                self._in_use += 1
                figures.took(now)
                return now
            turn = _Turn()
            self._waiters.append(turn)
            figures.waiting += 1
            figures.max_waiting = max(figures.max_waiting, figures.waiting)
        while not turn.event.wait(POLL_SECONDS):
            if gone() and self._give_up(turn):
                raise ClientGone
        if turn.taken_at is None:
            raise Stopping
        return turn.taken_at

    def _give_up(self, turn: _Turn) -> bool:
        """Leave the line; False if the slot was handed over meanwhile (the caller then has it)."""
        with self._figures.lock:
            if turn.event.is_set():
                return False
            self._waiters.remove(turn)
            self._figures.waiting -= 1
            return True

    def release(self, taken_at: float) -> None:
        now = time.monotonic()
        figures = self._figures
        with figures.lock:
            # A slot taken before the last reset only counts from the reset on.
            started = max(taken_at, figures.reset_at)
            figures.busy_seconds += now - started
            figures.start_sum -= started
            if self._waiters:
                # Hand the slot straight to the next in line, so no newcomer jumps the queue.
                turn = self._waiters.popleft()
                figures.waiting -= 1
                turn.taken_at = now
                figures.start_sum += now
                turn.event.set()
            else:
                self._in_use -= 1
                figures.in_use -= 1

    def wake_all_locked(self) -> None:
        """Wake every waiter with Stopping (the figures' lock is held)."""
        while self._waiters:
            self._waiters.popleft().event.set()
            self._figures.waiting -= 1
