"""Ollama's request bodies as the simulator reads them, the replies it writes, and each API's dialect.

Request structs list only the fields the simulator acts on; others are
ignored, as Ollama ignores what it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message as Headers
from typing import Any

import msgspec
from msgspec import Struct

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"

ENCODER = msgspec.json.Encoder()
KeepAlive = float | str | None  # seconds, or a Go duration such as "5m"; < 0: forever
THINK_LEVELS = ("high", "medium", "low", "max")  # api/types.go ThinkValue
THINK_CHOICES = '"high", "medium", "low", "max", true, or false'


class Options(Struct, kw_only=True):
    """The options the simulator acts on, read from a request by ``from_map``."""

    num_predict: int | None = None
    num_ctx: int | None = None
    num_gpu: int | None = None
    num_batch: int | None = None
    num_thread: int | None = None
    use_mmap: bool | None = None
    main_gpu: int | None = None
    draft_num_predict: int | None = None
    seed: int | None = None
    temperature: float | None = None


NO_OPTIONS = Options()

# Every option Ollama knows (api.Options and api.Runner in api/types.go, v0.33) and the Go
# kind of its field, which decides what JSON value Options.FromMap accepts. Others are ignored.
OPTION_KINDS = {
    "num_ctx": "int",
    "num_batch": "int",
    "num_gpu": "int",
    "main_gpu": "int",
    "use_mmap": "bool",
    "num_thread": "int",
    "draft_num_predict": "int",
    "num_keep": "int",
    "seed": "int",
    "num_predict": "int",
    "top_k": "int",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "repeat_last_n": "int",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "array",
}
_KEPT = frozenset(Options.__struct_fields__)


class OptionError(ValueError):
    """An option of the wrong type, in Options.FromMap's words."""


def from_map(raw: dict[str, Any] | None) -> Options:
    """Read a request's options as Ollama's Options.FromMap does; raise OptionError as it errs.

    Numbers go into integer options truncated (JSON numbers are float64 in Go);
    a boolean or a string is refused; unknown options and nulls are ignored.
    """
    if not raw:
        return NO_OPTIONS
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        kind = OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        converted = _convert(key, kind, value)
        if key in _KEPT:
            kept[key] = converted
    return Options(**kept)


def _convert(key: str, kind: str, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        if not number:
            raise OptionError(f'option "{key}" must be of type integer')
        return int(value)
    if kind == "float32":
        if not number:
            raise OptionError(f'option "{key}" must be of type float32')
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise OptionError(f'option "{key}" must be of type boolean')
        return value
    if not isinstance(value, list):
        raise OptionError(f'option "{key}" must be of type array')
    if not all(isinstance(item, str) for item in value):
        raise OptionError(f'option "{key}" must be of an array of strings')
    return value


class Message(Struct, kw_only=True):
    role: str = "user"
    content: str | None = None


class _Thinking(Struct, kw_only=True):
    """``think`` as api.ThinkValue reads it: true, false, or a level; checked while the body is read."""

    think: Any = None

    def __post_init__(self) -> None:
        if self.think is None or isinstance(self.think, bool):
            return
        if not isinstance(self.think, str):
            raise ValueError(f"think must be a boolean or string ({THINK_CHOICES})")
        if self.think not in THINK_LEVELS:
            raise ValueError(f'invalid think value: "{self.think}" (must be {THINK_CHOICES})')


class ChatRequest(_Thinking, kw_only=True):
    model: str = ""
    messages: list[Message] = []
    stream: bool = True
    options: dict[str, Any] | None = None  # read by from_map when the model is scheduled, as Ollama does
    keep_alive: KeepAlive = None


class GenerateRequest(_Thinking, kw_only=True):
    model: str = ""
    prompt: str = ""
    system: str = ""
    stream: bool = True
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbedRequest(Struct, kw_only=True):
    model: str = ""
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(Struct, kw_only=True):
    model: str = ""
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: KeepAlive = None


class ModelRequest(Struct, kw_only=True):
    """The body of /api/show, /api/pull and /api/delete; `name` is the older spelling of `model`."""

    model: str = ""
    name: str = ""
    stream: bool = True

    def __post_init__(self) -> None:
        self.model = self.model or self.name


class Reply:
    """A whole response, sent with Content-Length (and no Content-Type when ``content_type`` is empty).

    ``headers`` are further header lines, each ending in CRLF (``b"request-id: req_1\\r\\n"``).
    """

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON, headers: bytes = b"") -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


class StreamReply:
    """A 200 stream, sent chunked, one chunk per item of ``lines`` as it comes (its API says the type)."""

    __slots__ = ("lines", "on_close", "headers")

    def __init__(
        self, lines: Iterator[bytes], on_close: Callable[[], None] | None = None, headers: bytes = b""
    ) -> None:
        self.lines = lines
        self.on_close = on_close
        self.headers = headers  # as Reply's

    def close(self) -> None:
        """Stop the producer and release what it holds; safe to call more than once."""
        close = getattr(self.lines, "close", None)
        if close is not None:
            close()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class ApiError(Exception):
    """A refused request: its status and message, shaped by the route's dialect (Ollama: ``{"error": message}``).

    ``headers`` go out with the answer, after the dialect's own (a fault's ``Retry-After``).
    """

    def __init__(self, status: int, message: str, headers: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, ENCODER.encode(obj))


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, ENCODER.encode({"error": message}))


def line(obj: Any) -> bytes:
    """Return one NDJSON line."""
    return ENCODER.encode(obj) + b"\n"


@dataclass(frozen=True)
class Dialect:
    """What an API shapes alike on every route of it: error answers, streams, who may call, its error texts."""

    error: Callable[[int, str], Reply]  # the answer to a failed request: (status, message)
    stream_type: bytes  # Content-Type of its streams
    stream_error: Callable[[int, str], bytes]  # the line a stream_error fault sends mid-stream: (status, message)
    authorize: Callable[[Headers, str], None] | None = None  # (request headers, api_key): raise ApiError
    messages: Mapping[str, str] = field(default_factory=dict)  # a fault reason's text in this API's words ({model})


OLLAMA = Dialect(error=error_reply, stream_type=NDJSON, stream_error=lambda status, message: line({"error": message}))
