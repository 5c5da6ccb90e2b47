"""Anthropic's Messages API on the simulator's engine: ``POST /v1/messages`` and ``GET /v1/models``.

Each rule follows Anthropic's documentation, cited where it is kept:

- Every request needs ``x-api-key`` (else 401 ``authentication_error``) and
  ``anthropic-version`` (else 400 ``invalid_request_error``); with ``api_key``
  set the key must be it (https://docs.anthropic.com/en/api/overview#authentication,
  https://docs.anthropic.com/en/api/versioning). ``GET /v1/models`` is the
  OpenAI-compatible listing unless the request carries one of those headers.
- Errors are ``{"type": "error", "error": {"type", "message"}, "request_id"}``,
  the type by status: 400 ``invalid_request_error``, 401
  ``authentication_error``, 402 ``billing_error``, 403 ``permission_error``,
  404 ``not_found_error``, 413 ``request_too_large``, 429
  ``rate_limit_error``, 500 ``api_error``, 504 ``timeout_error``, 529
  ``overloaded_error`` (https://docs.anthropic.com/en/api/errors). A missing
  model is 404 ``model: <name>``.
- Every answer carries ``request-id`` and ``anthropic-ratelimit-requests-*``
  and ``-tokens-*`` headers (limit, remaining, reset as RFC 3339); a 429
  shows the requests exhausted (https://docs.anthropic.com/en/api/rate-limits#response-headers).
- ``max_tokens`` is required (400 ``max_tokens: Field required``); roles are
  ``user`` and ``assistant`` only, the system prompt goes in ``system``
  (https://docs.anthropic.com/en/api/messages).
- Extended thinking (``thinking: {"type": "enabled", "budget_tokens"}``) needs
  a budget of at least 1024 and under ``max_tokens``, and refuses
  ``temperature`` other than 1, ``top_k``, and ``top_p`` under 0.95; the model
  then thinks first ("Thinking within N tokens."), in a ``thinking`` block
  with its ``signature`` (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking).
- A request with ``tools`` whose last message carries no ``tool_result`` is
  answered with a call of its first tool (each property of its input schema
  set to ``"sim"``) and ``stop_reason: "tool_use"``; otherwise the reply is
  text, as every mode of the simulator says it (the prompt's first words,
  counted on), ``end_turn``, or ``max_tokens`` when cut short.
- Streams are Server-Sent Events, each named: ``message_start`` (usage so
  far), per block ``content_block_start``, ``content_block_delta``
  (``thinking_delta`` then ``signature_delta``, ``text_delta``, or
  ``input_json_delta``) and ``content_block_stop``, a ``ping`` after the first
  block starts, ``message_delta`` (stop reason, cumulative usage),
  ``message_stop``; a ``stream_error`` fault sends an ``error`` event
  (https://docs.anthropic.com/en/docs/build-with-claude/streaming).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from email.message import Message as Headers
from typing import Any

from msgspec import Struct

from llm_worker.devtools.simulator.content import count_words, reply_tokens
from llm_worker.devtools.simulator.engine import Engine
from llm_worker.devtools.simulator.models import normalize_name, rfc3339
from llm_worker.devtools.simulator.protocol import ENCODER, JSON, SSE, ApiError, Dialect, Options, Reply, StreamReply

REQUESTS_PER_MINUTE = 4000  # what the rate-limit headers announce
TOKENS_PER_MINUTE = 400_000
SIGNATURE = "c2ltdWxhdGVk"  # a thinking block's signature: opaque to clients
MIN_BUDGET = 1024
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# A fault reason in Anthropic's words; the others keep Ollama's.
MESSAGES = {
    "rate_limit": "Number of requests has exceeded your per-minute rate limit "
    "(https://docs.anthropic.com/en/api/rate-limits); see the response headers for current usage.",
    "overloaded": "Overloaded",
    "busy": "Overloaded",
    "internal": "Internal server error",
    "not_found": "model: {model}",
}


# ---- request bodies --------------------------------------------------------------


class Thinking(Struct, kw_only=True):
    type: str = "disabled"
    budget_tokens: int | None = None


class AnthropicMessage(Struct, kw_only=True):
    role: str = "user"
    content: str | list[dict[str, Any]] = ""

    def text(self) -> str:
        """The words of its text blocks and tool results."""
        if isinstance(self.content, str):
            return self.content
        return " ".join(_block_text(block) for block in self.content)

    def has_tool_result(self) -> bool:
        return isinstance(self.content, list) and any(block.get("type") == "tool_result" for block in self.content)


class MessagesRequest(Struct, kw_only=True):
    model: str = ""
    messages: list[AnthropicMessage] = []
    max_tokens: int | None = None
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    thinking: Thinking | None = None
    tools: list[dict[str, Any]] | None = None


def _block_text(block: dict[str, Any]) -> str:
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        inner = block.get("content", "")
        return inner if isinstance(inner, str) else " ".join(_block_text(part) for part in inner)
    return ""


# ---- the dialect: errors, stream errors, the headers it checks and sends ----------------


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_reply(status: int, message: str) -> Reply:
    request_id = _request_id()
    body = {"type": "error", "error": {"type": error_type(status), "message": message}, "request_id": request_id}
    return Reply(status, ENCODER.encode(body), JSON, _headers(request_id, exhausted=status == 429))


def stream_error(status: int, message: str) -> bytes:
    return _event("error", {"type": "error", "error": {"type": error_type(status), "message": message}})


def authorize(headers: Headers, api_key: str) -> None:
    key = headers.get("x-api-key")
    if not key:
        raise ApiError(401, "x-api-key header is required")
    if api_key and key != api_key:
        raise ApiError(401, "invalid x-api-key")
    if not headers.get("anthropic-version"):
        raise ApiError(400, "anthropic-version: header is required")


ANTHROPIC = Dialect(
    error=error_reply, stream_type=SSE, stream_error=stream_error, authorize=authorize, messages=MESSAGES
)


def _request_id() -> str:
    return "req_" + secrets.token_hex(12)


def _headers(request_id: str, exhausted: bool = False) -> bytes:
    reset = rfc3339(time.time() + 60)
    lines = [f"request-id: {request_id}"]
    for kind, limit in (("requests", REQUESTS_PER_MINUTE), ("tokens", TOKENS_PER_MINUTE)):
        left = 0 if exhausted and kind == "requests" else limit - 1
        lines += [
            f"anthropic-ratelimit-{kind}-limit: {limit}",
            f"anthropic-ratelimit-{kind}-remaining: {left}",
            f"anthropic-ratelimit-{kind}-reset: {reset}",
        ]
    return "".join(line + "\r\n" for line in lines).encode()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + ENCODER.encode(data) + b"\n\n"


# ---- routes -----------------------------------------------------------------------


def models(engine: Engine, _: None) -> Reply:
    data = [
        {"type": "model", "id": _listed(info.name), "display_name": _listed(info.name), "created_at": info.modified_at}
        for info in engine.catalog.available()
    ]
    body = {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None}
    body["last_id"] = data[-1]["id"] if data else None
    return Reply(200, ENCODER.encode(body), JSON, _headers(_request_id()))


def messages(engine: Engine, req: MessagesRequest) -> Reply | StreamReply:
    budget = _check(req)
    info = engine.catalog.find(normalize_name(req.model)) if req.model else None
    if info is None:
        raise ApiError(404, f"model: {req.model}")
    turn = _Turn(engine, req, budget)
    # As every mode: a slot (and the model) for the whole reply, the base latency first.
    run = engine.begin(
        info, Options(num_predict=req.max_tokens, temperature=req.temperature), engine.default_keep_alive
    )
    handed_over = False
    try:
        engine.pause(engine.config.latency_ms / 1000)
        headers = _headers(_request_id())
        if req.stream:
            handed_over = True
            return StreamReply(_stream(engine, turn), on_close=run.close, headers=headers)
        engine.pause(turn.output_tokens * engine.config.token_ms / 1000)
        return Reply(200, ENCODER.encode(turn.whole()), JSON, headers)
    finally:
        if not handed_over:
            run.close()


def _check(req: MessagesRequest) -> int:
    """Refuse what Anthropic refuses, in its words; return the thinking budget (0: no thinking)."""
    if req.max_tokens is None:
        raise ApiError(400, "max_tokens: Field required")
    if req.max_tokens < 1:
        raise ApiError(400, "max_tokens: Input should be greater than or equal to 1")
    if not req.messages:
        raise ApiError(400, "messages: at least one message is required")
    for number, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{number}.role: Input should be 'user' or 'assistant'")
    if req.thinking is None or req.thinking.type != "enabled":
        return 0
    budget = req.thinking.budget_tokens or 0
    if budget < MIN_BUDGET:
        raise ApiError(400, f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_BUDGET}")
    if req.max_tokens <= budget:
        raise ApiError(400, "`max_tokens` must be greater than `thinking.budget_tokens`")
    if req.temperature is not None and req.temperature != 1:
        raise ApiError(400, "`temperature` may only be set to 1 when thinking is enabled")
    if req.top_k is not None:
        raise ApiError(400, "`top_k` is not supported when thinking is enabled")
    if req.top_p is not None and req.top_p < 0.95:
        raise ApiError(400, "`top_p` must be greater than or equal to 0.95 when thinking is enabled")
    return budget


class _Turn:
    """One answer to send: thinking, then text or a tool call; its stop reason and usage."""

    def __init__(self, engine: Engine, req: MessagesRequest, budget: int) -> None:
        self.id, self.model = "msg_" + secrets.token_hex(12), req.model
        words = f"Thinking within {budget} tokens.".split() if budget else []
        self.thoughts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        system = req.system if isinstance(req.system, str) else " ".join(_block_text(b) for b in req.system or ())
        self.input_tokens = count_words(system) + sum(count_words(m.text()) for m in req.messages)
        self.call: dict[str, Any] | None = None  # a tool_use block, its input empty as a stream starts it
        self.arguments: dict[str, str] = {}
        self.pieces: list[str] = []  # text tokens, or the pieces of the call's input JSON
        if req.tools and not req.messages[-1].has_tool_result():
            tool = req.tools[0]
            properties = (tool.get("input_schema") or {}).get("properties") or {}
            self.call = {"id": "toolu_" + secrets.token_hex(12), "name": tool.get("name", ""), "input": {}}
            self.arguments = {name: "sim" for name in properties}
            text = ENCODER.encode(self.arguments).decode()
            self.pieces = [text[: len(text) // 2], text[len(text) // 2 :]]
            self.stop_reason = "tool_use"
        else:
            prompt = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
            limit = (req.max_tokens or 0) - len(self.thoughts)  # thinking counts within max_tokens
            self.pieces, reason = reply_tokens(prompt, engine.config.reply_tokens, limit)
            self.stop_reason = "max_tokens" if reason == "length" else "end_turn"
        self.output_tokens = len(self.thoughts) + len(self.pieces)

    def head(self, output_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self.usage(output_tokens),
        }

    def usage(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def whole(self) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.thoughts:
            content.append({"type": "thinking", "thinking": "".join(self.thoughts), "signature": SIGNATURE})
        if self.call is not None:
            content.append({"type": "tool_use", **self.call, "input": self.arguments})
        else:
            content.append({"type": "text", "text": "".join(self.pieces)})
        return {**self.head(self.output_tokens), "content": content, "stop_reason": self.stop_reason}


def _stream(engine: Engine, turn: _Turn) -> Iterator[bytes]:
    token_seconds = engine.config.token_ms / 1000
    yield _event("message_start", {"type": "message_start", "message": turn.head(1)})
    index = 0
    if turn.thoughts:
        yield _start(index, {"type": "thinking", "thinking": "", "signature": ""})
        yield _event("ping", {"type": "ping"})
        for thought in turn.thoughts:
            engine.pause(token_seconds)
            yield _delta(index, {"type": "thinking_delta", "thinking": thought})
        yield _delta(index, {"type": "signature_delta", "signature": SIGNATURE})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    if turn.call is not None:
        yield _start(index, {"type": "tool_use", **turn.call})
        kind, field = "input_json_delta", "partial_json"
    else:
        yield _start(index, {"type": "text", "text": ""})
        kind, field = "text_delta", "text"
    if index == 0:
        yield _event("ping", {"type": "ping"})
    for piece in turn.pieces:
        engine.pause(token_seconds)
        yield _delta(index, {"type": kind, field: piece})
    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": turn.stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": turn.output_tokens},
        },
    )
    yield _event("message_stop", {"type": "message_stop"})


def _start(index: int, block: dict[str, Any]) -> bytes:
    return _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _listed(name: str) -> str:
    """A model's id as Anthropic lists it: no Ollama tag."""
    return name.removesuffix(":latest")
