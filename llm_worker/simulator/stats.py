"""Slots (Ollama's parallel requests and its queue) and the counters behind /_sim/stats."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from datetime import datetime, timezone

from msgspec import Struct

from llm_worker.simulator.config import Fault


class ServerBusy(Exception):
    """More requests wait for a slot than the queue holds."""


class Stopping(Exception):
    """The simulator is shutting down; drop the request."""


class SimStats(Struct, kw_only=True):
    """What the simulator saw since it started or was last reset."""

    started_at: str
    uptime_s: float
    requests: dict[str, int]  # per endpoint
    requests_by_model: dict[str, int]
    responses: dict[int, int]  # per HTTP status
    loads: dict[str, int]  # per model, reloads for changed options included
    unloads: dict[str, int]
    pulls: dict[str, int]
    loaded: list[str]
    slots: int
    in_slots: int
    max_in_slots: int
    waiting: int
    max_waiting: int
    rejected_busy: int  # 503s for a full queue
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
        """Count a load, unload or pull of a model (``table`` is one of those counters)."""
        with self._lock:
            table[model] += 1

    def fill(self, **others: object) -> SimStats:
        """Return the tallies as SimStats, with the other fields given."""
        with self._lock:
            return SimStats(
                started_at=datetime.fromtimestamp(self.started_wall, timezone.utc).isoformat(),
                uptime_s=time.monotonic() - self.started,
                requests=dict(self.requests), requests_by_model=dict(self.by_model),
                responses=dict(self.responses), loads=dict(self.loads),
                unloads=dict(self.unloads), pulls=dict(self.pulls), **others,  # type: ignore[arg-type]
            )


class _Turn:
    """A request waiting in line; release() fills in when it got its slot."""

    __slots__ = ("event", "taken_at")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.taken_at: float | None = None


class SlotPool:
    """A FIFO semaphore with a bounded queue that keeps its own utilisation figures."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiters: deque[_Turn] = deque()
        self._stopping = False
        self.in_use = 0
        self.reset()

    def reset(self) -> None:
        """Restart the figures; requests in slots now count from now on."""
        with self._lock:
            self.max_in_use = self.in_use
            self.max_waiting = len(self._waiters)
            self.rejected = 0
            self.busy_seconds = 0.0
            self._reset_at = time.monotonic()
            self._start_sum = self.in_use * self._reset_at  # sum of the start times of slots in use

    def acquire(self) -> float:
        """Take a slot, waiting in line for one; return the time it was taken."""
        with self._lock:
            if self._stopping:
                raise Stopping
            if self.in_use < self.slots and not self._waiters:
                now = time.monotonic()
                self.in_use += 1
                self.max_in_use = max(self.max_in_use, self.in_use)
                self._start_sum += now
                return now
            if len(self._waiters) >= self.max_queue:
                self.rejected += 1
                raise ServerBusy
            turn = _Turn()
            self._waiters.append(turn)
            self.max_waiting = max(self.max_waiting, len(self._waiters))
        turn.event.wait()
        if turn.taken_at is None:
            raise Stopping
        return turn.taken_at

    def release(self, taken_at: float) -> None:
        now = time.monotonic()
        with self._lock:
            # A slot taken before the last reset only counts from the reset on.
            started = max(taken_at, self._reset_at)
            self.busy_seconds += now - started
            self._start_sum -= started
            if self._waiters:
                # Hand the slot straight to the next in line, so no newcomer jumps the queue.
                turn = self._waiters.popleft()
                turn.taken_at = now
                self._start_sum += now
                turn.event.set()
            else:
                self.in_use -= 1

    def stop(self) -> None:
        """Wake every waiter with Stopping, and refuse new requests."""
        with self._lock:
            self._stopping = True
            while self._waiters:
                self._waiters.popleft().event.set()

    def figures(self) -> dict[str, float | int]:
        with self._lock:
            ongoing = self.in_use * time.monotonic() - self._start_sum
            return {
                "slots": self.slots, "in_slots": self.in_use, "max_in_slots": self.max_in_use,
                "waiting": len(self._waiters), "max_waiting": self.max_waiting,
                "rejected_busy": self.rejected, "busy_slot_seconds": max(0.0, self.busy_seconds + ongoing),
            }
