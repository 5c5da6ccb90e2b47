"""Shared-memory tables: the host header, pools, models, worker slots and host readings.

The supervisor maps one anonymous shared region before it forks, so every
child sees the same bytes and nothing is left in /dev/shm when it dies. Every
field has one writer: a slot's job fields and counters its worker, its pid and
state the supervisor while no worker runs in it, its resource readings the
sampler in the HTTP process. Readers never block writers; the one multi-field
update readers must not see half-done (folding a dead worker's counters into
its pool's retired total) is fenced by a sequence number. Times are
``time.monotonic()``, one clock for every process of the host.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

from llm_worker.host.layout import (
    MAX_MODELS,
    MAX_POOLS,
    MODEL_NAME_BYTES,
    POOL_NAME,
    Board,
    Counters,
    Header,
    ProviderTable,
    RateTable,
    Readings,
    Slot,
    SlotState,
)
from llm_worker.host.layout import Table as BreakerTable


class ShmLock:
    """A cross-process lock that the kernel releases when its holder dies.

    A POSIX record lock (lockf) on a file that was unlinked at once: nothing is
    left behind, each process that inherits the descriptor locks on its own
    account (unlike flock, whose lock is shared across fork), and a holder
    that is SIGKILLed releases it. A multiprocessing.Lock would stay held forever.
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="llm-worker-lock-")
        os.unlink(path)
        self.fd = fd

    @contextmanager
    def held(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


class SharedState:
    """The whole shared region: header, readings, breakers, retired totals per pool, ``size`` slots."""

    def __init__(self, size: int) -> None:
        parts = [
            ("header", Header),
            ("readings", Readings),
            ("breakers", BreakerTable),
            ("providers", ProviderTable),
            ("loads", Board),
            ("ratelimits", RateTable),
            ("retired", Counters * MAX_POOLS),
            ("slots", Slot * size),
        ]
        offsets, total = {}, 0
        for name, kind in parts:
            offsets[name] = total
            total += (ctypes.sizeof(kind) + 63) // 64 * 64  # cache-line aligned
        self._map = mmap.mmap(-1, total)
        self.header = Header.from_buffer(self._map, offsets["header"])
        self.readings = Readings.from_buffer(self._map, offsets["readings"])
        self.breakers = BreakerTable.from_buffer(self._map, offsets["breakers"])
        self.providers = ProviderTable.from_buffer(self._map, offsets["providers"])
        self.loads = Board.from_buffer(self._map, offsets["loads"])
        self.ratelimits = RateTable.from_buffer(self._map, offsets["ratelimits"])
        self.retired = (Counters * MAX_POOLS).from_buffer(self._map, offsets["retired"])
        self.slots = (Slot * size).from_buffer(self._map, offsets["slots"])
        self.lock = ShmLock()
        self.header.slots = size
        self.header.started = time.time()
        self.header.models[0].value = b"other"
        self.header.model_count = 1
        self._model_index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def free_slot(self) -> int | None:
        for index, slot in enumerate(self.slots):
            if slot.state == SlotState.EMPTY and slot.pid == 0:
                return index
        return None

    # ---- pools ----------------------------------------------------------------

    def pool_index(self, name: str, keep: Collection[str] = ()) -> int:
        """The pool's index, added to the table if new (supervisor only).

        A new name takes a row never used, else the row of a pool that is not in ``keep`` (the pools
        configured) and that no live worker serves: that pool is no longer shown, and the row's per-pool
        data is cleared as the new name takes it, so the new pool's counters start at zero instead of
        inheriting the old one's. ``ValueError`` when neither is left (``pools_fit`` says so beforehand).
        """
        names = self.pool_names()
        if name in names:
            return names.index(name)
        if len(name.encode()) >= POOL_NAME:
            raise ValueError(f"pool name longer than {POOL_NAME - 1} bytes: {name!r}")
        if self.header.pool_count < MAX_POOLS:
            index = self.header.pool_count
            self.header.pools[index].value = name.encode()
            self.header.pool_count = index + 1
            return index
        reusable = self._reusable_rows(names, keep)
        if not reusable:
            raise ValueError(f"more than {MAX_POOLS} pools")
        index = reusable[0]
        self._reuse_row(index, name)
        return index

    def pools_fit(self, names: Iterable[str]) -> bool:
        """Whether every pool of ``names`` has, or can be given, a row (``pool_index(name, keep=names)``)."""
        wanted = list(dict.fromkeys(names))
        table = self.pool_names()
        new = [name for name in wanted if name not in table]
        room = MAX_POOLS - self.header.pool_count + len(self._reusable_rows(table, wanted))
        return len(new) <= room

    def _reusable_rows(self, names: list[str], keep: Collection[str]) -> list[int]:
        served = {slot.pool for slot in self.slots if slot.pid != 0}  # forked (or forking) and not yet reaped
        return [index for index, name in enumerate(names) if name not in keep and index not in served]

    def _reuse_row(self, index: int, name: str) -> None:
        """Give row ``index`` to pool ``name``, its per-pool data cleared; fenced like a retirement."""
        header = self.header
        header.fold_seq += 1  # odd: readers retry
        header.pools[index].value = name.encode()
        header.pool_wanted[index] = 0
        header.worker_exits[index] = 0
        header.pool_models[index] = 0
        self.retired[index].clear()
        self.readings.waiting[index] = self.readings.processing[index] = 0  # until the sampler reads the new queue
        header.fold_seq += 1

    def pool_names(self) -> list[str]:
        return [self.header.pools[i].value.decode() for i in range(self.header.pool_count)]

    # ---- model labels ----------------------------------------------------------

    def model_labels(self) -> list[str]:
        return [self.header.models[i].value.decode() for i in range(self.header.model_count)]

    def model_index(self, label: str, *, add: bool) -> int:
        """The index of a model label; new labels are added while there is room, else 0 ("other")."""
        found = self._model_index.get(label)
        if found is not None:
            return found
        with self.lock.held():
            labels = self.model_labels()
            if label in labels:
                index = labels.index(label)
            elif add and len(labels) < MAX_MODELS:
                index = len(labels)
                self.header.models[index].value = label.encode()[: MODEL_NAME_BYTES - 1]
                self.header.model_count = index + 1
            else:
                index = 0
        self._model_index[label] = index
        return index

    # ---- retiring a dead worker's counts ------------------------------------------

    def retire(self, slot: Slot) -> None:
        """Fold a dead worker's counters into its pool's total, so exported counters never fall."""
        self.header.fold_seq += 1  # odd: readers retry
        slot.counters.add_to(self.retired[slot.pool])
        slot.counters.clear()
        self.header.fold_seq += 1

    def read_consistently(self, read):  # type: ignore[no-untyped-def]
        """Run ``read()`` until no retirement happened during it; return its result."""
        while True:
            before = self.header.fold_seq
            if before % 2 == 0:
                value = read()
                if self.header.fold_seq == before:
                    return value
            time.sleep(0.0005)
