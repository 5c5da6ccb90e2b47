"""The model catalog: what is on disk, what is loaded, and what loading costs."""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from llm_worker.simulator.config import FOREVER
from llm_worker.simulator.stats import Counters

# Options whose change makes Ollama reload a model, in LoadKey order, with Ollama's
# defaults (num_ctx's comes from the config). Leaving one out means its default.
LOAD_OPTIONS = ("num_ctx", "num_gpu", "num_batch", "num_thread", "use_mmap")
LOAD_DEFAULTS: dict[str, Any] = {"num_gpu": -1, "num_batch": 512, "num_thread": 0, "use_mmap": None}
LoadKey = tuple[Any, ...]

FOREVER_AT = "2318-01-01T00:00:00Z"  # what /api/ps shows for keep_alive < 0


def normalize_name(name: str) -> str:
    """Return the name with its tag, as Ollama stores it (`llama3.2` → `llama3.2:latest`)."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def not_found_message(name: str, style: str) -> str:
    """Return Ollama's message for a missing model, in the older or the newer wording."""
    if style == "old":
        return f'model "{name}" not found, try pulling it first'
    return f"model '{name}' not found"


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ModelInfo:
    """A model on the simulated disk; sizes and digests are made up but stable."""

    name: str
    size: int
    digest: str
    modified_at: str
    details: dict[str, Any]
    embedding: bool

    @classmethod
    def describe(cls, name: str) -> ModelInfo:
        base = name.rsplit("/", 1)[-1].split(":")[0]
        embedding = "embed" in base
        letters = re.match(r"[a-z]+", base)
        family = "nomic-bert" if embedding else (letters.group() if letters else "llama")
        details = {
            "parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "137M" if embedding else "3.2B",
            "quantization_level": "F16" if embedding else "Q4_K_M",
        }
        return cls(name=name, size=274_302_450 if embedding else 2_019_393_189,
                   digest=hashlib.sha256(name.encode()).hexdigest(),
                   modified_at=rfc3339(time.time()), details=details, embedding=embedding)

    def listing(self) -> dict[str, Any]:
        """Return the model as /api/tags lists it."""
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at,
                "size": self.size, "digest": self.digest, "details": self.details}


@dataclass
class LoadedModel:
    info: ModelInfo
    key: LoadKey
    refs: int = 0  # requests using it now; it cannot expire while they run
    keep_alive: float = FOREVER
    expires: float = FOREVER  # monotonic
    last_used: float = field(default_factory=time.monotonic)

    def running(self) -> dict[str, Any]:
        """Return the model as /api/ps lists it."""
        left = self.keep_alive if self.refs else self.expires - time.monotonic()
        expires_at = FOREVER_AT if math.isinf(left) else rfc3339(time.time() + left)
        return {**self.info.listing(), "expires_at": expires_at, "size_vram": self.info.size,
                "context_length": self.key[0]}


class ModelCatalog:
    """Available and loaded models; loads one model at a time, as Ollama's scheduler does."""

    def __init__(self, models: list[str], counters: Counters, load_seconds: Callable[[str], float],
                 sleep: Callable[[float], None], max_loaded: int = 0) -> None:
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._available = {m.name: m for m in (ModelInfo.describe(normalize_name(n)) for n in models)}
        self._loaded: dict[str, LoadedModel] = {}
        self._counters = counters
        self._load_seconds = load_seconds
        self._sleep = sleep
        self._max_loaded = max_loaded

    def find(self, name: str) -> ModelInfo | None:
        return self._available.get(name)

    def available(self) -> list[ModelInfo]:
        with self._lock:
            return list(self._available.values())

    def add(self, name: str) -> None:
        with self._lock:
            if name not in self._available:
                self._available[name] = ModelInfo.describe(name)

    def remove(self, name: str) -> bool:
        with self._lock:
            self._drop(name)
            return self._available.pop(name, None) is not None

    def acquire(self, info: ModelInfo, key: LoadKey, keep_alive: float) -> int:
        """Use a model, first loading it unless loaded with these options; return the load time in ns."""
        if self._use_loaded(info.name, key, keep_alive):
            return 0
        with self._load_lock:
            if self._use_loaded(info.name, key, keep_alive):
                return 0
            started = time.perf_counter_ns()
            self._sleep(self._load_seconds(info.name))
            with self._lock:
                old = self._loaded.get(info.name)
                self._drop(info.name)  # a reload is an unload, then a load
                self._evict_for(info.name)
                # Requests still running on a replaced instance release into the new one.
                refs = (old.refs if old else 0) + 1
                self._loaded[info.name] = LoadedModel(info, key, refs=refs, keep_alive=keep_alive)
            self._counters.event(self._counters.loads, info.name)
            return max(1, time.perf_counter_ns() - started)

    def _use_loaded(self, name: str, key: LoadKey, keep_alive: float) -> bool:
        with self._lock:
            self._expire()
            loaded = self._loaded.get(name)
            if loaded is None or loaded.key != key:
                return False
            loaded.refs += 1
            loaded.keep_alive = keep_alive
            return True

    def release(self, name: str, keep_alive: float) -> None:
        """Stop using a model; once idle it stays loaded for keep_alive seconds."""
        with self._lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                return
            now = time.monotonic()
            loaded.refs = max(0, loaded.refs - 1)
            loaded.keep_alive, loaded.expires, loaded.last_used = keep_alive, now + keep_alive, now
            if keep_alive == 0 and loaded.refs == 0:
                self._drop(name)

    def unload(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def running(self) -> list[LoadedModel]:
        with self._lock:
            self._expire()
            return list(self._loaded.values())

    def reset(self) -> None:
        with self._lock:
            self._loaded.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for name in [n for n, m in self._loaded.items() if m.refs == 0 and m.expires <= now]:
            self._drop(name)

    def _evict_for(self, name: str) -> None:
        while self._max_loaded and len(self._loaded) >= self._max_loaded:
            idle = [m for m in self._loaded.values() if m.refs == 0]
            if not idle:
                return  # Ollama would wait for one to go idle; the simulator overcommits instead
            self._drop(min(idle, key=lambda m: m.last_used).info.name)

    def _drop(self, name: str) -> None:
        if self._loaded.pop(name, None) is not None:
            self._counters.event(self._counters.unloads, name)
