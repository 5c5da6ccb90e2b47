"""The models on the simulated disk: names, made-up details, and what each can do.

What a model can do follows from its name, standing in for what Ollama reads
from the model's files (server/images.go Model.Capabilities, v0.33): a name
with "embed" is an embedding model (Ollama: the GGUF has a pooling type) and
has the capability "embedding"; any other has "completion", and "thinking" too
when its name starts with one of THINKING (Ollama: a chat template with
``<think>``/``</think>``, a built-in parser that thinks, or the gpt-oss family).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

# Options whose change makes Ollama reload a model (api.Runner in api/types.go, v0.33), in
# LoadKey order, with Ollama's defaults (num_ctx's comes from the config). Leaving one out
# means its default; draft_num_predict is 0 for a model without a draft model unless set
# (server/routes.go modelOptionsWithEmbeddingBatchDefault).
LOAD_OPTIONS = ("num_ctx", "num_gpu", "num_batch", "num_thread", "use_mmap", "main_gpu", "draft_num_predict")
LOAD_DEFAULTS: dict[str, Any] = {
    "num_gpu": -1,
    "num_batch": 512,
    "num_thread": 0,
    "use_mmap": None,
    "main_gpu": None,
    "draft_num_predict": 0,
}
_NUM_GPU = LOAD_OPTIONS.index("num_gpu")
LoadKey = tuple[Any, ...]

THINKING = ("qwen3", "deepseek-r1", "gpt-oss", "qwq", "magistral")
EMBEDDING_NAMES = ("embed", "minilm", "bge")  # names of embedding models (nomic-embed-text, all-minilm, bge-m3)
# Name prefixes whose GGUF architecture differs from the name's letters, for the families
# Ollama treats apart: one slot only (server/sched.go load), or thinking always (gpt-oss).
_FAMILIES = (
    ("qwen3-vl", "qwen3vl"),
    ("qwen3-next", "qwen3next"),
    ("qwen3.5", "qwen35"),
    ("lfm2", "lfm2"),
    ("nemotron-h", "nemotron_h"),
    ("llama3.2-vision", "mllama"),
    ("gpt-oss", "gptoss"),
    ("qwen3", "qwen3"),
    ("qwen2", "qwen2"),
)
# server/sched.go load: "Some architectures are not safe with num_parallel > 1" (issue 4165).
ONE_SLOT_FAMILIES = frozenset(
    {
        "mllama",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "nemotron_h_omni",
    }
)


def normalize_name(name: str) -> str:
    """Return the name with its tag, as Ollama stores it (`llama3.2` → `llama3.2:latest`)."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def not_found_message(name: str, wording: str) -> str:
    """Return Ollama's message for a missing model, in the older or the newer wording (see versions.py)."""
    if wording == "old":
        return f'model "{name}" not found, try pulling it first'  # handleScheduleError, %q
    return f"model '{name}' not found"


def needs_reload(loaded: LoadKey, wanted: LoadKey) -> bool:
    """Return whether a request's load options differ from the loaded instance's (sched.go needsReload).

    A request whose num_gpu is negative (Ollama's "decide for me", also its
    default) never reloads for num_gpu, whatever the instance was loaded with.
    """
    if wanted[_NUM_GPU] is not None and wanted[_NUM_GPU] < 0:
        loaded = loaded[:_NUM_GPU] + (-1,) + loaded[_NUM_GPU + 1 :]
        wanted = wanted[:_NUM_GPU] + (-1,) + wanted[_NUM_GPU + 1 :]
    return loaded != wanted


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _family(base: str, embedding: bool) -> str:
    if embedding:
        return "nomic-bert"
    for prefix, family in _FAMILIES:
        if base.startswith(prefix):
            return family
    letters = re.match(r"[a-z]+", base)
    return letters.group() if letters else "llama"


@dataclass(frozen=True)
class ModelInfo:
    """A model on the simulated disk; sizes and digests are made up but stable."""

    name: str
    size: int
    digest: str
    modified_at: str
    details: dict[str, Any]
    embedding: bool
    thinking: bool = False

    @classmethod
    def describe(cls, name: str) -> ModelInfo:
        base = name.rsplit("/", 1)[-1].split(":")[0]
        # Embedding models by their usual names (nomic-embed-text, mxbai-embed-large, all-minilm, bge-m3):
        # the real Ollama reads the capability from the model file, the simulator from its name.
        embedding = any(sign in base for sign in EMBEDDING_NAMES)
        family = _family(base, embedding)
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "137M" if embedding else "3.2B",
            "quantization_level": "F16" if embedding else "Q4_K_M",
        }
        return cls(
            name=name,
            size=274_302_450 if embedding else 2_019_393_189,
            digest=hashlib.sha256(name.encode()).hexdigest(),
            modified_at=rfc3339(time.time()),
            details=details,
            embedding=embedding,
            thinking=not embedding and base.startswith(THINKING),
        )

    @property
    def family(self) -> str:
        return str(self.details["family"])

    @property
    def blob_path(self) -> str:
        """Where Ollama would keep the weights: the eviction order breaks ties on this path."""
        return f"blobs/sha256-{self.digest}"

    def capabilities(self) -> list[str]:
        """Return what /api/show lists, in Ollama's order: completion or embedding, then thinking."""
        if self.embedding:
            return ["embedding"]
        return ["completion", "thinking"] if self.thinking else ["completion"]

    def parallel(self, num_parallel: int) -> int:
        """Return the slots Ollama gives this model: 1 for embedding models and a few families (sched.go load)."""
        return 1 if self.embedding or self.family in ONE_SLOT_FAMILIES else num_parallel

    def listing(self) -> dict[str, Any]:
        """Return the model as /api/tags lists it."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


class ModelCatalog:
    """The models on disk: what /api/tags lists, /api/pull adds and /api/delete removes."""

    def __init__(self, models: list[str]) -> None:
        self._lock = threading.Lock()
        self._available = {m.name: m for m in (ModelInfo.describe(normalize_name(n)) for n in models)}

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
        """Forget a model; a loaded instance stays until it expires (Ollama's DeleteHandler leaves the scheduler be)."""
        with self._lock:
            return self._available.pop(name, None) is not None
