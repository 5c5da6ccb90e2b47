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
import enum
import fcntl
import mmap
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from llm_worker.backpressure import ProviderTable
from llm_worker.breaker import Table as BreakerTable
from llm_worker.loadboard import Board
from llm_worker.stats import MAX_MODELS, Counters

MAX_POOLS = 16
MAX_GPUS = 16
MAX_LOADED = 16
NAME = 96


class SlotState(enum.IntEnum):
    EMPTY = 0  # no process: never used, or its worker was reaped
    BOOTING = 1  # forked, connecting to Redis and loading plugins
    IDLE = 2  # waiting on its queue
    BUSY = 3  # a job in hand
    DRAINING = 4  # told to stop; finishing the job in hand


class Phase(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    DRAINING = 2
    STOPPING = 3
    RELOADING = 4


JOB_ID_BYTES = 132


class Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int32),
        ("state", ctypes.c_int32),
        ("pool", ctypes.c_int32),  # index into the pool table
        ("generation", ctypes.c_uint32),  # raised on every spawn into this slot
        ("spawned", ctypes.c_double),
        ("heartbeat", ctypes.c_double),
        ("job_started", ctypes.c_double),
        ("job_deadline", ctypes.c_double),  # job_started + the job's timeout
        ("jobs_done", ctypes.c_uint64),
        ("job_id", ctypes.c_char * JOB_ID_BYTES),
        ("boot_error", ctypes.c_char * 256),  # why the last boot failed, for the supervisor's message
        ("rss_bytes", ctypes.c_double),  # written by the sampler
        ("cpu_seconds", ctypes.c_double),  # written by the sampler
        ("model", ctypes.c_int32),  # the model label of the job in hand, for the model manager
        ("paused", ctypes.c_int32),  # why the worker takes no jobs now (a backpressure.Pause), 0 when it does
        ("call", ctypes.c_int32),  # waiting for or in a provider call (a backpressure.Call)
        ("provider", ctypes.c_int32),  # index of the provider of that call, for per-provider caps
        ("paused_why", ctypes.c_char * 240),  # the pause's reason in words, for readiness and /status
        ("counters", Counters),
    ]

    # ---- the worker's side -----------------------------------------------

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def begin(self, job_id: str, timeout: float) -> None:
        now = time.monotonic()
        self.job_id = job_id.encode()[: JOB_ID_BYTES - 1]
        self.job_started = now
        self.job_deadline = now + timeout
        self.heartbeat = now
        self.state = SlotState.BUSY

    def end(self, state: SlotState = SlotState.IDLE) -> None:
        self.job_started = 0.0
        self.job_deadline = 0.0
        self.job_id = b""
        self.jobs_done += 1
        self.heartbeat = time.monotonic()
        self.state = state

    # ---- the supervisor's side -------------------------------------------

    def claim(self, pid: int, pool: int) -> None:
        """Give this slot to a freshly forked worker."""
        self.pid = pid
        self.pool = pool
        self.generation += 1
        self.spawned = self.heartbeat = time.monotonic()
        self.job_started = self.job_deadline = 0.0
        self.job_id = b""
        self.boot_error = b""
        self.rss_bytes = self.cpu_seconds = 0.0
        self.model, self.paused, self.call = -1, 0, 0
        self.state = SlotState.BOOTING

    def release(self) -> None:
        self.pid = 0
        self.model, self.paused, self.call = -1, 0, 0
        self.state = SlotState.EMPTY
        self.job_started = self.job_deadline = 0.0
        self.job_id = b""


class Header(ctypes.Structure):
    _fields_ = [
        ("supervisor_pid", ctypes.c_int32),
        ("phase", ctypes.c_int32),
        ("slots", ctypes.c_int32),
        ("started", ctypes.c_double),  # wall clock, for uptime
        ("loop_beat", ctypes.c_double),  # the supervisor loop's last turn (monotonic)
        ("redis_up", ctypes.c_int32),
        ("redis_checked", ctypes.c_double),
        ("workers_wanted", ctypes.c_int32),  # sum of the pools' targets, for readiness
        ("http_bound", ctypes.c_int32),  # the HTTP process listens
        ("fold_seq", ctypes.c_uint64),  # odd while a dead worker's counts are being retired
        ("jobs_requeued", ctypes.c_uint64),  # handed back from dead workers' processing lists
        ("jobs_crash_dead_lettered", ctypes.c_uint64),  # dead-lettered for crashing workers
        ("worker_exits", ctypes.c_uint64 * MAX_POOLS),  # workers that died unasked, per pool
        ("pool_count", ctypes.c_int32),
        ("pools", (ctypes.c_char * NAME) * MAX_POOLS),
        ("pool_wanted", ctypes.c_int32 * MAX_POOLS),
        ("model_count", ctypes.c_int32),
        ("models", (ctypes.c_char * NAME) * MAX_MODELS),  # label of index i; index 0 is "other"
        ("model_last_used", ctypes.c_double * MAX_MODELS),  # monotonic, by any worker: for idle unloading
        ("pool_models", ctypes.c_uint32 * MAX_POOLS),  # bit i: the pool has called model label i (backpressure)
        ("models_ready", ctypes.c_int32),  # the model manager has preloaded what it should (readiness waits)
        ("model_load_seconds", ctypes.c_double * MAX_MODELS),  # the last load of each model label took, by the manager
        ("model_loads", ctypes.c_uint64 * MAX_MODELS),  # loads the manager made, per model label
        ("model_unloads", ctypes.c_uint64 * MAX_MODELS),  # unloads the manager made, per model label
    ]


class GpuRow(ctypes.Structure):
    """One GPU as last sampled. NaN marks what the device does not report."""

    _fields_ = [
        ("index", ctypes.c_int32),
        ("uuid", ctypes.c_char * NAME),
        ("name", ctypes.c_char * NAME),
        ("utilization_ratio", ctypes.c_double),
        ("memory_used_bytes", ctypes.c_double),
        ("memory_total_bytes", ctypes.c_double),
        ("temperature_celsius", ctypes.c_double),
        ("power_watts", ctypes.c_double),
        ("energy_joules", ctypes.c_double),
        ("ollama_memory_bytes", ctypes.c_double),
    ]


class Readings(ctypes.Structure):
    """The host as the sampler in the HTTP process last saw it."""

    _fields_ = [
        ("sampled", ctypes.c_double),
        ("provider_checked", ctypes.c_double),
        ("provider_up", ctypes.c_int32),
        ("provider_version", ctypes.c_char * 64),
        ("provider_error", ctypes.c_char * 256),
        ("loaded_count", ctypes.c_int32),
        ("loaded_names", (ctypes.c_char * NAME) * MAX_LOADED),
        ("loaded_vram", ctypes.c_double * MAX_LOADED),
        ("loaded_bytes", ctypes.c_double * MAX_LOADED),  # the memory each holds: its VRAM, else its size (CPU)
        ("depths_checked", ctypes.c_double),
        ("waiting", ctypes.c_int64 * MAX_POOLS),
        ("processing", ctypes.c_int64 * MAX_POOLS),
        ("delayed", ctypes.c_int64),
        ("dead_letter", ctypes.c_int64),
        ("gpu_collector_up", ctypes.c_int32),
        ("gpu_count", ctypes.c_int32),
        ("gpu_error", ctypes.c_char * 256),
        ("gpus", GpuRow * MAX_GPUS),
        ("cpu_ratio", ctypes.c_double),
        ("cpu_count", ctypes.c_int32),
        ("load1", ctypes.c_double),
        ("memory_used_bytes", ctypes.c_double),
        ("memory_total_bytes", ctypes.c_double),
        ("disk_used_bytes", ctypes.c_double),
        ("disk_total_bytes", ctypes.c_double),
        ("network_sent_bytes", ctypes.c_double),
        ("network_received_bytes", ctypes.c_double),
    ]


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
        parts = [("header", Header), ("readings", Readings), ("breakers", BreakerTable), ("providers", ProviderTable),
                 ("loads", Board), ("retired", Counters * MAX_POOLS), ("slots", Slot * size)]
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

    def pool_index(self, name: str) -> int:
        """The pool's index, added to the table if new (supervisor only)."""
        for index in range(self.header.pool_count):
            if self.header.pools[index].value.decode() == name:
                return index
        if self.header.pool_count >= MAX_POOLS:
            raise ValueError(f"more than {MAX_POOLS} pools")
        index = self.header.pool_count
        self.header.pools[index].value = name.encode()[: NAME - 1]
        self.header.pool_count = index + 1
        return index

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
                self.header.models[index].value = label.encode()[: NAME - 1]
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
