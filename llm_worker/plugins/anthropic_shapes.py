"""What the Anthropic provider sends and how it reads a refusal: Ollama's shapes as Anthropic's, errors by type.

Part of the Anthropic plugin (anthropic.py), and like it written on the
authors' surface alone.

Requests (https://docs.anthropic.com/en/api/messages): system messages join
into the top-level ``system``; a user message with images is image blocks and
a text block; an assistant's tool calls are ``tool_use`` blocks (ids made up
where Ollama's calls have none); a ``tool`` message is a ``tool_result``
block in a user message, naming the call it answers (the earliest unanswered
call of its ``tool_name``), the answers to one turn's calls together; tools
in OpenAI's shape (Ollama's) become ``{"name", "description", "input_schema"}``.

Errors (https://docs.anthropic.com/en/api/errors) are read by their ``type``
first and their status second; the table is ``KINDS`` below.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import msgspec

from llm_worker.plugin import (
    ChatRequest,
    ErrorKind,
    GenerateRequest,
    Message,
    ProviderError,
    RateLimited,
    retry_after_seconds,
)

# Extended thinking's budget per Ollama think level (true is "medium"): Anthropic's minimum is 1024
# (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking).
THINKING_BUDGET: dict[bool | str, int] = {True: 4096, "low": 1024, "medium": 4096, "high": 16384, "max": 32000}
MIN_TOP_P_WHEN_THINKING = 0.95  # thinking refuses temperature and top_k, and a top_p under this
_IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lG": "image/gif", "UklG": "image/webp"}

# Error kinds by Anthropic's error type; a type not here goes by its status (KINDS_BY_STATUS), else provider.
KINDS = {
    "invalid_request_error": ErrorKind.VALIDATION,  # 400: the request must change
    "request_too_large": ErrorKind.VALIDATION,  # 413
    "not_found_error": ErrorKind.MODEL,  # 404: no such model; fallbacks may help
    "authentication_error": ErrorKind.PROVIDER,  # 401, never retried (KEY_REFUSED)
    "permission_error": ErrorKind.PROVIDER,  # 403, never retried
    "billing_error": ErrorKind.PROVIDER,  # 402, never retried
    "timeout_error": ErrorKind.TIMEOUT,  # 504
    # rate_limit_error (429): RateLimited; api_error (500), overloaded_error (529): provider, retried, counted
}
KINDS_BY_STATUS = {400: ErrorKind.VALIDATION, 404: ErrorKind.MODEL, 408: ErrorKind.TIMEOUT, 413: ErrorKind.VALIDATION}
KEY_REFUSED = frozenset({"authentication_error", "permission_error", "billing_error"})
KEY_REFUSED_STATUSES = frozenset({401, 402, 403})
SPEND_LIMIT = "enforced_spend_limit_reached"  # a 429 that no wait lifts before the month ends
RATE_LIMIT_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")  # anthropic-ratelimit-<kind>-*


class ErrorBody(msgspec.Struct):
    """The ``error`` of Anthropic's ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""

    type: str = ""
    message: str = ""
    details: dict[str, Any] | None = None


def error_for(
    status: int | None, error: ErrorBody | None, what: str, headers: Any = None, request_id: str | None = None
) -> ProviderError:
    """The error an Anthropic error is: an answer's (with its status and headers), or a stream's ``error`` event."""
    kind_name = error.type if error is not None else ""
    text = error.message if error is not None and error.message else "no message"
    said = f"{status} {kind_name}" if status is not None else f"stream error {kind_name}"
    message = f"{what}: {said.strip()}: {text}" + (f" (request-id {request_id})" if request_id else "")
    if kind_name == "rate_limit_error" or status == 429:
        if error is not None and (error.details or {}).get("error_code") == SPEND_LIMIT:
            return ProviderError(message, ErrorKind.PROVIDER, status=status, retryable=False)
        return RateLimited(message, retry_after=_wait(headers), status=status)
    kind = KINDS.get(kind_name) or KINDS_BY_STATUS.get(status or 0, ErrorKind.PROVIDER)
    refused = kind_name in KEY_REFUSED or status in KEY_REFUSED_STATUSES
    return ProviderError(message, kind, status=status, retryable=False if refused else None)


def _wait(headers: Any) -> float | None:
    """Seconds a 429 asks to wait: ``retry-after``, else until the latest exhausted limit resets.

    Its ``anthropic-ratelimit-<kind>-reset`` headers are RFC 3339 times
    (https://docs.anthropic.com/en/api/rate-limits#response-headers).
    """
    if headers is None:
        return None
    said = retry_after_seconds(headers.get("retry-after"), time.time())
    if said is not None:
        return said
    resets = []
    for kind in RATE_LIMIT_KINDS:
        if headers.get(f"anthropic-ratelimit-{kind}-remaining") == "0":
            try:
                reset = headers.get(f"anthropic-ratelimit-{kind}-reset", "")
                resets.append(datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp())
            except ValueError:
                continue
    return max(0.0, max(resets) - time.time()) if resets else None


# ---- requests, from Ollama's shapes -------------------------------------------------


def max_tokens(request: ChatRequest | GenerateRequest, default_max_tokens: int) -> int:
    """The ``max_tokens`` a request is sent with: ``num_predict``, else the default; thinking's budget on top
    (thinking counts within ``max_tokens``: the answer keeps its own)."""
    options = request.options
    asked = options.num_predict if options is not None else None
    answer_tokens = asked if asked is not None and asked > 0 else default_max_tokens  # -1, -2: "no limit"
    budget = THINKING_BUDGET.get(request.think) if request.think is not None else None
    return answer_tokens + (budget or 0)


def request_body(
    remote: str,
    request: ChatRequest | GenerateRequest,
    system: str,
    messages: list[dict[str, Any]],
    stream: bool,
    default_max_tokens: int,
) -> dict[str, Any]:
    """The body of ``POST /v1/messages``: the options Anthropic has, thinking on top of ``max_tokens``."""
    options = request.options
    budget = THINKING_BUDGET.get(request.think) if request.think is not None else None
    body: dict[str, Any] = {
        "model": remote,
        "max_tokens": max_tokens(request, default_max_tokens),
        "messages": messages,
    }
    if system:
        body["system"] = system
    if stream:
        body["stream"] = True
    if budget:
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if options is not None:
        if options.temperature is not None and not budget:
            body["temperature"] = options.temperature
        if options.top_p is not None and (not budget or options.top_p >= MIN_TOP_P_WHEN_THINKING):
            body["top_p"] = options.top_p
        if options.top_k is not None and not budget:
            body["top_k"] = options.top_k
        if options.stop:
            body["stop_sequences"] = options.stop
    return body


def messages(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """Anthropic's ``system`` and messages for Ollama's messages."""
    system: list[str] = []
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, name) of the tool calls made so far
    for number, m in enumerate(messages):
        if m.role == "system":
            system.append(m.content)
        elif m.role == "tool":
            if not unanswered:
                raise ProviderError(
                    f"message {number} is a tool answer to no tool call: Anthropic needs the call it answers",
                    ErrorKind.VALIDATION,
                )
            index = next((i for i, (_, name) in enumerate(unanswered) if name == m.tool_name), 0)
            result = {"type": "tool_result", "tool_use_id": unanswered.pop(index)[0], "content": m.content}
            last = out[-1] if out else None
            if last is not None and last["role"] == "user" and isinstance(last["content"], list):
                last["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            for i, call in enumerate(m.tool_calls or ()):
                use = _tool_use(call, f"toolu_{number}_{i}")
                blocks.append(use)
                unanswered.append((use["id"], use["name"]))
            out.append({"role": "assistant", "content": blocks if m.tool_calls else m.content})
        else:
            out.append({"role": "user", "content": user_content(m.content, m.images)})
    return "\n\n".join(system), out


def user_content(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    """A user message's content: its text, or image blocks and then a text block."""
    if not images:
        return text
    blocks = [_image(image) for image in images]
    return blocks + [{"type": "text", "text": text}] if text else blocks


def _image(image: str) -> dict[str, Any]:
    """An image block for Ollama's bare base64 (its type read from the first bytes), a data URL or a URL."""
    if image.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": image}}
    if image.startswith("data:"):
        kind, _, data = image[5:].partition(";base64,")
        return {"type": "image", "source": {"type": "base64", "media_type": kind, "data": data}}
    kind = next((kind for start, kind in _IMAGE_TYPES.items() if image.startswith(start)), "image/png")
    return {"type": "image", "source": {"type": "base64", "media_type": kind, "data": image}}


def _tool_use(call: dict[str, Any], default_id: str) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = msgspec.json.decode(arguments) if arguments.strip() else {}
        except msgspec.DecodeError:
            arguments = {"input": arguments}  # Anthropic takes an object only
    return {
        "type": "tool_use",
        "id": call.get("id") or default_id,
        "name": function.get("name", ""),
        "input": arguments,
    }


def tool(tool: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's tool for Ollama's (OpenAI's) ``{"type": "function", "function": {...}}``; its own passes."""
    function = tool.get("function")
    if not isinstance(function, dict):
        return tool
    out = {"name": function.get("name", ""), "input_schema": function.get("parameters") or {"type": "object"}}
    if function.get("description"):
        out["description"] = function["description"]
    return out
