"""Which loaded models the model manager unloads, and why: pure choices over what it has seen.

Kept apart from the process that acts on them (models.py), so that every rule
can be read, and tested, without Ollama or shared memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from llm_worker.host.layout import Readings

# Why a model was unloaded: the ``reason`` of llm.model.unloaded.
IDLE = "idle"
CACHE_SIZE = "cache size"
MEMORY = "memory"


@dataclass(frozen=True)
class Loaded:
    """A model Ollama has in memory, as the manager sees it."""

    name: str  # as Ollama lists it (llama3.2:latest)
    label: str  # as metrics and events name it (llama3.2)
    bytes: int  # the memory it holds: its VRAM, or its whole size without a GPU
    last_used: float  # monotonic: the last job on it, or when it was first seen loaded
    busy: bool  # a worker holds a job on it
    protected: bool  # preloaded less than MODEL_UNLOAD_TIMEOUT ago


def evictable(models: list[Loaded]) -> list[Loaded]:
    """Models that may go, least recently used first: none a worker is busy with, none just preloaded."""
    return sorted((m for m in models if not m.busy and not m.protected), key=lambda m: m.last_used)


def idle(models: list[Loaded], now: float, unload_after: float) -> list[Loaded]:
    """Models no job has used for ``unload_after`` seconds (0: never unload for idleness)."""
    if unload_after <= 0:
        return []
    return [m for m in evictable(models) if now - m.last_used >= unload_after]


def over_cache(models: list[Loaded], cache_size: int) -> list[Loaded]:
    """The least recently used idle models past MODEL_CACHE_SIZE."""
    excess = len(models) - cache_size
    return evictable(models)[:excess] if excess > 0 else []


MODELS_PER_GPU = 3  # Ollama's default OLLAMA_MAX_LOADED_MODELS per GPU (server/sched.go defaultModelsPerGPU, v0.33)


def cache_size(setting: int, readings: Readings, endpoints: int = 1) -> int:
    """MODEL_CACHE_SIZE, or Ollama's own default: 3 models per GPU as NVML counts them, 3 without one.

    Per endpoint: with several Ollama servers on the host, each is taken to
    see its share of the GPUs (one per GPU: 3 each), never less than one GPU's.
    """
    if setting:
        return setting
    gpus = readings.gpu_count if readings.gpu_collector_up else 1
    return MODELS_PER_GPU * max(1, gpus // max(1, endpoints))


@dataclass(frozen=True)
class Memory:
    """Memory in use where the models live: the GPUs summed, or the host without GPU readings."""

    used: float
    total: float
    source: str  # "gpu" | "host"

    @property
    def ratio(self) -> float:
        return self.used / self.total

    def without(self, freed: float) -> Memory:
        return Memory(max(0.0, self.used - freed), self.total, self.source)


def endpoint_share(memory: Memory, own: float, everyone: float, endpoints: int) -> Memory:
    """One endpoint's part of ``memory``, when the host runs ``endpoints`` Ollama servers (one per GPU).

    Which GPU a server uses is not known here, so each is taken to have an
    equal share of the memory, and of what is used there by other than the
    models: its own models' bytes (``own``, of ``everyone``'s) plus that
    share. With one endpoint it is ``memory`` itself.
    """
    if endpoints <= 1:
        return memory
    others = max(0.0, memory.used - everyone)
    return Memory(own + others / endpoints, memory.total / endpoints, memory.source)


def memory_in_use(readings: Readings, host: Callable[[], Any] = psutil.virtual_memory) -> Memory | None:
    """GPU memory as the sampler last read it, when it can; else the host's, read now."""
    if readings.gpu_collector_up:
        rows = readings.gpus[: readings.gpu_count]
        used = sum(r.memory_used_bytes for r in rows if not math.isnan(r.memory_used_bytes))
        total = sum(r.memory_total_bytes for r in rows if not math.isnan(r.memory_total_bytes))
        if total > 0:
            return Memory(used, total, "gpu")
    try:
        vm = host()
    except (OSError, RuntimeError):
        return None
    return Memory(float(vm.total - vm.available), float(vm.total), "host") if vm.total else None
