"""Armed faults: which request each one hits, and what Ollama (or OpenAI) would have said."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable
from http import HTTPStatus

from msgspec import structs

from llm_worker.simulator.config import INFERENCE_ENDPOINTS, Fault
from llm_worker.simulator.models import normalize_name, not_found_message

# Ollama's own words for each failure the simulator imitates.
MESSAGES = {
    "oom": "model requires more system memory (12.3 GiB) than is available (4.0 GiB)",
    "runner": "llama runner process has terminated: signal: killed",
    "busy": "server busy, please try again.  maximum pending requests exceeded",
    "bad_request": "invalid request",
    "internal": "an error was encountered while running the model: unexpected EOF",
    "rate_limit": "Rate limit reached for requests. Please try again in 1s.",  # OpenAI's, for /v1 drills
}
REASON_STATUS = {"oom": 500, "runner": 500, "busy": 503, "bad_request": 400, "not_found": 404, "internal": 500,
                 "rate_limit": 429}
STATUS_REASON = {400: "bad_request", 404: "not_found", 429: "rate_limit", 500: "runner", 503: "busy"}


def fault_status(fault: Fault) -> int:
    """Return the HTTP status a status fault answers with."""
    if fault.status is not None:
        return fault.status
    return REASON_STATUS[fault.reason] if fault.reason else 500


def fault_message(fault: Fault, model: str | None, style: str) -> str:
    """Return the error text a fault sends, in Ollama's words where it has some."""
    if fault.message is not None:
        return fault.message
    reason: str = fault.reason or ("internal" if fault.kind == "stream_error" else
                                   STATUS_REASON.get(fault_status(fault), ""))
    if reason == "not_found":
        return not_found_message(model or "", style)
    if reason:
        return MESSAGES[reason]
    return HTTPStatus(fault_status(fault)).phrase.lower()


class _Armed:
    __slots__ = ("fault", "left", "model", "endpoints")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.left = fault.count
        self.model = normalize_name(fault.model) if fault.model else None
        self.endpoints = frozenset(fault.endpoints or INFERENCE_ENDPOINTS)


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
