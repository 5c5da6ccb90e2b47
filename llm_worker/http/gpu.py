"""GPU readings through NVML: utilisation, memory, temperature, power, energy, processes.

``GpuSampler`` imports and initialises NVML lazily, in the process that calls
``sample()``, never in ``__init__``: a sampler may be built in the supervisor
before it forks, and NVML state must not cross a fork. A host without a driver
or without a GPU is a normal state, not an error: the reading says
``collector_up=False`` and why, one log line says so when the reason first
appears, and initialisation is retried at most once per ``retry_interval_s``.
A device that does not support one reading (consumer cards, MIG) leaves that
field ``None`` and the rest are still read. Nothing here raises.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection
from types import ModuleType
from typing import Any, TypeVar

from msgspec import Struct

log = logging.getLogger("llm_worker.http.gpu")

T = TypeVar("T")

# Older bindings hand back NVML_VALUE_NOT_AVAILABLE (an unsigned -1) where
# nvidia-ml-py maps it to None.
_NOT_AVAILABLE = (1 << 64) - 1


class GpuProcess(Struct, frozen=True, kw_only=True):
    """One compute process on one GPU, as NVML reports it (host pid namespace)."""

    pid: int
    name: str | None  # NVML's process name (often a full path); None when it cannot tell
    used_bytes: int | None  # None when the driver does not report it (WDDM, MIG, some drivers)


class GpuStats(Struct, frozen=True, kw_only=True):
    """One device's readings; a field is None where the device does not report it."""

    index: int
    uuid: str | None
    name: str | None
    utilization_ratio: float | None  # 0..1 over NVML's last sample period
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: int | None
    power_watts: float | None
    energy_joules: float | None  # a counter since the driver was loaded
    processes: list[GpuProcess] | None  # None: unknown; []: none running


class GpuReading(Struct, frozen=True, kw_only=True):
    """What one ``GpuSampler.sample()`` saw."""

    collector_up: bool
    error: str | None = None  # why the collector is down; None when up
    driver_version: str | None = None
    gpus: list[GpuStats] = []


class GpuSampler:
    """Read every GPU through an NVML binding module, initialising it on first use.

    ``module_name`` names the binding (``pynvml`` from nvidia-ml-py; tests pass
    a fake). ``clock`` and ``retry_interval_s`` pace re-initialisation after a
    failure. One lock serialises ``sample()`` and ``close()``.
    """

    def __init__(
        self,
        module_name: str = "pynvml",
        *,
        retry_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.module_name = module_name
        self.retry_interval_s = retry_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None
        self._init_pid: int | None = None  # the process whose NVML is initialised
        self._driver_version: str | None = None
        self._down: GpuReading | None = None  # the last failure, returned until the next try
        self._next_try = 0.0
        self._logged_reason: str | None = None
        self._announced = False  # "readings available" said since the last failure

    # ------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------

    def sample(self) -> GpuReading:
        """Read every GPU now; a reading with ``collector_up=False`` where NVML cannot."""
        with self._lock:
            try:
                return self._sample()
            except Exception as exc:  # a binding that misbehaves must not stop the sampler thread
                self._forget(shutdown=True)
                return self._fail(f"NVML sampling failed: {_describe(exc)}", level=logging.WARNING)

    def close(self) -> None:
        """Shut NVML down if this process initialised it; the next ``sample()`` starts again."""
        with self._lock:
            self._forget(shutdown=True)

    # ------------------------------------------------------------------
    # Initialisation and failure pacing
    # ------------------------------------------------------------------

    def _sample(self) -> GpuReading:
        if self._init_pid != os.getpid():
            self._forget(shutdown=False)  # inherited across fork: never touch the parent's handle
            if self._down is not None and self._clock() < self._next_try:
                return self._down
            reason = self._initialise()
            if reason is not None:
                return self._fail(reason)
        nvml = self._nvml
        assert nvml is not None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            self._forget(shutdown=True)
            return self._fail(f"nvmlDeviceGetCount failed: {_describe(exc)}")
        if count == 0:
            self._forget(shutdown=True)
            return self._fail("no GPU found by NVML")
        gpus = [stats for index in range(count) if (stats := _read_device(nvml, index)) is not None]
        self._announce(len(gpus))
        return GpuReading(collector_up=True, driver_version=self._driver_version, gpus=gpus)

    def _initialise(self) -> str | None:
        """Import and initialise the binding; return why not, or None on success."""
        try:
            nvml = importlib.import_module(self.module_name)
        except Exception as exc:  # ImportError, or a broken binding failing at import
            return f"cannot import {self.module_name}: {exc}"
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return f"nvmlInit failed: {_describe(exc)}"
        self._nvml, self._init_pid = nvml, os.getpid()
        self._driver_version = _call(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        return None

    def _forget(self, *, shutdown: bool) -> None:
        if shutdown and self._nvml is not None and self._init_pid == os.getpid():
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # already gone: nothing left to release
                pass
        self._nvml, self._init_pid, self._driver_version = None, None, None

    def _fail(self, reason: str, level: int = logging.INFO) -> GpuReading:
        self._down = GpuReading(collector_up=False, error=reason)
        self._next_try = self._clock() + self.retry_interval_s
        self._announced = False
        if reason != self._logged_reason:
            self._logged_reason = reason
            log.log(level, "GPU readings unavailable (retrying every %.0fs): %s", self.retry_interval_s, reason)
        return self._down

    def _announce(self, count: int) -> None:
        if not self._announced:
            log.info("GPU readings available: %d GPU(s), driver %s", count, self._driver_version)
        self._down, self._logged_reason, self._announced = None, None, True


# ----------------------------------------------------------------------
# Reading one device
# ----------------------------------------------------------------------


def _read_device(nvml: Any, index: int) -> GpuStats | None:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:  # lost, or no permission: leave it out of this reading
        log.debug("GPU %d skipped: %s", index, _describe(exc))
        return None
    memory = _call(nvml, lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    power_mw = _call(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    energy_mj = _call(nvml, lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    return GpuStats(
        index=index,
        uuid=_call(nvml, lambda: _text(nvml.nvmlDeviceGetUUID(handle))),
        name=_call(nvml, lambda: _text(nvml.nvmlDeviceGetName(handle))),
        utilization_ratio=_call(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0),
        memory_used_bytes=None if memory is None else int(memory.used),
        memory_total_bytes=None if memory is None else int(memory.total),
        temperature_celsius=_call(nvml, lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
        power_watts=None if power_mw is None else power_mw / 1000.0,
        energy_joules=None if energy_mj is None else energy_mj / 1000.0,
        processes=_call(nvml, lambda: _processes(nvml, handle)),
    )


def _processes(nvml: Any, handle: Any) -> list[GpuProcess]:
    found = []
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        used = getattr(proc, "usedGpuMemory", None)
        if used is not None and (used < 0 or used >= _NOT_AVAILABLE):
            used = None
        pid = int(proc.pid)
        found.append(
            GpuProcess(pid=pid, name=_call(nvml, lambda: _text(nvml.nvmlSystemGetProcessName(pid))), used_bytes=used)  # noqa: B023 - called at once
        )
    return found


def _call(nvml: Any, read: Callable[[], T]) -> T | None:
    """Run one NVML read; None when the device cannot answer it (not supported, or any error)."""
    try:
        return read()
    except Exception:  # NVMLError_NotSupported is normal; a missing function in old bindings too
        return None


def _text(value: str | bytes) -> str:
    # nvidia-ml-py returns str; older bindings returned bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------
# Helpers for callers
# ----------------------------------------------------------------------


def ollama_memory(reading: GpuReading, pids: Collection[int] = (), names: Collection[str] = ()) -> dict[int, int]:
    """Sum, per GPU index, the memory of processes whose pid is in ``pids`` or name in ``names``.

    ``names`` match the basename of NVML's process name (``ollama``), for hosts
    where NVML's pids (the host's namespace) differ from the caller's (a
    container). Processes whose memory is unknown add nothing; a GPU with no
    matching process is absent from the result.
    """
    wanted, names = set(pids), set(names)
    totals: dict[int, int] = {}
    for gpu in reading.gpus:
        for proc in gpu.processes or ():
            named = proc.name is not None and os.path.basename(proc.name) in names
            if proc.used_bytes is not None and (proc.pid in wanted or named):
                totals[gpu.index] = totals.get(gpu.index, 0) + proc.used_bytes
    return totals
