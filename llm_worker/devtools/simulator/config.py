"""The simulator's settings and its fault description, both msgspec Structs."""

from __future__ import annotations

import math
import re
from typing import Literal

import msgspec
from msgspec import Struct, field

from llm_worker.devtools.simulator.versions import parse_version

FaultKind = Literal["status", "stream_error", "cut", "hang", "abort"]
Reason = Literal[
    "oom", "runner", "crash", "run_oom", "busy", "bad_request", "not_found", "internal", "rate_limit", "overloaded"
]

# Endpoints a fault may name; a fault that names none hits the inference ones, of every API.
INFERENCE_ENDPOINTS = (
    "chat",
    "generate",
    "embed",
    "embeddings",
    "openai_chat",
    "openai_embeddings",
    "anthropic_messages",
    "openrouter_chat",
)
ABORT_ENDPOINTS = ("chat", "generate")  # where an answer can end without its done line
# "load": a chat, generate or embed request with nothing to answer, which only loads (or unloads) its model,
# as llm-worker's model manager sends. Faults hit it only when they name it, so that a fault meant for the
# jobs' calls does not keep the host from loading the model they need.
ENDPOINTS = INFERENCE_ENDPOINTS + (
    "load",
    "pull",
    "show",
    "delete",
    "tags",
    "ps",
    "version",
    "root",
    "openai_models",
    "anthropic_models",
    "openrouter_models",
)

DEFAULT_MODELS = ("llama3.2:latest", "nomic-embed-text:latest")
MODELS_PER_GPU = 3  # server/sched.go defaultModelsPerGPU: OLLAMA_MAX_LOADED_MODELS when unset

FOREVER = math.inf
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Fault(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One misbehaviour, matched against each request in turn (see the package docstring)."""

    kind: FaultKind = "status"
    status: int | None = None  # kind=status: HTTP status; default from `reason` and the endpoint, else 500
    reason: Reason | None = None  # which message to send (in ollama_version's words); default from `status`
    message: str | None = None  # the error text itself, instead of the reason's
    model: str | None = None  # only requests for this model (`x` and `x:latest` alike)
    endpoints: tuple[str, ...] = ()  # only these endpoints; empty: INFERENCE_ENDPOINTS (abort: ABORT_ENDPOINTS)
    count: int | None = None  # fire this many times, then retire; None: forever
    probability: float = 1.0  # chance that a matching request is hit
    after_chunks: int = 0  # stream_error, cut, abort: lines sent before the fault
    seconds: float | None = None  # hang: answer normally after this long; None: never
    retry_after: float | str | None = None  # status: a Retry-After header, seconds (a text, an HTTP-date, goes as is)

    def __post_init__(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"status must be 100..599, not {self.status}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be 0..1, not {self.probability}")
        if (self.count is not None and self.count < 0) or self.after_chunks < 0:
            raise ValueError("count and after_chunks must not be negative")
        if self.seconds is not None and self.seconds < 0:
            raise ValueError("seconds must not be negative")
        if isinstance(self.retry_after, (int, float)) and self.retry_after < 0:
            raise ValueError("retry_after must not be negative")
        if isinstance(self.retry_after, str) and any(c in self.retry_after for c in "\r\n"):
            raise ValueError("retry_after must be one line")
        unknown = set(self.endpoints) - set(ENDPOINTS)
        if unknown:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; known: {', '.join(ENDPOINTS)}")
        if self.kind == "abort" and set(self.endpoints) - set(ABORT_ENDPOINTS):
            raise ValueError(f"an abort fault hits {' and '.join(ABORT_ENDPOINTS)} only")

    def hits(self) -> tuple[str, ...]:
        """Return the endpoints this fault is matched against."""
        return self.endpoints or (ABORT_ENDPOINTS if self.kind == "abort" else INFERENCE_ENDPOINTS)


class FaultList(Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of ``POST /_sim/faults`` and of ``GET /_sim/faults``."""

    faults: list[Fault] = []


class SimulatorConfig(Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the simulator can be told at start; times are in milliseconds."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, read it back from Simulator.url
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    registry: list[str] | None = None  # pullable models; None: any without "missing" in its name
    dims: int = 16  # embedding dimension
    reply_tokens: int = 12  # tokens of a reply that num_predict does not cut short
    num_ctx: int = 4096  # context length a model loads with when a request names none
    keep_alive: str = "5m"  # how long an idle model stays loaded (Go duration; negative: forever)
    latency_ms: float = 0.0  # chat/generate: before the first byte
    token_ms: float = 0.0  # chat/generate: per token
    embed_call_ms: float = 0.0
    embed_input_ms: float = 0.0
    load_ms: float = 0.0  # loading a model that is not loaded
    model_load_ms: dict[str, float] = {}  # per-model load time, over load_ms
    pull_ms: float = 0.0  # a whole pull
    num_parallel: int = 1  # requests each loaded model serves at once (OLLAMA_NUM_PARALLEL); embedding models: 1
    slots: int | None = None  # the older name of num_parallel; when set, it wins
    max_queue: int = 512  # requests that may wait for the scheduler (to load) before 503 (OLLAMA_MAX_QUEUE)
    max_loaded: int = 0  # models loaded at once (OLLAMA_MAX_LOADED_MODELS); 0: Ollama's 3 per GPU
    gpus: int = 1  # GPUs of the simulated host, for max_loaded 0 (0: CPU only, which also gets 3)
    ollama_version: str = "0.33.0"  # whose wording and statuses to imitate where versions differ (versions.py)
    not_found_style: Literal["old", "new"] | None = None  # force one missing-model text; None: per version
    faults: list[Fault] = []
    seed: int = 0  # of the dice that probabilistic faults roll
    api_key: str = ""  # set: /v1 requests need `Authorization: Bearer <api_key>` (Ollama's own API never does)

    def __post_init__(self) -> None:
        if self.slots is not None:
            self.num_parallel = self.slots
        if self.num_parallel < 1 or self.max_queue < 0 or self.max_loaded < 0 or self.gpus < 0:
            raise ValueError("num_parallel (slots) must be >= 1; max_queue, max_loaded and gpus >= 0")
        if self.dims < 1 or self.reply_tokens < 0 or self.num_ctx < 1:
            raise ValueError("dims and num_ctx must be >= 1; reply_tokens >= 0")
        times = (
            self.latency_ms,
            self.token_ms,
            self.embed_call_ms,
            self.embed_input_ms,
            self.load_ms,
            self.pull_ms,
            *self.model_load_ms.values(),
        )
        if min(times) < 0:
            raise ValueError("latencies and load times must not be negative")
        if self.not_found_style not in ("old", "new", None):
            raise ValueError("not_found_style must be 'old' or 'new'")
        parse_version(self.ollama_version)
        parse_duration(self.keep_alive, 0.0)

    @property
    def loaded_limit(self) -> int:
        """Return how many models may stay loaded: max_loaded, else Ollama's default for the GPUs."""
        return self.max_loaded or MODELS_PER_GPU * max(self.gpus, 1)


def parse_duration(value: float | str | None, default: float) -> float:
    """Return a keep_alive in seconds as Ollama reads it: numbers are seconds, < 0 is forever."""
    if value is None:
        return default
    if isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = _go_duration(value.strip())
    else:
        seconds = float(value)
    return FOREVER if seconds < 0 else seconds


def parse_keep_alive(value: float | str) -> float:
    """Return a request's keep_alive in seconds as api.Duration reads it; raise ValueError with Go's words.

    A number is seconds; a string is a Go duration only (time.ParseDuration:
    "300" has no unit, "0" is the one exception); negative is forever.
    """
    if isinstance(value, str):
        if value == "0":
            return 0.0
        if _NUMBER.fullmatch(value):
            raise ValueError(f'time: missing unit in duration "{value}"')
        seconds = _go_duration(value)
    else:
        seconds = float(value)
    return FOREVER if seconds < 0 else seconds


def _go_duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    total, end = 0.0, 0
    for match in _GO_DURATION.finditer(body):
        if match.start() != end:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        end = match.end()
    if not body or end != len(body):
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * total


def parse_fault(spec: str) -> Fault:
    """Read a fault from JSON or from ``key=value,...`` (endpoints joined with ``+``)."""
    spec = spec.strip()
    if spec.startswith("{"):
        return msgspec.json.decode(spec, type=Fault)
    fields: dict[str, object] = {}
    for pair in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"fault item {pair!r} is not key=value")
        key = key.strip()
        fields[key] = tuple(value.split("+")) if key == "endpoints" else value.strip()
    return msgspec.convert(fields, Fault, strict=False)
