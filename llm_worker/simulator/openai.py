"""OpenAI's API as Ollama serves it beside its own: /v1/models, /v1/chat/completions, /v1/embeddings.

The same engine answers both APIs, so content, latency, slots, model loads and
faults are those of /api/chat and /api/embed: ``max_tokens`` (or
``max_completion_tokens``) plays ``num_predict``, and a request and its
/api twin load the same instance. Streams are Server-Sent Events: one
``data: {chunk}`` per token, each with the role and its piece as Ollama sends
them, a chunk with ``finish_reason``, a usage chunk when
``stream_options.include_usage``, then ``data: [DONE]``. Errors take OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal

from msgspec import Struct

from llm_worker.simulator.content import count_words, embedding, reply_tokens
from llm_worker.simulator.engine import Engine
from llm_worker.simulator.protocol import (
    ENCODER, NO_OPTIONS, SSE, ApiError, Dialect, Options, Reply, StreamReply, json_reply,
)

FINGERPRINT = "fp_ollama"
DONE = b"data: [DONE]\n\n"
BAD_KEY = "Incorrect API key provided"
# OpenAI's error type and code per status. Ollama's /v1 calls everything its
# handlers refuse (a missing model's 404 included) an "api_error".
ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 422: "invalid_request_error",
               429: "requests"}
ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


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


class EmbeddingsRequest(Struct, kw_only=True):
    model: str = ""
    input: str | list[str] | None = None
    dimensions: int | None = None


# ---- the dialect: errors, stream lines, the key --------------------------------------


def error_reply(status: int, message: str) -> Reply:
    error = {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "param": None,
             "code": ERROR_CODES.get(status)}
    return Reply(status, ENCODER.encode({"error": error}))


def event(obj: Any) -> bytes:
    """Return one Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + ENCODER.encode(obj) + b"\n\n"


def stream_error(message: str) -> bytes:
    return event({"error": {"message": message, "type": "api_error", "param": None, "code": None}})


def authorize(header: str | None, api_key: str) -> None:
    if api_key and header != f"Bearer {api_key}":
        raise ApiError(401, BAD_KEY)


OPENAI = Dialect(error=error_reply, stream_type=SSE, stream_error=stream_error, authorize=authorize)


# ---- routes -----------------------------------------------------------------------


def models(engine: Engine, _: None) -> Reply:
    return json_reply({"object": "list", "data": [
        {"id": info.name, "object": "model", "created": _epoch(info.modified_at), "owned_by": _owner(info.name)}
        for info in engine.catalog.available()
    ]})


def chat_completions(engine: Engine, req: ChatCompletionRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    if not req.messages:
        raise ApiError(400, "[] is too short - 'messages'")
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    prompt = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    tokens, reason = reply_tokens(prompt, engine.config.reply_tokens, limit)
    prompt_count = sum(count_words(m.text()) for m in req.messages)
    turn = _Turn(req.model, tokens, reason, {"prompt_tokens": prompt_count, "completion_tokens": len(tokens),
                                             "total_tokens": prompt_count + len(tokens)})
    # Mirrors inference.complete: a slot (and the model) for the whole reply, the base latency first.
    run = engine.begin(info, Options(num_predict=limit, seed=req.seed, temperature=req.temperature),
                       engine.default_keep_alive)
    handed_over = False
    try:
        engine.pause(engine.config.latency_ms / 1000)
        if req.stream:
            handed_over = True
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
    run = engine.begin(info, NO_OPTIONS, engine.default_keep_alive)
    try:
        engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms * len(inputs)) / 1000)
        dims = req.dimensions or engine.config.dims
        vectors = [embedding(info.name, text, dims) for text in inputs]  # what /api/embed answers
    finally:
        run.close()
    tokens = sum(count_words(text) for text in inputs)
    return json_reply({
        "object": "list", "model": req.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
    })


class _Turn:
    """One completion to send: its head fields, tokens, finish reason and usage."""

    def __init__(self, model: str, tokens: list[str], reason: str, usage: dict[str, int]) -> None:
        self.id, self.created, self.model = f"chatcmpl-{secrets.randbelow(10**9)}", int(time.time()), model
        self.tokens, self.reason, self.usage = tokens, reason, usage

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT}

    def whole(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.tokens)}
        return {**self.head("chat.completion"), "choices": [{"index": 0, "message": message,
                                                             "finish_reason": self.reason}], "usage": self.usage}

    def chunk(self, content: str, finish_reason: str | None) -> bytes:
        delta = {"role": "assistant", "content": content}
        return event({**self.head("chat.completion.chunk"),
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    def usage_chunk(self) -> bytes:
        return event({**self.head("chat.completion.chunk"), "choices": [], "usage": self.usage})


def _stream(engine: Engine, turn: _Turn, include_usage: bool) -> Iterator[bytes]:
    token_seconds = engine.config.token_ms / 1000
    for token in turn.tokens:
        engine.pause(token_seconds)
        yield turn.chunk(token, None)
    yield turn.chunk("", turn.reason)
    if include_usage:
        yield turn.usage_chunk()
    yield DONE


def _epoch(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


def _owner(name: str) -> str:
    """Return the namespace Ollama reports as owner: "library" for its own models."""
    parts = name.split(":")[0].split("/")
    return parts[-2] if len(parts) > 1 else "library"
