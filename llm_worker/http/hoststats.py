"""Host and per-process readings through psutil: CPU, memory, disk, network, processes.

``host_reading()`` reads the whole host; ``ProcessWatcher.read(pids)`` reads
many processes cheaply by keeping one ``psutil.Process`` per pid between calls
(so CPU ratios have a previous sample and lookups skip the pid scan);
``find_processes()`` finds Ollama's processes by name. Nothing here raises: a
reading psutil cannot take is None, a process that is gone is left out.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple, TypeVar

import msgspec
import psutil
from msgspec import Struct

log = logging.getLogger("llm_worker.http.hoststats")

T = TypeVar("T")

# Ollama runs as ``ollama serve`` and forks ``ollama runner`` processes; before
# 0.4 its runners were separate ``ollama_llama_server`` binaries.
OLLAMA_NAMES = ("ollama", "ollama_llama_server")


class HostReading(Struct, frozen=True, kw_only=True):
    """The host as a whole; a field is None where psutil could not read it."""

    cpu_ratio: float | None  # 0..1 over all CPUs since this thread's previous call; None on its first
    cpu_count: int | None  # logical CPUs
    load_1m: float | None
    load_5m: float | None
    load_15m: float | None
    memory_used_bytes: int | None  # psutil's "used": not free, not buffers, not cache
    memory_available_bytes: int | None  # what can be given to programs without swapping
    memory_total_bytes: int | None
    swap_used_bytes: int | None
    swap_total_bytes: int | None
    disk_path: str
    disk_used_bytes: int | None
    disk_total_bytes: int | None
    net_sent_bytes: int | None  # counters over every interface but loopback
    net_recv_bytes: int | None
    boot_time: float | None  # seconds since the epoch


class ProcessReading(Struct, frozen=True, kw_only=True):
    """One process; ``cpu_seconds`` is a counter, ``cpu_ratio`` may pass 1 with many threads."""

    pid: int
    rss_bytes: int
    cpu_seconds: float  # user + system since the process started
    cpu_ratio: float | None  # of one CPU since the watcher's previous read; None on first sight
    threads: int
    open_fds: int | None  # None when not permitted (another user's process)


# ----------------------------------------------------------------------
# The host
# ----------------------------------------------------------------------

_primed_threads: set[int] = set()


def host_reading(disk_path: str = "/") -> HostReading:
    """Read CPU, load, memory, swap, the disk holding ``disk_path``, network and boot time."""
    memory = _guard(psutil.virtual_memory)
    swap = _guard(psutil.swap_memory)
    disk = _guard(lambda: psutil.disk_usage(disk_path))
    load = _guard(psutil.getloadavg)
    net = _guard(_network_totals)
    return HostReading(
        cpu_ratio=_guard(_cpu_ratio),
        cpu_count=_guard(psutil.cpu_count),
        load_1m=None if load is None else load[0],
        load_5m=None if load is None else load[1],
        load_15m=None if load is None else load[2],
        memory_used_bytes=None if memory is None else memory.used,
        memory_available_bytes=None if memory is None else memory.available,
        memory_total_bytes=None if memory is None else memory.total,
        swap_used_bytes=None if swap is None else swap.used,
        swap_total_bytes=None if swap is None else swap.total,
        disk_path=disk_path,
        disk_used_bytes=None if disk is None else disk.used,
        disk_total_bytes=None if disk is None else disk.total,
        net_sent_bytes=None if net is None else net[0],
        net_recv_bytes=None if net is None else net[1],
        boot_time=_guard(psutil.boot_time),
    )


def _cpu_ratio() -> float | None:
    # psutil keeps the previous sample per thread and answers a meaningless 0.0
    # on a thread's first call: say "unknown" instead.
    ratio = float(psutil.cpu_percent(interval=None)) / 100.0
    thread = threading.get_ident()
    if thread not in _primed_threads:
        _primed_threads.add(thread)
        return None
    return ratio


def _network_totals() -> tuple[int, int]:
    # Loopback is left out: traffic to Redis and Ollama on this host is not network.
    nics = psutil.net_io_counters(pernic=True, nowrap=True)
    counters = [c for name, c in nics.items() if name != "lo"]
    return sum(c.bytes_sent for c in counters), sum(c.bytes_recv for c in counters)


def _guard(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except Exception as exc:  # a reading the platform refuses must not stop the others
        log.debug("host reading failed: %r", exc)
        return None


# ----------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------


class ProcessWatcher:
    """Read processes by pid, keeping their ``psutil.Process`` between calls.

    An entry is dropped as soon as its process is gone (or a zombie), and after
    ``forget_after_s`` without a read, so several callers may share one watcher
    and the cache never outgrows the processes asked about. ``clock`` times the
    CPU ratio and the forgetting.
    """

    def __init__(self, forget_after_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._seen: dict[int, _Seen] = {}
        self._lock = threading.Lock()

    def read(self, pids: Iterable[int]) -> dict[int, ProcessReading]:
        """Read every pid that is alive; the gone ones are absent from the result."""
        now = self._clock()
        readings: dict[int, ProcessReading] = {}
        with self._lock:
            for pid in pids:
                reading = self._read_one(pid, now)
                if reading is not None:
                    readings[pid] = reading
            for pid in [pid for pid, seen in self._seen.items() if now - seen.at > self.forget_after_s]:
                del self._seen[pid]
        return readings

    def __contains__(self, pid: object) -> bool:
        """Whether ``pid`` has a cached entry (its process was alive at its last read)."""
        return pid in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def _read_one(self, pid: int, now: float) -> ProcessReading | None:
        seen = self._seen.get(pid)
        try:
            proc = psutil.Process(pid) if seen is None else seen.proc
            reading = _read_process(proc)
        except Exception:  # NoSuchProcess, ZombieProcess, AccessDenied, a bad pid
            reading = None
        if reading is None:
            self._seen.pop(pid, None)
            return None
        self._seen[pid] = _Seen(proc, reading.cpu_seconds, now)
        # CPU time that went backwards is a new process under a reused pid: no ratio yet.
        if seen is None or now <= seen.at or reading.cpu_seconds < seen.cpu_seconds:
            return reading
        ratio = (reading.cpu_seconds - seen.cpu_seconds) / (now - seen.at)
        return msgspec.structs.replace(reading, cpu_ratio=ratio)


class _Seen(NamedTuple):
    proc: psutil.Process
    cpu_seconds: float
    at: float


def process_reading(pid: int) -> ProcessReading | None:
    """Read one process once, without a cache (``cpu_ratio`` is None); None if it is gone."""
    try:
        return _read_process(psutil.Process(pid))
    except Exception:
        return None


def _read_process(proc: psutil.Process) -> ProcessReading | None:
    # Each call reads one /proc file (stat, statm, status, fd/); oneshot keeps
    # stat's parse for the status and the times. A zombie is gone for us.
    with proc.oneshot():
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        times = proc.cpu_times()
        try:
            fds: int | None = proc.num_fds()
        except psutil.AccessDenied:
            fds = None
        return ProcessReading(
            pid=proc.pid,
            rss_bytes=proc.memory_info().rss,
            cpu_seconds=times.user + times.system,
            cpu_ratio=None,
            threads=proc.num_threads(),
            open_fds=fds,
        )


def find_processes(names: Collection[str] = OLLAMA_NAMES) -> list[int]:
    """Pids of processes whose name, or the basename of whose argv[0], is in ``names``."""
    wanted = set(names)
    found = []
    try:
        for proc in psutil.process_iter(["name", "cmdline"]):
            info = proc.info
            argv0 = os.path.basename(info["cmdline"][0]) if info.get("cmdline") else None
            if info.get("name") in wanted or argv0 in wanted:
                found.append(proc.pid)
    except Exception as exc:  # process_iter itself failing (no /proc): nothing found
        log.debug("process scan failed: %r", exc)
    return sorted(found)
