"""OpenAI's API as Ollama serves it beside its own: /v1/models, /v1/chat/completions, /v1/embeddings.

The same engine answers both APIs, so content, latency, slots, model loads and
faults are those of /api/chat and /api/embed: ``max_tokens`` (or
``max_completion_tokens``) plays ``num_predict``, and a request and its
/api twin load the same instance. Streams are Server-Sent Events: one
``data: {chunk}`` per token, each with the role and its piece as Ollama sends
them, a chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``. Errors take OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``.

``reasoning_effort`` (Ollama's /v1 takes low, medium, high and none) makes
any model reason first: ``reasoning`` in the message, or in deltas before the
content, as Ollama's /v1 sends a thinking model's thoughts.

Two kinds of model answer as llama-cpp-python's server does instead, so the
provider's tests can reproduce what was seen there (version 0.3.36,
``interrupt_requests`` on, its default):

- a model whose name contains ``llamacpp`` streams as that server does: a
  first chunk with only the role, a chunk per piece, a last one with an empty
  delta and the finish reason, then ``[DONE]``, and never a usage chunk (it
  ignores ``stream_options``). Any /v1 request that arrives while such a
  stream runs, a listing of the models included, stops it: ``data: [DONE]``
  follows the chunk in flight, with no finish reason, the way that server
  hands its one model over to the newer request. A prompt of num_ctx words or more is refused as it refuses
  one over its context: unstreamed, 400 with its words; streamed, 200 and an
  empty stream (it meets the error only once the stream has begun, and tells
  its log alone);
- a model whose name contains ``nopool`` answers /v1/embeddings with one
  vector per token of each input, a list of lists, as llama.cpp does for a
  model without a pooling type.
"""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import datetime
from email.message import Message as Headers
from typing import Any, Literal

from msgspec import Struct

from llm_worker.devtools.simulator.content import count_words, embedding, reply_tokens
from llm_worker.devtools.simulator.engine import Engine
from llm_worker.devtools.simulator.protocol import (
    ENCODER,
    NO_OPTIONS,
    SSE,
    ApiError,
    Dialect,
    Options,
    Reply,
    StreamReply,
    json_reply,
)

FINGERPRINT = "fp_ollama"
DONE = b"data: [DONE]\n\n"
BAD_KEY = "Incorrect API key provided"
# OpenAI's error type and code per status. Ollama's /v1 calls everything its
# handlers refuse (a missing model's 404 included) an "api_error".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}
EFFORTS = ("low", "medium", "high", "none")  # the reasoning_effort values Ollama's /v1 accepts
LLAMACPP = "llamacpp"  # in a model's name: it streams as llama-cpp-python's server, interrupted by newer requests
NOPOOL = "nopool"  # in a model's name: /v1/embeddings answers a vector per token, as for a model without pooling


# ---- request bodies --------------------------------------------------------------


class ChatMessage(Struct, kw_only=True):
    role: str = "user"
    content: str | list[dict[str, Any]] | None = None  # text, or parts such as {"type": "text", "text": ...}

    def text(self) -> str:
        if isinstance(self.content, list):
            return " ".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class ResponseFormat(Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(Struct, kw_only=True):
    model: str = ""
    messages: list[ChatMessage] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: str | None = None


class EmbeddingsRequest(Struct, kw_only=True):
    model: str = ""
    input: str | list[str] | None = None
    dimensions: int | None = None


# ---- the dialect: errors, stream lines, the key --------------------------------------


def error_reply(status: int, message: str) -> Reply:
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": ERROR_CODES.get(status),
    }
    return Reply(status, ENCODER.encode({"error": error}))


def event(obj: Any) -> bytes:
    """Return one Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + ENCODER.encode(obj) + b"\n\n"


def stream_error(status: int, message: str) -> bytes:
    return event({"error": {"message": message, "type": "api_error", "param": None, "code": None}})


def authorize(headers: Headers, api_key: str) -> None:
    if api_key and headers.get("Authorization") != f"Bearer {api_key}":
        raise ApiError(401, BAD_KEY)


OPENAI = Dialect(error=error_reply, stream_type=SSE, stream_error=stream_error, authorize=authorize)


# ---- routes -----------------------------------------------------------------------


def models(engine: Engine, _: None) -> Reply:
    _arrivals(engine).arrive()  # llama-cpp-python's listing waits for the model too: it stops a running stream
    return json_reply(
        {
            "object": "list",
            "data": [
                {"id": info.name, "object": "model", "created": _epoch(info.modified_at), "owned_by": _owner(info.name)}
                for info in engine.catalog.available()
            ],
        }
    )


def chat_completions(engine: Engine, req: ChatCompletionRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    if not req.messages:
        raise ApiError(400, "[] is too short - 'messages'")
    if req.reasoning_effort is not None and req.reasoning_effort not in EFFORTS:
        raise ApiError(400, f"invalid reasoning value: {req.reasoning_effort!r} (must be one of {', '.join(EFFORTS)})")
    arrival = _arrivals(engine).arrive()  # a request that asks for the model: it stops a llamacpp stream
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    prompt = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    tokens, reason = reply_tokens(prompt, engine.config.reply_tokens, limit)
    thoughts = _thoughts(req.reasoning_effort)
    prompt_count = sum(count_words(m.text()) for m in req.messages)
    if LLAMACPP in info.name and prompt_count >= engine.config.num_ctx:
        if req.stream:
            return StreamReply(iter(()))
        raise ApiError(400, _over_context(prompt_count, engine.config.num_ctx, limit))
    generated = len(thoughts) + len(tokens)  # Ollama counts a thinking model's thoughts as eval tokens
    turn = _Turn(
        req.model,
        tokens,
        reason,
        {"prompt_tokens": prompt_count, "completion_tokens": generated, "total_tokens": prompt_count + generated},
        thoughts,
    )
    # Mirrors inference.complete: a slot (and the model) for the whole reply, the base latency first.
    run = engine.begin(
        info, Options(num_predict=limit, seed=req.seed, temperature=req.temperature), engine.default_keep_alive
    )
    handed_over = False
    try:
        engine.pause(engine.config.latency_ms / 1000)
        if req.stream:
            handed_over = True
            if LLAMACPP in info.name:
                return StreamReply(_llamacpp_stream(engine, turn, arrival), on_close=run.close)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamReply(_stream(engine, turn, include_usage), on_close=run.close)
        engine.pause(len(tokens) * engine.config.token_ms / 1000)
        return json_reply(turn.whole())
    finally:
        if not handed_over:
            run.close()


def embeddings(engine: Engine, req: EmbeddingsRequest) -> Reply:
    info = engine.require_model(req.model)
    inputs = [req.input] if isinstance(req.input, str) else list(req.input or ())
    if not inputs:
        raise ApiError(400, "invalid input")
    _arrivals(engine).arrive()
    run = engine.begin(info, NO_OPTIONS, engine.default_keep_alive)
    try:
        engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms * len(inputs)) / 1000)
        dims = req.dimensions or engine.config.dims
        vectors: list[Any] = [embedding(info.name, text, dims) for text in inputs]  # what /api/embed answers
        if NOPOOL in info.name:  # llama.cpp without pooling: each input's tokens, each a vector
            vectors = [[embedding(info.name, word, dims) for word in text.split()] for text in inputs]
    finally:
        run.close()
    tokens = sum(count_words(text) for text in inputs)
    return json_reply(
        {
            "object": "list",
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
        }
    )


class _Turn:
    """One completion to send: its head fields, thoughts, tokens, finish reason and usage."""

    def __init__(
        self, model: str, tokens: list[str], reason: str, usage: dict[str, int], thoughts: list[str] | None = None
    ) -> None:
        self.id, self.created, self.model = f"chatcmpl-{secrets.randbelow(10**9)}", int(time.time()), model
        self.tokens, self.reason, self.usage, self.thoughts = tokens, reason, usage, thoughts or []

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def whole(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.tokens)}
        if self.thoughts:
            message["reasoning"] = "".join(self.thoughts)
        return {
            **self.head("chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": self.reason}],
            "usage": self.usage,
        }

    def chunk(self, content: str, finish_reason: str | None, reasoning: str = "") -> bytes:
        delta = {"role": "assistant", "content": content}
        if reasoning:
            delta["reasoning"] = reasoning
        return self.event(delta, finish_reason)

    def event(self, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        return event(
            {
                **self.head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    def usage_chunk(self) -> bytes:
        return event({**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage})


def _stream(engine: Engine, turn: _Turn, include_usage: bool) -> Iterator[bytes]:
    token_seconds = engine.config.token_ms / 1000
    for thought in turn.thoughts:
        engine.pause(token_seconds)
        yield turn.chunk("", None, thought)
    for token in turn.tokens:
        engine.pause(token_seconds)
        yield turn.chunk(token, None)
    yield turn.chunk("", turn.reason)
    if include_usage:
        yield turn.usage_chunk()
    yield DONE


def _llamacpp_stream(engine: Engine, turn: _Turn, arrival: int) -> Iterator[bytes]:
    """Stream as llama-cpp-python 0.3.36 does, and stop as it does when a newer request arrives.

    Its server checks, after sending each chunk, whether another request waits
    for the model; if one does, it sends ``data: [DONE]`` and ends the stream
    there, without the chunk that carries the finish reason. It ignores
    ``stream_options``: no usage chunk.
    """
    token_seconds = engine.config.token_ms / 1000
    pieces: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant"}, None)]
    pieces += [({"content": token}, None) for token in turn.tokens]
    pieces.append(({}, turn.reason))
    arrivals = _arrivals(engine)
    for number, (delta, finish_reason) in enumerate(pieces):
        if number and arrivals.since(arrival):
            break
        if "content" in delta:
            engine.pause(token_seconds)
        yield turn.event(delta, finish_reason)
    yield DONE


def _over_context(prompt_tokens: int, context: int, max_tokens: int | None) -> str:
    """llama-cpp-python's refusal of a chat prompt over its context (code context_length_exceeded)."""
    return (
        f"This model's maximum context length is {context} tokens. However, you requested"
        f" {(max_tokens or 0) + prompt_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the"
        " completion). Please reduce the length of the messages or completion."
    )


def _thoughts(effort: str | None) -> list[str]:
    """A thinking model's reasoning at that effort; none without one, or at "none"."""
    if effort is None or effort == "none":
        return []
    words = f"Thinking at {effort} effort.".split()
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


class _Arrivals:
    """How many /v1 requests an engine has seen arrive: a stream learns of newer ones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def arrive(self) -> int:
        """Count one arrival; return its number."""
        with self._lock:
            self._count += 1
            return self._count

    def since(self, number: int) -> bool:
        """Whether any request arrived after arrival ``number``."""
        return self._count > number


_ARRIVALS: weakref.WeakKeyDictionary[Engine, _Arrivals] = weakref.WeakKeyDictionary()
_ARRIVALS_LOCK = threading.Lock()


def _arrivals(engine: Engine) -> _Arrivals:
    with _ARRIVALS_LOCK:
        arrivals = _ARRIVALS.get(engine)
        if arrivals is None:
            arrivals = _ARRIVALS[engine] = _Arrivals()
        return arrivals


def _epoch(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


def _owner(name: str) -> str:
    """Return the namespace Ollama reports as owner: "library" for its own models."""
    parts = name.split(":")[0].split("/")
    return parts[-2] if len(parts) > 1 else "library"
