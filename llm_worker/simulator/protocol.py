"""Ollama's request bodies as the simulator reads them, the replies it writes, and each API's dialect.

Request structs list only the fields the simulator acts on; others are
ignored, as Ollama ignores what it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import Struct

JSON = b"application/json; charset=utf-8"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
TEXT = b"text/plain; charset=utf-8"

ENCODER = msgspec.json.Encoder()
KeepAlive = float | str | None  # seconds, or a Go duration such as "5m"; < 0: forever


class Options(Struct, kw_only=True):
    num_predict: int | None = None
    num_ctx: int | None = None
    num_gpu: int | None = None
    num_batch: int | None = None
    num_thread: int | None = None
    use_mmap: bool | None = None
    seed: int | None = None
    temperature: float | None = None


NO_OPTIONS = Options()


class Message(Struct, kw_only=True):
    role: str = "user"
    content: str | None = None


class ChatRequest(Struct, kw_only=True):
    model: str = ""
    messages: list[Message] = []
    stream: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None


class GenerateRequest(Struct, kw_only=True):
    model: str = ""
    prompt: str = ""
    system: str = ""
    stream: bool = True
    options: Options | None = None
    keep_alive: KeepAlive = None


class EmbedRequest(Struct, kw_only=True):
    model: str = ""
    input: str | list[str] | None = None
    truncate: bool = True
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None


class EmbeddingsRequest(Struct, kw_only=True):
    model: str = ""
    prompt: str = ""
    options: Options | None = None
    keep_alive: KeepAlive = None


class ModelRequest(Struct, kw_only=True):
    """The body of /api/show, /api/pull and /api/delete; `name` is the older spelling of `model`."""

    model: str = ""
    name: str = ""
    stream: bool = True

    def __post_init__(self) -> None:
        self.model = self.model or self.name


class Reply:
    """A whole response, sent with Content-Length."""

    __slots__ = ("status", "body", "content_type")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type


class StreamReply:
    """A 200 stream, sent chunked, one chunk per item of ``lines`` as it comes (its API says the type)."""

    __slots__ = ("lines", "on_close")

    def __init__(self, lines: Iterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        self.lines = lines
        self.on_close = on_close

    def close(self) -> None:
        """Stop the producer and release what it holds; safe to call more than once."""
        close = getattr(self.lines, "close", None)
        if close is not None:
            close()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()


class ApiError(Exception):
    """A refused request: its status and message, shaped by the route's dialect (Ollama: ``{"error": message}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_reply(obj: Any, status: int = 200) -> Reply:
    return Reply(status, ENCODER.encode(obj))


def error_reply(status: int, message: str) -> Reply:
    return Reply(status, ENCODER.encode({"error": message}))


def line(obj: Any) -> bytes:
    """Return one NDJSON line."""
    return ENCODER.encode(obj) + b"\n"


@dataclass(frozen=True)
class Dialect:
    """What an API shapes alike on every route of it: error answers, streams, and who may call."""

    error: Callable[[int, str], Reply]  # the answer to a failed request: (status, message)
    stream_type: bytes  # Content-Type of its streams
    stream_error: Callable[[str], bytes]  # the line that a stream_error fault sends mid-stream
    authorize: Callable[[str | None, str], None] | None = None  # (Authorization header, api_key): raise ApiError


OLLAMA = Dialect(error=error_reply, stream_type=NDJSON, stream_error=lambda message: line({"error": message}))
