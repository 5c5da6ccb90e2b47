"""A fake NVML binding with pynvml's names and return shapes, driven by a scenario.

This machine has no GPU, so tests point ``GpuSampler(module_name=...)`` at this
module. A test sets the scenario with ``configure(...)``; another process gets
it from the environment variable ``FAKE_NVML_SCENARIO`` (the same keyword
arguments as JSON), read at import; or from the JSON file that
``FAKE_NVML_SCENARIO_FILE`` names, read again whenever it changes, so that a
test can change a running service's GPUs (its memory in use, say). ``calls`` logs every NVML function called
in this process, by name.

Scenario keys:
- ``gpus``: a list of ``gpu(...)`` dicts (see there); ``[]`` is a host without GPUs.
- ``fail_init``: None, or the error nvmlInit raises: ``"driver_not_loaded"``,
  ``"library_not_found"``, ``"no_permission"``, ``"unknown"``.
- ``unsupported``: readings every GPU raises NVMLError_NotSupported for:
  ``uuid name utilization memory temperature power energy processes``.
- ``driver_version``: what nvmlSystemGetDriverVersion returns.
- ``bytes_strings``: return bytes instead of str, as pynvml did before 11.5.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, TypeVar

# --------------------------------------------------------------------------
# Constants and the error hierarchy, as pynvml defines them
# --------------------------------------------------------------------------

NVML_TEMPERATURE_GPU = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_VALUE_NOT_AVAILABLE = (1 << 64) - 1  # pynvml: NVML_VALUE_NOT_AVAILABLE_ulonglong.value
NVML_VALUE_NOT_AVAILABLE_ulonglong = SimpleNamespace(value=NVML_VALUE_NOT_AVAILABLE)

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """pynvml's base error: ``NVMLError(code)`` builds the subclass for that code."""

    code = NVML_ERROR_UNKNOWN
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:
        if cls is NVMLError and value is not None:
            cls = _BY_VALUE.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = cls.code if value is None else value
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__(self.value)

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    klass = type(name, (NVMLError,), {"code": code})
    _BY_VALUE[code] = klass
    return klass


_BY_VALUE: dict[int, type[NVMLError]] = {}
NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

_FAILURES = {
    "driver_not_loaded": NVML_ERROR_DRIVER_NOT_LOADED,
    "library_not_found": NVML_ERROR_LIBRARY_NOT_FOUND,
    "no_permission": NVML_ERROR_NO_PERMISSION,
    "not_supported": NVML_ERROR_NOT_SUPPORTED,
    "unknown": NVML_ERROR_UNKNOWN,
}

# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------

T = TypeVar("T")
GiB = 1 << 30
calls: list[str] = []
_scenario: dict[str, Any] = {}
_initialised = 0  # nvmlInit's reference count, as the real library keeps it


def gpu(index: int = 0, **overrides: Any) -> dict[str, Any]:
    """A healthy GPU: NVML's raw units (percent, bytes, milliwatts, millijoules).

    ``processes`` are ``{"pid", "name", "used"}`` dicts; ``used`` may be None or
    ``NVML_VALUE_NOT_AVAILABLE``. ``unsupported`` lists readings this GPU does
    not support; ``errors`` maps a reading to the failure it raises instead.
    """
    spec: dict[str, Any] = {
        "uuid": f"GPU-0000000{index}-fake-4000-8000-00000000000{index}",
        "name": "NVIDIA Fake A100 80GB",
        "utilization": 50,
        "memory_used": 10 * GiB,
        "memory_total": 80 * GiB,
        "temperature": 60,
        "power_mw": 250_000,
        "energy_mj": 1_000_000_000,
        "processes": [],
        "unsupported": [],
        "errors": {},
    }
    spec.update(overrides)
    return spec


def configure(
    gpus: list[dict[str, Any]] | None = None,
    fail_init: str | None = None,
    unsupported: list[str] | set[str] | tuple[str, ...] = (),
    driver_version: str = "550.54.15",
    bytes_strings: bool = False,
) -> None:
    """Set the scenario for this process, clear the call log and reset initialisation."""
    global _initialised
    _scenario.clear()
    _scenario.update(
        gpus=[gpu(i) for i in range(2)] if gpus is None else gpus,
        fail_init=fail_init,
        unsupported=set(unsupported),
        driver_version=driver_version,
        bytes_strings=bytes_strings,
    )
    calls.clear()
    _initialised = 0


def _enter(name: str) -> None:
    _follow_file()
    calls.append(name)
    if name not in ("nvmlInit", "nvmlShutdown") and _initialised <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _read(handle: _Handle, reading: str, value: T) -> T:
    spec = _scenario["gpus"][handle.index]
    if reading in spec["errors"]:
        raise NVMLError(_FAILURES.get(spec["errors"][reading], NVML_ERROR_UNKNOWN))
    if reading in spec["unsupported"] or reading in _scenario["unsupported"]:
        raise NVMLError_NotSupported()
    return value


def _string(text: str) -> str | bytes:
    return text.encode() if _scenario["bytes_strings"] else text


class _Handle:
    """Stands for pynvml's ``c_nvmlDevice_t`` pointer."""

    def __init__(self, index: int) -> None:
        self.index = index


# --------------------------------------------------------------------------
# The NVML functions the sampler calls
# --------------------------------------------------------------------------


def nvmlInit() -> None:
    global _initialised
    _enter("nvmlInit")
    if _scenario["fail_init"]:
        raise NVMLError(_FAILURES.get(_scenario["fail_init"], NVML_ERROR_UNKNOWN))
    _initialised += 1


def nvmlShutdown() -> None:
    global _initialised
    _enter("nvmlShutdown")
    if _initialised <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _initialised -= 1


def nvmlSystemGetDriverVersion() -> str | bytes:
    _enter("nvmlSystemGetDriverVersion")
    return _string(_scenario["driver_version"])


def nvmlSystemGetProcessName(pid: int) -> str | bytes:
    _enter("nvmlSystemGetProcessName")
    for spec in _scenario["gpus"]:
        for proc in spec["processes"]:
            if proc["pid"] == pid and proc.get("name") is not None:
                return _string(proc["name"])
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetCount() -> int:
    _enter("nvmlDeviceGetCount")
    return len(_scenario["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    _enter("nvmlDeviceGetHandleByIndex")
    if not 0 <= index < len(_scenario["gpus"]):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(index)


def nvmlDeviceGetUUID(handle: _Handle) -> str | bytes:
    _enter("nvmlDeviceGetUUID")
    return _string(_read(handle, "uuid", _scenario["gpus"][handle.index]["uuid"]))


def nvmlDeviceGetName(handle: _Handle) -> str | bytes:
    _enter("nvmlDeviceGetName")
    return _string(_read(handle, "name", _scenario["gpus"][handle.index]["name"]))


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> SimpleNamespace:
    _enter("nvmlDeviceGetUtilizationRates")
    spec = _scenario["gpus"][handle.index]
    return _read(handle, "utilization", SimpleNamespace(gpu=spec["utilization"], memory=spec["utilization"] // 2))


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> SimpleNamespace:
    _enter("nvmlDeviceGetMemoryInfo")
    spec = _scenario["gpus"][handle.index]
    used, total = spec["memory_used"], spec["memory_total"]
    return _read(handle, "memory", SimpleNamespace(total=total, free=total - used, used=used))


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    _enter("nvmlDeviceGetTemperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _read(handle, "temperature", int(_scenario["gpus"][handle.index]["temperature"]))


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    _enter("nvmlDeviceGetPowerUsage")
    return _read(handle, "power", int(_scenario["gpus"][handle.index]["power_mw"]))


def nvmlDeviceGetTotalEnergyConsumption(handle: _Handle) -> int:
    _enter("nvmlDeviceGetTotalEnergyConsumption")
    return _read(handle, "energy", int(_scenario["gpus"][handle.index]["energy_mj"]))


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    _enter("nvmlDeviceGetComputeRunningProcesses")
    procs = [
        SimpleNamespace(
            pid=p["pid"], usedGpuMemory=p.get("used"), gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF
        )
        for p in _scenario["gpus"][handle.index]["processes"]
    ]
    return _read(handle, "processes", procs)


_file_seen: float | None = None


def _follow_file() -> None:
    """Take the GPUs of FAKE_NVML_SCENARIO_FILE's scenario whenever the file changes."""
    global _file_seen
    path = os.environ.get("FAKE_NVML_SCENARIO_FILE")
    if not path:
        return
    try:
        changed = os.stat(path).st_mtime_ns
        if changed == _file_seen:
            return
        with open(path) as fh:
            scenario = json.load(fh)
    except (OSError, ValueError):
        return  # being rewritten: the next call reads it
    _file_seen = changed
    _scenario["gpus"] = scenario.get("gpus", _scenario["gpus"])


if os.environ.get("FAKE_NVML_SCENARIO"):
    configure(**json.loads(os.environ["FAKE_NVML_SCENARIO"]))
else:
    configure()
