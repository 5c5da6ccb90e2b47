"""Jobs, requests and results as PROTOCOL.md defines them, their validation, error kinds.

Wire names are camelCase (``rename="camel"``); unknown fields are ignored so
producers can evolve first. ``decode`` turns a payload into a validated job or
raises ``Malformed`` (cannot be answered by id) or ``Invalid`` (can).
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta, Raw, Struct

from llm_worker.settings.config import Settings
from llm_worker.settings.sections import MODEL_NAME

# --------------------------------------------------------------------------
# Error kinds
# --------------------------------------------------------------------------


class ErrorKind(str, enum.Enum):
    VALIDATION = "validation"  # the job itself is wrong: never retried
    MODEL = "model"  # the model is missing or refused: fallbacks may help, retries do not
    TIMEOUT = "timeout"
    MEMORY = "memory"  # the provider ran out of (GPU) memory
    NETWORK = "network"  # the provider could not be reached
    PROVIDER = "provider"  # the provider failed (5xx, busy, broken stream)
    CRASHED = "crashed"  # the job was in hand of workers that died too often
    RATE_LIMIT = "rate_limit"  # the provider refused for its rate limit (429): the job waits, no attempt spent
    UNKNOWN = "unknown"  # a bug; not retried, so that it surfaces

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {ErrorKind.TIMEOUT, ErrorKind.MEMORY, ErrorKind.NETWORK, ErrorKind.PROVIDER, ErrorKind.RATE_LIMIT}
)


class JobError(Exception):
    """A failure of one job, with the kind the result reports."""

    kind: ErrorKind = ErrorKind.UNKNOWN

    def __init__(self, message: str, kind: ErrorKind | None = None, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self._retryable = retryable

    @property
    def retryable(self) -> bool:
        return self.kind.retryable if self._retryable is None else self._retryable


class RequestRejected(JobError):
    """Raise from a request filter to refuse a job; it fails with a validation error."""

    kind = ErrorKind.VALIDATION


REASON_QUOTE = 48  # characters of a producer's value that a refusal's reason quotes
_QUOTED = re.compile(r"""(['"])((?:(?!\1)[^\\]|\\.)*)\1""")  # a Python repr, either quote


def readable(reason: str) -> str:
    """A refusal's reason as a person reads it: one printable line, the producer's values shortened.

    msgspec quotes a bad value in full ("Invalid enum value '<2 MB>'"), and a
    value can hold control characters; the reason goes into dead letters,
    failure results and log lines.
    """

    def shorten(match: re.Match[str]) -> str:
        quote, value = match.group(1), match.group(2)
        return f"{quote}{value[:REASON_QUOTE]}...{quote}" if len(value) > REASON_QUOTE + 3 else match.group(0)

    reason = _QUOTED.sub(shorten, reason)
    if not reason.isprintable():
        reason = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in reason)
    return reason


class Malformed(Exception):
    """A payload that is not a job at all; it is dead-lettered raw."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        reason = readable(reason)
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id  # only when the payload names one, for its failure result


class Invalid(Exception):
    """A job with an id that fails validation; dead-lettered with its failure result."""

    def __init__(self, reason: str, job: dict[str, Any]) -> None:
        reason = readable(reason)
        super().__init__(reason)
        self.reason = reason
        self.job = job


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------

Role = Literal["system", "user", "assistant", "tool"]
Unit = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class Options(Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Ollama's sampling options. Load-time options other than num_ctx are not job's to set."""

    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Unit | None = None
    top_k: Annotated[int, Meta(ge=0, le=100_000)] | None = None
    min_p: Unit | None = None
    typical_p: Unit | None = None
    num_predict: Annotated[int, Meta(ge=-2)] | None = None
    num_ctx: Annotated[int, Meta(ge=1)] | None = None
    num_keep: Annotated[int, Meta(ge=-1)] | None = None
    stop: Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    repeat_penalty: Annotated[float, Meta(ge=0.0, le=10.0)] | None = None
    repeat_last_n: Annotated[int, Meta(ge=-1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    mirostat_eta: Unit | None = None


Format = Union[Literal["json"], dict[str, Any], None]
KeepAlive = Union[Annotated[str, Meta(pattern=r"^-?\d+(\.\d+)?(ms|s|m|h)?$")], int, float, None]


class Message(Struct, omit_defaults=True):
    role: Role
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


# Ollama's ThinkValue (api/types.go, v0.33): true/false, or a level for the models that take one (gpt-oss).
Think = Union[bool, Literal["low", "medium", "high", "max"]]


class ChatRequest(Struct, rename="camel", omit_defaults=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    options: Options | None = None
    stream: bool = False
    format: Format = None
    keep_alive: KeepAlive = None
    tools: list[dict[str, Any]] | None = None
    think: Think | None = None

    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


class GenerateRequest(Struct, rename="camel", omit_defaults=True):
    prompt: str
    system: str | None = None
    options: Options | None = None
    stream: bool = False
    format: Format = None
    keep_alive: KeepAlive = None
    images: list[str] | None = None
    think: Think | None = None

    def prompt_chars(self) -> int:
        return len(self.prompt) + len(self.system or "")


class EmbeddingsRequest(Struct, rename="camel", omit_defaults=True):
    input: Union[str, list[str], None] = None
    prompt: str | None = None  # the older single-text form
    options: Options | None = None
    keep_alive: KeepAlive = None
    truncate: bool | None = None
    stream: bool = False  # never streamed; accepted so a shared producer default does no harm

    def inputs(self) -> list[str]:
        if self.input is None:
            return [self.prompt] if self.prompt is not None else []
        return [self.input] if isinstance(self.input, str) else list(self.input)


class BatchItem(Struct, rename="camel"):
    type: Literal["chat", "generate", "embeddings"]
    request: Raw
    model: str | None = None


class BatchRequest(Struct, rename="camel"):
    requests: Annotated[list[BatchItem], Meta(min_length=1)]
    stream: bool = False


Request = Union[ChatRequest, GenerateRequest, EmbeddingsRequest, BatchRequest]
REQUEST_TYPES: dict[str, type[Struct]] = {
    "chat": ChatRequest,
    "generate": GenerateRequest,
    "embeddings": EmbeddingsRequest,
    "batch": BatchRequest,
}

# --------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------

JOB_ID = r"^[A-Za-z0-9._:-]{1,128}$"
_JOB_ID = re.compile(JOB_ID)
# Only a leading "id" is trusted when a payload is too large to decode: a nested
# "id" (a tool call's, say) must never receive another job's failure result.
_LEADING_ID = re.compile(rb'^\s*\{\s*"id"\s*:\s*"([A-Za-z0-9._:-]{1,128})"')


class Job(Struct, rename="camel", kw_only=True):
    id: Annotated[str, Meta(pattern=JOB_ID)]
    type: Literal["chat", "generate", "embeddings", "batch"]
    user_id: Annotated[str, Meta(min_length=1, max_length=256)]
    request: Raw
    model: Annotated[str, Meta(pattern=MODEL_NAME)] | None = None
    priority: Annotated[int, Meta(ge=-1_000_000, le=1_000_000)] = 0
    correlation_id: Annotated[str, Meta(max_length=256)] | None = None
    created_at: Union[datetime, Annotated[float, Meta(ge=0)], None] = None
    timeout: Annotated[int, Meta(ge=1)] | None = None
    retry_count: Annotated[int, Meta(ge=0)] = 0
    max_retries: Annotated[int, Meta(ge=0)] | None = None


@dataclass
class Task:
    """One model call: a job, or one request of a batch job.

    Request filters may change ``model`` and ``request`` (its fields or the
    whole object); the call is made with what they leave.
    """

    type: str  # chat | generate | embeddings
    model: str
    request: ChatRequest | GenerateRequest | EmbeddingsRequest
    path: str = "$.request"  # where the request sits in the job, for error messages
    model_path: str = "$.model"


@dataclass
class Answer:
    """What a job produced, before it becomes a Result; response filters may change it."""

    response: dict[
        str, Any
    ]  # chat: {"message", "doneReason"}; generate: {"response", "doneReason"}; embeddings: {"embeddings"}
    model: str  # the model that answered
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    fallback_used: bool = False
    cache_hit: bool = False
    cache_lookup: bool = False  # the response cache was asked (a hit or a miss)

    @property
    def tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    @property
    def text(self) -> str:
        """The generated text (chat or generate); empty for embeddings."""
        message = self.response.get("message")
        if isinstance(message, dict):
            return str(message.get("content", ""))
        return str(self.response.get("response", ""))


@dataclass(frozen=True)
class Decoded:
    """A job that passed validation, with what the worker derived from it."""

    job: Job
    raw: bytes
    tasks: tuple[Task, ...]  # one, or a batch's requests
    timeout: float  # seconds, capped by WORKER_TIMEOUT
    max_attempts: int  # first attempt included, capped by QUEUE_MAX_ATTEMPTS
    created: float | None  # epoch seconds, when the producer said

    @property
    def model(self) -> str:
        return self.tasks[0].model

    def prompt_text(self) -> str:
        """The prompt text of the job, for logs that LOG_PROMPTS allows (never for events)."""
        parts = []
        for task in self.tasks:
            request = task.request
            if isinstance(request, ChatRequest):
                parts += [m.content for m in request.messages]
            elif isinstance(request, GenerateRequest):
                parts += [request.system or "", request.prompt]
            else:
                parts += request.inputs()
        return "\n".join(p for p in parts if p)

    @property
    def stream(self) -> bool:
        return self.job.type in ("chat", "generate") and bool(getattr(self.tasks[0].request, "stream", False))


def decode(raw: bytes, settings: Settings) -> Decoded:
    """Validate a payload from a queue.

    Raises Malformed when it is not a job object with a usable id, Invalid when
    it is a job that breaks a rule (the reason names the field).
    """
    limits = settings.limits
    if len(raw) > limits.max_job_bytes:
        raise Malformed(
            f"payload of {len(raw)} bytes is over MAX_JOB_BYTES ({limits.max_job_bytes})",
            job_id_of(raw, limits.max_job_bytes),
        )
    try:
        # msgspec skips unknown keys without checking their UTF-8; a dead letter
        # embeds the payload as JSON, so all of it must be text.
        raw.decode()
        job = msgspec.json.decode(raw, type=Job)
    except (RecursionError, UnicodeDecodeError) as exc:
        raise Malformed(_undecodable(exc)) from None
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        loose = _loose_object(raw)
        if loose is None:
            raise Malformed(f"not a job object: {exc}") from None
        job_id = loose.get("id")
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise Malformed(f"not a job: {exc}") from None
        raise Invalid(str(exc), loose) from None
    except msgspec.DecodeError as exc:
        raise Malformed(f"not JSON: {exc}") from None
    try:
        return _validate(job, raw, settings)
    except (msgspec.ValidationError, JobError) as exc:
        raise Invalid(str(exc), _loose_object(raw) or {"id": job.id}) from None


def job_id_of(raw: bytes, max_bytes: int) -> str | None:
    """The id of a payload that may be no job at all, reading no more than MAX_JOB_BYTES allow.

    A payload over the limit is not decoded (that is what the limit is for):
    only an id that leads it counts. None when there is no usable id.
    """
    if len(raw) > max_bytes:
        match = _LEADING_ID.match(raw[:4096])
        return match.group(1).decode() if match else None
    job_id = (_loose_object(raw) or {}).get("id")
    return job_id if isinstance(job_id, str) and _JOB_ID.match(job_id) else None


def loose(raw: bytes) -> Any:
    """Any JSON, as a producer wrote it: a number is kept exactly, even one beyond a double's range.

    A job decodes as its type, which skips what it does not know; a retry or a
    dead letter rewrites the whole payload from this and ``encode``, so a field
    only a newer producer reads (say 1e400) must come back as it was sent.
    """
    return _loose(raw)


def _loose_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = loose(raw)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _undecodable(exc: RecursionError | UnicodeDecodeError) -> str:
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return f"not JSON: invalid UTF-8 at byte {exc.start}"  # RFC 8259: JSON text is UTF-8


def _validate(job: Job, raw: bytes, settings: Settings) -> Decoded:
    if job.type == "batch":
        batch = _decode_request("batch", job.request, "$.request")
        assert isinstance(batch, BatchRequest)
        tasks = tuple(
            _task(
                item.type,
                item.model or job.model,
                item.request,
                settings,
                f"$.request.requests[{i}].request",
                f"$.request.requests[{i}].model" if item.model else "$.model",
            )
            for i, item in enumerate(batch.requests)
        )
    else:
        tasks = (_task(job.type, job.model, job.request, settings, "$.request"),)
    max_timeout = settings.worker.timeout
    timeout_ms = min(job.timeout, max_timeout) if job.timeout else max_timeout
    attempts = settings.queue.max_attempts
    if job.max_retries is not None:
        attempts = min(job.max_retries + 1, attempts)
    return Decoded(job, raw, tasks, timeout_ms / 1000.0, attempts, _epoch(job.created_at))


def _decode_request(kind: str, raw: Raw, path: str) -> Request:
    try:
        return msgspec.json.decode(raw, type=REQUEST_TYPES[kind])  # type: ignore[return-value]
    except (RecursionError, UnicodeDecodeError) as exc:
        raise JobError(f"{_undecodable(exc)} - at `{path}`") from None
    except msgspec.ValidationError as exc:
        text = str(exc).replace("`$", f"`{path}", 1)
        if " - at " not in text:
            text += f" - at `{path}`"
        raise JobError(text) from None


def _task(kind: str, model: str | None, raw: Raw, settings: Settings, path: str, model_path: str = "$.model") -> Task:
    """Decode one call's request; its limits are a filter's business (plugins/limits.py)."""
    request = _decode_request(kind, raw, path)
    assert not isinstance(request, BatchRequest)
    if model is None:
        model = settings.models.default_embedding if kind == "embeddings" else settings.models.default_chat
    elif not re.match(MODEL_NAME, model):
        raise JobError(f"model name {model[:80]!r} is not valid - at `{model_path}`")
    if isinstance(request, EmbeddingsRequest) and not request.inputs():
        raise JobError(f"embeddings request has no input - at `{path}.input`")
    return Task(kind, model, request, path, model_path)


def model_allowed(model: str, allowed: list[str]) -> bool:
    """Whether ALLOWED_MODELS admits a model; an untagged name means `:latest`."""
    if not allowed:
        return True
    name = model if ":" in model.rsplit("/", 1)[-1] else model + ":latest"
    for entry in allowed:
        if entry == model or (entry if ":" in entry.rsplit("/", 1)[-1] else entry + ":latest") == name:
            return True
    return False


def _epoch(created: datetime | float | None) -> float | None:
    if created is None:
        return None
    if isinstance(created, datetime):
        if created.tzinfo is None:
            created = created.replace(tzinfo=timezone.utc)
        return created.timestamp()
    # A number is milliseconds since the epoch, as JavaScript's Date.now() gives.
    return created / 1000.0


# --------------------------------------------------------------------------
# Results and dead letters
# --------------------------------------------------------------------------


class Result(Struct, rename="camel", kw_only=True):
    job_id: str
    success: bool
    response: Any = None
    error: str | None = None
    error_type: str | None = None
    processing_time: int = 0
    queue_time: int | None = None
    model: str | None = None
    requested_model: str | None = None
    tokens_used: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    retry_count: int = 0
    fallback_used: bool = False
    cache_hit: bool = False
    worker_id: str | None = None
    correlation_id: str | None = None
    completed_at: str = ""
    started_at: str | None = None  # addition: when the worker took the job, microseconds


class DeadLetter(Struct, rename="camel", kw_only=True, omit_defaults=True):
    queue: str
    error: str
    error_type: str
    failed_at: str
    worker_id: str
    job: Raw | None = None  # the job as it was queued, when it was JSON
    raw: str | None = None  # the first 64 KiB of a payload that was not
    attempts: int | None = None


RAW_KEEP = 64 * 1024


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text: a worker asks many times a second


def iso(ts: float | None = None, *, micro: bool = False) -> str:
    """ISO 8601 in UTC with a Z, millisecond precision (microseconds on request).

    The same text as ``datetime.isoformat`` (microseconds rounded as it
    rounds them, then cut to milliseconds), at a fifth of the cost.
    """
    t = time.time() if ts is None else ts
    second = math.floor(t)
    us = round((t - second) * 1_000_000)  # as datetime.fromtimestamp rounds (half to even)
    if us == 1_000_000:
        second, us = second + 1, 0
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{us:06d}Z" if micro else f"{_second[1]}.{us // 1000:03d}Z"


_loose = msgspec.json.Decoder(float_hook=Decimal).decode
encode = msgspec.json.Encoder(decimal_format="number").encode  # loose()'s exact numbers go back as numbers
