"""Shared-memory tables: the host header and one slot per worker process.

The supervisor maps one anonymous shared region before it forks, so every
child sees the same bytes and nothing is left in /dev/shm when it dies. Each
slot has one writer (its worker; the supervisor only while the slot has no
live worker), so no lock is needed. Times are ``time.monotonic()``, which is
one clock for every process of the host.
"""

from __future__ import annotations

import ctypes
import enum
import mmap
import time


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
        ("pool", ctypes.c_int32),  # index into the supervisor's pool list
        ("generation", ctypes.c_uint32),  # raised on every spawn into this slot
        ("spawned", ctypes.c_double),
        ("heartbeat", ctypes.c_double),
        ("job_started", ctypes.c_double),
        ("job_deadline", ctypes.c_double),  # job_started + the job's timeout
        ("jobs_done", ctypes.c_uint64),
        ("job_id", ctypes.c_char * JOB_ID_BYTES),
        ("boot_error", ctypes.c_char * 256),  # why the last boot failed, for the supervisor's message
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
        self.state = SlotState.BOOTING

    def release(self) -> None:
        self.pid = 0
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
    ]


class SharedState:
    """The whole shared region: a header and ``size`` worker slots."""

    def __init__(self, size: int) -> None:
        header = ctypes.sizeof(Header)
        self._map = mmap.mmap(-1, header + size * ctypes.sizeof(Slot))
        self.header = Header.from_buffer(self._map)
        self.slots = (Slot * size).from_buffer(self._map, header)
        self.header.slots = size
        self.header.started = time.time()

    def __len__(self) -> int:
        return len(self.slots)

    def free_slot(self) -> int | None:
        for index, slot in enumerate(self.slots):
            if slot.state == SlotState.EMPTY and slot.pid == 0:
                return index
        return None
