"""Circuit breakers in shared memory: one per endpoint and model, for every process of the host.

An endpoint is a server a provider speaks to (endpoints.py): keys are
``<endpoint>:<model>``, ``ollama:llama3.2`` on a host with one Ollama as
always, ``ollama@2:llama3.2`` for the second of several, so that one server's
failures never open another's breaker. The ``provider`` argument of the
methods below is the endpoint's name.

A breaker trips (opens) on CIRCUIT_BREAKER_THRESHOLD consecutive failures,
or when the failures over the last CIRCUIT_BREAKER_TIMEOUT of one-second
buckets reach CIRCUIT_BREAKER_FAILURE_RATE of at least
CIRCUIT_BREAKER_MIN_CALLS calls. It stays open for
CIRCUIT_BREAKER_RESET_TIMEOUT, doubled (with jitter) on every re-open up to
CIRCUIT_BREAKER_MAX_RESET_TIMEOUT; then it is half-open and admits exactly
one probe across all processes, through a lease (owner pid, deadline) that
another process takes back when the prober dies or overruns. The probe's
success closes it; its failure opens it again.

Rows: a model gets its row when a call of it is first answered with an
outcome that counts (a success, or a counted failure), so a model the
provider lacks (a model error) takes none. Full (MAX_BREAKERS), the table
recycles the least recently used closed row; when every row is open, forced
or probing, a new model shares its provider's catch-all row (``<provider>:*``).

Transitions happen under the state's lock (a POSIX record lock the kernel
releases if its holder dies), never held during a provider call. The process
that makes a transition reports it once (event and log line).

Which errors count:

| error kind | counts | why |
| --- | --- | --- |
| timeout, network, provider (5xx, 503 busy, broken streams) | yes | the provider is failing |
| validation, model (not found, refused) | no | the caller asked for something wrong |
| memory (out of memory) | no | the memory strategy's signal: unload and retry |
| unknown, crashed | no | our own failures, not the provider's |

A provider may say otherwise for one error (``ProviderError.counted``): an
answer cut short is not counted (the server answered), nor is a wait for a
model load or a slot; a runner crash that repeats after the memory strategy
unloaded idle models is counted (a broken model, not a full GPU).
"""

from __future__ import annotations

import ctypes
import math
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.backoff import compute_backoff
from llm_worker.host.layout import BUCKETS, KEY_BYTES, MAX_BREAKERS, SHARED_KEY, Forced, Row, State, Table
from llm_worker.host.procs import alive
from llm_worker.plugin.providers import ENDPOINT_SEPARATOR
from llm_worker.protocol import records
from llm_worker.protocol.jobs import ErrorKind, JobError, iso
from llm_worker.protocol.records import Record
from llm_worker.settings.config import Settings

if TYPE_CHECKING:
    from llm_worker.host.shm import ShmLock

COUNTED = frozenset({ErrorKind.TIMEOUT, ErrorKind.NETWORK, ErrorKind.PROVIDER})
HALF_OPEN_RECHECK = 2.0  # seconds before a call refused during a probe tries again
MAX_DOUBLINGS = 16  # the open wait stops doubling after this many re-opens, even below its cap


def counts(error: JobError) -> bool:
    """Whether a failed call counts against its breaker: the error's own say, else its kind."""
    if isinstance(error, BreakerOpen):
        return False
    said = getattr(error, "counted", None)
    return error.kind in COUNTED if said is None else bool(said)


class BreakerOpen(JobError):
    """A call refused because its breaker is open (or its one probe is in flight elsewhere)."""

    kind = ErrorKind.PROVIDER

    def __init__(self, key: str, retry_at: float, message: str | None = None, *, probe_failed: bool = False) -> None:
        super().__init__(message or f"circuit breaker for {key} is open", retryable=True)
        self.key = key
        self.probe_failed = probe_failed  # a real call, the half-open probe, failed: see Finisher.failed
        self.retry_at = retry_at  # monotonic time it could admit a call again


@dataclass(frozen=True)
class Admission:
    probe: bool  # this call is the half-open breaker's one probe
    key: str


@dataclass(frozen=True)
class Transition:
    key: str
    to: str  # "opened" | "half_open" | "closed"
    reason: str
    open_seconds: float | None = None


class Breakers:
    """The breakers of one host, as one process uses them."""

    def __init__(self, table: Table, lock: ShmLock, settings: Settings) -> None:
        self.table = table
        self.lock = lock
        self.settings = settings
        self.transitions: list[Transition] = []  # made by this process, for the caller to report
        self._rows: dict[str, Row] = {}

    @property
    def enabled(self) -> bool:
        return self.settings.breaker.enabled

    # ---- around a provider call ------------------------------------------------

    def admit(self, provider: str, model: str, lease_seconds: float) -> Admission:
        """Let a call through, or raise BreakerOpen. A half-open breaker lets one through.

        A model without a row yet is a closed breaker: its row is made when
        the call is answered (``record``). When the table has no room for it,
        the call is guarded by its provider's catch-all row instead.
        """
        key = f"{provider}:{model}"
        if not self.enabled:
            return Admission(False, key)
        row = self._guarding(provider, key)
        if row is None:
            return Admission(False, key)
        key = row.key.decode()  # the catch-all's, when the model shares it
        now = time.monotonic()
        row.used = now
        if row.state == State.CLOSED and row.forced != Forced.OPEN:
            return Admission(False, key)  # the common case, read without the lock
        with self.lock.held():
            if row.forced == Forced.CLOSED:
                return Admission(False, key)
            if row.forced == Forced.OPEN:
                raise BreakerOpen(key, now + self.settings.breaker.reset_timeout / 1000)
            if row.state == State.OPEN:
                if now < row.open_until:
                    raise BreakerOpen(key, row.open_until)
                self._move(row, State.HALF_OPEN, "reset timeout passed")
            if row.state == State.HALF_OPEN:
                if row.lease_pid and now < row.lease_until and alive(row.lease_pid) and row.lease_pid != os.getpid():
                    # The probe is in flight: look again shortly, not at the lease's far end.
                    raise BreakerOpen(key, min(row.lease_until, now + HALF_OPEN_RECHECK * random.uniform(1.0, 1.5)))
                row.lease_pid = os.getpid()
                row.lease_until = now + lease_seconds
                return Admission(True, key)
            return Admission(False, key)

    def record(self, admission: Admission, error: JobError | None) -> None:
        """Count a call's outcome; trip, close or re-open the breaker as it says.

        The first outcome worth counting makes the model's row: a model error
        (not found, refused) makes none, so names the provider lacks take no row.
        """
        if not self.enabled:
            return
        counted = error is not None and counts(error)
        now = time.monotonic()
        with self.lock.held():
            row = self._locate(admission.key)
            if row is None:
                if error is not None and not counted:
                    return  # nothing to count: a model error, or one that is not the provider's
                row = self._make(admission.key, now)
            if error is None or counted:
                self._count(row, int(now), failed=counted)
            if row.forced != Forced.NONE:
                return
            if admission.probe and row.lease_pid == os.getpid():
                row.lease_pid = 0
                if error is None:
                    self._move(row, State.CLOSED, "probe succeeded")
                elif counted:
                    row.reopens += 1
                    self._open(row, now, f"probe failed: {error.message[:120]}")
                return
            if row.state != State.CLOSED:
                return
            if error is None:
                row.consecutive = 0
            elif counted:
                row.consecutive += 1
                b = self.settings.breaker
                calls, failures = self._window(row, int(now))
                if row.consecutive >= b.threshold:
                    self._open(row, now, f"{row.consecutive} failures in a row, the last: {error.message[:120]}")
                elif calls >= b.min_calls and failures / calls >= b.failure_rate:
                    self._open(row, now, f"{failures} of {calls} calls failed in {b.window // 1000} s")

    def open_until(self, key: str) -> float:
        """When an open breaker may half-open (monotonic); now when it is not open."""
        row = self._cached(key)
        now = time.monotonic()
        return max(now, row.open_until) if row is not None and row.state == State.OPEN else now

    def refused(self, model: str, provider: str) -> bool:
        """Whether a call to this model would be refused now (for fallback strategies)."""
        if not self.enabled:
            return False
        row = self._guarding(provider, f"{provider}:{model}", share=False)
        if row is None or row.forced == Forced.CLOSED:
            return False
        if row.forced == Forced.OPEN:
            return True
        now = time.monotonic()
        if row.state == State.OPEN:
            return now < row.open_until
        if row.state == State.HALF_OPEN:
            return bool(row.lease_pid and now < row.lease_until and alive(row.lease_pid))
        return False

    # ---- by hand (the admin routes) ---------------------------------------------

    def force(self, key: str, action: str) -> bool:
        """force-open, force-close or reset a breaker; False if there is no such breaker."""
        row = self._find(key)
        if row is None:
            if action != "force-open":
                return False
            with self.lock.held():
                row = self._locate(key) or self._make(key, time.monotonic())
            if row.key != key.encode()[: KEY_BYTES - 1]:
                return False  # no room for it: the table is full of breakers in use
        with self.lock.held():
            if action == "force-open":
                row.forced = Forced.OPEN
                self._move(row, State.OPEN, "forced open by an operator")
            elif action == "force-close":
                row.forced = Forced.CLOSED
                self._move(row, State.CLOSED, "forced closed by an operator")
            elif action == "reset":
                row.forced = Forced.NONE
                row.reopens = 0
                row.lease_pid = 0
                ctypes.memset(ctypes.addressof(row.bucket_calls), 0, ctypes.sizeof(row.bucket_calls))
                ctypes.memset(ctypes.addressof(row.bucket_failures), 0, ctypes.sizeof(row.bucket_failures))
                self._move(row, State.CLOSED, "reset by an operator")
            else:
                raise ValueError(action)
        return True

    def rows(self) -> list[dict[str, object]]:
        out = []
        now = time.monotonic()
        for row in self._used():
            calls, failures = self._window(row, int(now))
            out.append(
                {
                    "key": row.key.decode(),
                    "state": State(row.state).name.lower(),
                    "forced": Forced(row.forced).name.lower() if row.forced else None,
                    "consecutiveFailures": row.consecutive,
                    "windowCalls": calls,
                    "windowFailures": failures,
                    "halfOpenInSeconds": round(row.open_until - now, 3) if row.state == State.OPEN else None,
                    "probeOwnerPid": row.lease_pid or None,
                    "openedTotal": row.opened_total,
                    "changedAt": row.changed,
                }
            )
        return out

    # ---- inside the lock ------------------------------------------------------------

    def _open(self, row: Row, now: float, reason: str) -> None:
        b = self.settings.breaker
        # Jitter "up": hosts tripped together do not all probe together, and none probes before the reset timeout.
        reopens = min(row.reopens, MAX_DOUBLINGS)
        seconds = compute_backoff(reopens + 1, b.reset_timeout, cap=b.max_reset_timeout, jitter="up") / 1000
        row.open_until = now + seconds
        row.opened_total += 1
        self._move(row, State.OPEN, reason, seconds)

    def _move(self, row: Row, to: State, reason: str, seconds: float | None = None) -> None:
        if row.state == to and to != State.OPEN:
            return
        row.state = to
        row.changed = time.time()
        if to == State.CLOSED:
            row.consecutive = 0
            row.reopens = 0
            row.lease_pid = 0
        name = {State.OPEN: "opened", State.HALF_OPEN: "half_open", State.CLOSED: "closed"}[to]
        self.transitions.append(Transition(row.key.decode(), name, reason, seconds))

    def _count(self, row: Row, second: int, *, failed: bool) -> None:
        i = second % BUCKETS
        if row.bucket_second[i] != second:
            row.bucket_second[i] = second
            row.bucket_calls[i] = 0
            row.bucket_failures[i] = 0
        row.bucket_calls[i] += 1
        row.calls_total += 1
        if failed:
            row.bucket_failures[i] += 1
            row.failures_total += 1

    def _window(self, row: Row, now: int) -> tuple[int, int]:
        span = min(BUCKETS, max(1, math.ceil(self.settings.breaker.window / 1000)))
        calls = failures = 0
        for i in range(BUCKETS):
            if now - span < row.bucket_second[i] <= now:
                calls += row.bucket_calls[i]
                failures += row.bucket_failures[i]
        return calls, failures

    # ---- rows ------------------------------------------------------------------------

    def _used(self) -> list[Row]:
        return list(self.table.rows[: min(self.table.count, len(self.table.rows))])

    def _find(self, key: str) -> Row | None:
        raw = key.encode()[: KEY_BYTES - 1]
        for row in self._used():
            if row.key == raw:
                self._rows[key] = row
                return row
        self._rows.pop(key, None)
        return None

    def _cached(self, key: str) -> Row | None:
        """The breaker's row, if it has one: rows are recycled, so a remembered row must still be its."""
        row = self._rows.get(key)
        if row is not None and row.key == key.encode()[: KEY_BYTES - 1]:
            return row
        return self._find(key)

    _locate = _cached  # the same lookup, under the lock

    def _guarding(self, provider: str, key: str, *, share: bool = True) -> Row | None:
        """The row that guards a call: its own; else None while a row could be made for it; else the catch-all."""
        row = self._cached(key)
        if row is not None or self._room(time.monotonic()):
            return row
        shared = f"{provider}:{SHARED_KEY}"
        row = self._cached(shared)
        if row is None and share:
            with self.lock.held():
                row = self._locate(shared) or self._make(shared, time.monotonic())
        return row

    def _room(self, now: float) -> bool:
        """Whether a new model could have a row: a free one, or a closed one to recycle."""
        models = [row for row in self._used() if not _shared(row)]
        return len(models) < MAX_BREAKERS or any(_recyclable(row, now) for row in models)

    def _make(self, key: str, now: float) -> Row:
        """A new row for a breaker (inside the lock): a free one, else the least recently used closed
        one, else (the table full of breakers in use) its provider's catch-all row, shared."""
        raw = key.encode()[: KEY_BYTES - 1]
        rows = self._used()
        shared = key.partition(":")[2] == SHARED_KEY
        models = [row for row in rows if not _shared(row)]
        row: Row | None = None
        if len(rows) < len(self.table.rows) and (shared or len(models) < MAX_BREAKERS):
            row = self.table.rows[len(rows)]
            self.table.count = len(rows) + 1
        elif not shared:
            spare = [r for r in models if _recyclable(r, now)]
            if spare:
                row = min(spare, key=lambda r: r.used)
            else:
                provider = key.partition(":")[0]
                return self._locate(f"{provider}:{SHARED_KEY}") or self._make(f"{provider}:{SHARED_KEY}", now)
        if row is None:  # more providers than catch-all rows: share another provider's
            row = next(r for r in rows if _shared(r))
            self._rows[key] = row
            return row
        ctypes.memset(ctypes.addressof(row), 0, ctypes.sizeof(row))
        row.key = raw
        row.used = now
        self._rows[key] = row
        return row


def _shared(row: Row) -> bool:
    return row.key.partition(b":")[2] == SHARED_KEY.encode()


def _recyclable(row: Row, now: float) -> bool:
    """A model's row that holds nothing worth keeping: closed, not forced, no probe, not used this second."""
    return (
        not _shared(row)
        and row.state == State.CLOSED
        and row.forced == Forced.NONE
        and row.lease_pid == 0
        and now - row.used >= 1.0
    )


def breaker_record(t: Transition, worker_id: str) -> Record:
    """The event of a transition, for the metric sinks; ``endpoint`` only when the provider has several."""
    endpoint, _, model = t.key.partition(":")
    provider, several, _ = endpoint.partition(ENDPOINT_SEPARATOR)
    now = iso()
    data: dict[str, object] = {
        "model": model,
        "provider": provider,
        "workerId": worker_id,
        "timestamp": now,
        "state": t.to,
        "reason": t.reason,
    }
    if several:
        data["endpoint"] = endpoint
    if t.open_seconds is not None:
        data["openSeconds"] = round(t.open_seconds, 3)
    return Record(_EVENT[t.to], worker_id, now, data, model=model)


_EVENT = {"opened": records.BREAKER_OPENED, "half_open": records.BREAKER_HALF_OPEN, "closed": records.BREAKER_CLOSED}
