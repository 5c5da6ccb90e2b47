"""Armed faults: which request each one hits, and what Ollama (or OpenAI) would have said.

A fault's text is Ollama's for its reason, in the words of ``ollama_version``
(versions.py). Its status, unless the fault sets one, is Ollama's for where the
error arises:

- ``oom`` and ``runner`` fail the model's load, in the scheduler: every
  endpoint answers 500 (server/routes.go handleScheduleError, default case).
- ``crash``, ``run_oom`` and ``internal`` fail the call itself, once the model
  is loaded: /api/chat, /api/generate and /api/embeddings answer 500, but
  /api/embed (and /v1/embeddings, which runs it) 400: EmbedHandler answers
  every error of the embedding call that carries no status of its own with
  400 (v0.13.3 on; 500 before).
- ``busy`` 503, ``bad_request`` 400, ``not_found`` 404, ``rate_limit`` 429,
  ``overloaded`` 529 (Anthropic's; its text "Overloaded" in every API).

A status fault's ``retry_after`` goes out as a ``Retry-After`` header. Each
API words a reason as it would (its dialect's ``messages``, else Ollama's).

A stream_error breaks a 200 stream off, which only the runner dying under the
answer does in Ollama: its text is then "an error was encountered while
running the model: " and the runner's last error line (versions.py).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from http import HTTPStatus

from msgspec import structs

from llm_worker.devtools.simulator.config import Fault
from llm_worker.devtools.simulator.models import normalize_name, not_found_message
from llm_worker.devtools.simulator.versions import OllamaVersion

REASON_STATUS = {
    "oom": 500,
    "runner": 500,
    "crash": 500,
    "run_oom": 500,
    "busy": 503,
    "bad_request": 400,
    "not_found": 404,
    "internal": 500,
    "rate_limit": 429,
    "overloaded": 529,
}
STATUS_REASON = {400: "bad_request", 404: "not_found", 429: "rate_limit", 500: "runner", 503: "busy", 529: "overloaded"}
# Reasons no Ollama version has words for: how the API that has them says them.
FOREIGN_MESSAGES = {"overloaded": "Overloaded"}  # Anthropic's 529 (https://docs.anthropic.com/en/api/errors)
RUN_REASONS = frozenset({"crash", "run_oom", "internal"})  # errors of the call itself, not of the load
MIDSTREAM_REASONS = RUN_REASONS | {"oom", "runner"}  # a stream_error with one: the runner died mid-answer
EMBED_ENDPOINTS = frozenset({"embed", "openai_embeddings"})  # the routes that run EmbedHandler


def fault_reason(fault: Fault) -> str:
    """Return the reason a fault speaks for: its own, else one that fits its kind and status."""
    if fault.reason:
        return fault.reason
    if fault.kind == "stream_error":
        return "internal"
    return STATUS_REASON.get(fault.status or 500, "")


def fault_status(fault: Fault, endpoint: str, version: OllamaVersion) -> int:
    """Return the HTTP status a status fault answers with on this endpoint."""
    if fault.status is not None:
        return fault.status
    reason = fault_reason(fault)
    if reason in RUN_REASONS and endpoint in EMBED_ENDPOINTS:
        return version.embed_error_status()
    return REASON_STATUS.get(reason, 500)


def fault_message(fault: Fault, model: str | None, wording: str, version: OllamaVersion) -> str:
    """Return the error text a fault sends; ``wording`` is the missing-model text for its endpoint.

    A stream_error with a runner reason (or none) is the runner dying under
    the answer, whatever the reason's text would be at load time.
    """
    if fault.message is not None:
        return fault.message
    reason = fault_reason(fault)
    if fault.kind == "stream_error" and reason in MIDSTREAM_REASONS:
        return version.midstream_message(reason)
    if reason == "not_found":
        return not_found_message(model or "", wording)
    if reason:
        return version.messages().get(reason) or FOREIGN_MESSAGES[reason]
    try:
        return HTTPStatus(fault.status or 500).phrase.lower()
    except ValueError:  # a status with no phrase of its own (529)
        return f"status {fault.status}"


def retry_after_header(fault: Fault) -> bytes:
    """The header line of a fault's ``retry_after`` (none without one): seconds as a whole number where whole."""
    value = fault.retry_after
    if value is None:
        return b""
    text = value if isinstance(value, str) else str(int(value)) if float(value).is_integer() else str(value)
    return f"Retry-After: {text}\r\n".encode()


class _Armed:
    __slots__ = ("fault", "left", "model", "endpoints")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.left = fault.count
        self.model = normalize_name(fault.model) if fault.model else None
        self.endpoints = frozenset(fault.hits())


class FaultBook:
    """The faults in force, matched in order; the first that fires wins."""

    def __init__(self, faults: Iterable[Fault], seed: int) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._armed = _arm(faults)
        self.fired = 0

    def replace(self, faults: Iterable[Fault]) -> None:
        armed = _arm(faults)
        with self._lock:
            self._armed = armed

    def clear(self) -> None:
        self.replace(())

    def reset_fired(self) -> None:
        with self._lock:
            self.fired = 0

    def active(self) -> list[Fault]:
        """Return the faults still armed, each with its remaining count."""
        with self._lock:
            return [_with_count(a.fault, a.left) for a in self._armed]

    def pick(self, endpoint: str, model: str | None) -> Fault | None:
        """Return the fault that hits this request, spending one of its count."""
        if not self._armed:  # the common case, checked without the lock
            return None
        with self._lock:
            for armed in self._armed:
                if endpoint not in armed.endpoints or (armed.model and armed.model != model):
                    continue
                if armed.fault.probability < 1.0 and self._rng.random() >= armed.fault.probability:
                    continue
                if armed.left is not None:
                    armed.left -= 1
                    if armed.left <= 0:
                        self._armed = [a for a in self._armed if a is not armed]
                self.fired += 1
                return armed.fault
        return None


def _arm(faults: Iterable[Fault]) -> list[_Armed]:
    return [_Armed(f) for f in faults if f.count != 0]


def _with_count(fault: Fault, left: int | None) -> Fault:
    return fault if left == fault.count else structs.replace(fault, count=left)
