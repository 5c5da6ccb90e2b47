"""OpenRouter's API on the simulator's engine: ``POST /api/v1/chat/completions`` and ``GET /api/v1/models``.

OpenRouter speaks OpenAI's chat completions with its own additions, each
kept as its documentation says:

- A request needs ``Authorization: Bearer <key>`` (401 ``No auth credentials
  found`` without one; with ``api_key`` set, another key is 401 ``User not
  found.``) (https://openrouter.ai/docs/api-reference/authentication).
- Errors are ``{"error": {"code": <the status>, "message", "metadata"}}``; a
  model it does not know is 400 ``<model> is not a valid model ID``; 5xx
  name the upstream in ``metadata.provider_name``
  (https://openrouter.ai/docs/api-reference/errors). A status fault's
  ``retry_after`` is its ``Retry-After`` header (429 and 503 carry one there).
- Once an answer has begun, an error is a 200 stream chunk with ``error``
  (``code`` 502, ``metadata.error_type``) and ``finish_reason: "error"``,
  and the stream ends there, with no ``[DONE]``: what a ``stream_error``
  fault sends (https://openrouter.ai/docs/api-reference/streaming, "Handling
  errors during streaming").
- Streams begin with an SSE comment, ``: OPENROUTER PROCESSING``, and send
  one every ``KEEPALIVE_SECONDS`` while the model has not begun (the base
  latency); comments count as lines for a fault's ``after_chunks``
  (https://openrouter.ai/docs/api-reference/streaming).
- Every answer has ``usage`` with its ``cost`` in credits, whatever the
  request asked; a stream sends it in a last chunk with no choices, before
  ``data: [DONE]`` (https://openrouter.ai/docs/use-cases/usage-accounting).
  Reasoning tokens are counted in ``completion_tokens_details``.
- ``reasoning`` (``effort``, ``max_tokens`` or ``enabled``; ``exclude`` hides
  it) makes any model reason first, "Thinking at <effort> effort.", sent as
  ``reasoning`` in the message or the deltas
  (https://openrouter.ai/docs/use-cases/reasoning-tokens).
- ``/api/v1/models`` lists every model with its context length and its
  price per token, as text, to anyone, key or none
  (https://openrouter.ai/docs/api-reference/list-available-models).

Each chunk and answer names the upstream ``provider`` (``Simulator``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from email.message import Message as Headers
from typing import Any

from msgspec import Struct

from llm_worker.devtools.simulator.content import count_words, reply_tokens, thought_tokens
from llm_worker.devtools.simulator.engine import Engine
from llm_worker.devtools.simulator.models import normalize_name
from llm_worker.devtools.simulator.openai import ChatMessage, event
from llm_worker.devtools.simulator.protocol import SSE, ApiError, Dialect, Options, Reply, StreamReply, json_reply

PROVIDER = "Simulator"  # the upstream provider OpenRouter names in answers and errors
KEEPALIVE = b": OPENROUTER PROCESSING\n\n"
KEEPALIVE_SECONDS = 1.0
DONE = b"data: [DONE]\n\n"
PROMPT_PRICE = 0.000001  # credits per token, as /models lists them
COMPLETION_PRICE = 0.000002
# A fault reason in OpenRouter's words; the others keep Ollama's.
MESSAGES = {
    "rate_limit": "Rate limit exceeded: limit_rpm/{model}. Retry shortly.",
    "busy": "No allowed providers are available for the selected model.",
    "overloaded": "Overloaded",
    "internal": "Internal Server Error",
    "not_found": "{model} is not a valid model ID",
}


# ---- request bodies --------------------------------------------------------------


class Reasoning(Struct, kw_only=True):
    effort: str | None = None
    max_tokens: int | None = None
    enabled: bool | None = None
    exclude: bool = False

    def level(self) -> str | None:
        """The effort the model reasons at; None when it does not."""
        if self.effort:
            return self.effort
        return "medium" if self.enabled or (self.enabled is None and self.max_tokens) else None


class OpenRouterRequest(Struct, kw_only=True):
    model: str = ""
    messages: list[ChatMessage] = []
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    reasoning: Reasoning | None = None
    tools: list[dict[str, Any]] | None = None


# ---- the dialect ------------------------------------------------------------------


def error_reply(status: int, message: str) -> Reply:
    error: dict[str, Any] = {"code": status, "message": message}
    if status >= 500:
        error["metadata"] = {"provider_name": PROVIDER}
    return json_reply({"error": error}, status)


def stream_error(status: int, message: str) -> bytes:
    return event(
        {
            **_head("chat.completion.chunk", ""),
            "error": {"code": 502, "message": message, "metadata": {"error_type": "provider_unavailable"}},
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
        }
    )


def authorize(headers: Headers, api_key: str) -> None:
    header = headers.get("Authorization") or ""
    if not header.startswith("Bearer ") or not header[len("Bearer ") :].strip():
        raise ApiError(401, "No auth credentials found")
    if api_key and header != f"Bearer {api_key}":
        raise ApiError(401, "User not found.")


OPENROUTER = Dialect(
    error=error_reply, stream_type=SSE, stream_error=stream_error, authorize=authorize, messages=MESSAGES
)
OPENROUTER_PUBLIC = replace(OPENROUTER, authorize=None)  # /api/v1/models: anyone may list the models


def _head(kind: str, model: str, generation: str | None = None) -> dict[str, Any]:
    return {
        "id": generation or "gen-" + secrets.token_hex(12),
        "provider": PROVIDER,
        "model": model,
        "object": kind,
        "created": int(time.time()),
    }


# ---- routes -----------------------------------------------------------------------


def models(engine: Engine, _: None) -> Reply:
    return json_reply(
        {
            "data": [
                {
                    "id": _listed(info.name),
                    "name": _listed(info.name),
                    "created": int(datetime.fromisoformat(info.modified_at.replace("Z", "+00:00")).timestamp()),
                    "context_length": engine.config.num_ctx,
                    "pricing": {"prompt": f"{PROMPT_PRICE:.6f}", "completion": f"{COMPLETION_PRICE:.6f}"},
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                }
                for info in engine.catalog.available()
            ]
        }
    )


def chat_completions(engine: Engine, req: OpenRouterRequest) -> Reply | StreamReply:
    if not req.messages:
        raise ApiError(400, 'Input required: specify "prompt" or "messages"')
    info = engine.catalog.find(normalize_name(req.model)) if req.model else None
    if info is None:
        raise ApiError(400, f"{req.model} is not a valid model ID")
    turn = _Turn(engine, req)
    options = Options(num_predict=req.max_tokens, seed=req.seed, temperature=req.temperature)
    run = engine.begin(info, options, engine.default_keep_alive)
    handed_over = False
    try:
        if req.stream:
            handed_over = True
            return StreamReply(_stream(engine, turn), on_close=run.close)
        engine.pause((engine.config.latency_ms + turn.completion_tokens * engine.config.token_ms) / 1000)
        return json_reply(turn.whole())
    finally:
        if not handed_over:
            run.close()


class _Turn:
    """One completion to send: its reasoning, tokens, finish reason and usage."""

    def __init__(self, engine: Engine, req: OpenRouterRequest) -> None:
        self.id, self.model = "gen-" + secrets.token_hex(12), req.model
        level = req.reasoning.level() if req.reasoning is not None else None
        thoughts = thought_tokens(level) if level else []
        self.shown = [] if req.reasoning is not None and req.reasoning.exclude else thoughts
        prompt = next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
        self.tokens, self.reason = reply_tokens(prompt, engine.config.reply_tokens, req.max_tokens)
        prompt_tokens = sum(count_words(m.text()) for m in req.messages)
        self.completion_tokens = len(thoughts) + len(self.tokens)
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
            "cost": round(prompt_tokens * PROMPT_PRICE + self.completion_tokens * COMPLETION_PRICE, 9),
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": len(thoughts)},
        }

    def whole(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(self.tokens), "reasoning": "".join(self.shown) or None}
        choice = {"index": 0, "message": message, "finish_reason": self.reason, "native_finish_reason": self.reason}
        return {**_head("chat.completion", self.model, self.id), "choices": [choice], "usage": self.usage}

    def chunk(self, content: str, reasoning: str | None, finish_reason: str | None) -> bytes:
        delta = {"role": "assistant", "content": content, "reasoning": reasoning}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "native_finish_reason": finish_reason}
        return event({**_head("chat.completion.chunk", self.model, self.id), "choices": [choice]})


def _stream(engine: Engine, turn: _Turn) -> Iterator[bytes]:
    yield KEEPALIVE  # at once: the model has not begun
    wait = engine.config.latency_ms / 1000
    while wait > 0:
        step = min(wait, KEEPALIVE_SECONDS)
        engine.pause(step)
        wait -= step
        if wait > 0:
            yield KEEPALIVE
    token_seconds = engine.config.token_ms / 1000
    for thought in turn.shown:
        engine.pause(token_seconds)
        yield turn.chunk("", thought, None)
    for token in turn.tokens:
        engine.pause(token_seconds)
        yield turn.chunk(token, None, None)
    yield turn.chunk("", None, turn.reason)
    yield event({**_head("chat.completion.chunk", turn.model, turn.id), "choices": [], "usage": turn.usage})
    yield DONE


def _listed(name: str) -> str:
    """A model's id as OpenRouter lists it: no Ollama tag."""
    return name.removesuffix(":latest")
