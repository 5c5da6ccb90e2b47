"""Live health probes of the provider, shared by every thread of the HTTP process that asks.

/health/ollama asks on each request, and the sampler asks on its period; a
burst of requests, or a request and the sampler together, must not turn into
a burst of GETs to Ollama. The rules:

- One probe in flight at a time. A caller that asks while one runs waits for
  its answer instead of starting another.
- An answer whose probe *started* less than ``fresh`` seconds ago (1 s) is
  reused, so Ollama is asked at most once a second, and no answer handed out
  describes Ollama as it was more than about a second ago.
- A caller waits at most its own timeout (and a small grace); past it, it gets
  a failed answer that says so, while the probe goes on for the others.
- Probes run on one thread of their own: a waitress thread never holds a
  connection to Ollama, so the process keeps one for its probes whatever
  OLLAMA_MAX_CONNECTIONS is, and a provider whose ``health`` overruns its
  deadline stalls only that thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_worker.plugin.providers import Health, Provider

log = logging.getLogger("llm_worker.http.liveprobe")
FRESH = 1.0  # seconds an answer is reused, counted from its probe's start
GRACE = 0.2  # seconds a caller waits past its timeout, for the probe's own timeout error to arrive first


@dataclass(frozen=True)
class Answer:
    health: Health
    provider: str  # the provider's name; "" when it could not be made
    started: float  # monotonic: when the probe began
    finished: float  # monotonic: when its answer came (for a caller that gave up: when it did)


class LiveProbe:
    """Single-flight, rate-limited ``health(timeout)`` calls to one provider (see the module docstring).

    ``provider`` makes the provider; it is called once, on the probe thread,
    at the first probe. ``on_answer`` is called on the probe thread with each
    probe's answer, before any caller sees it.
    """

    def __init__(
        self,
        provider: Callable[[], Provider],
        *,
        fresh: float = FRESH,
        on_answer: Callable[[Answer], None] | None = None,
    ) -> None:
        self._make = provider
        self.fresh = fresh
        self.on_answer = on_answer
        self._cond = threading.Condition()
        self._last: Answer | None = None
        self._wanted: float | None = None  # the timeout of the probe asked for or running; None: none is
        self._finished = 0  # probes finished so far: a waiter waits for this to move
        self._thread: threading.Thread | None = None
        self._provider: Provider | None = None
        self._failing = False

    def check(self, timeout: float) -> Answer:
        """A fresh answer: the last one if its probe started under ``fresh`` s ago, else the next probe's.

        Waits at most ``timeout`` (+ GRACE) seconds; a probe started here is
        given ``timeout``, one already in flight keeps its own.
        """
        give_up = time.monotonic() + timeout + GRACE
        with self._cond:
            last = self._last
            if last is not None and time.monotonic() - last.started < self.fresh:
                return last
            if self._wanted is None:
                self._wanted = timeout
                self._start()
                self._cond.notify_all()
            seen = self._finished
            while self._finished == seen:
                left = give_up - time.monotonic()
                if left <= 0:
                    now = time.monotonic()
                    error = f"no answer within {timeout:.1f}s (a probe is still waiting for one)"
                    failed = self._failed("no answer within the health check's timeout", error)
                    return Answer(failed, self._name(), now, now)
                self._cond.wait(left)
            assert self._last is not None
            return self._last

    def last(self) -> Answer | None:
        """The last probe's answer, however old; None before the first."""
        return self._last

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="provider-probe", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._wanted is None:
                    self._cond.wait()
                timeout = self._wanted
            started = time.monotonic()
            health = self._probe(timeout)
            answer = Answer(health, self._name(), started, time.monotonic())
            if self.on_answer is not None:
                try:
                    self.on_answer(answer)
                except Exception:  # a failing hook must not leave the callers waiting
                    log.exception("handling a provider probe's answer failed")
            with self._cond:
                self._last = answer
                self._wanted = None
                self._finished += 1
                self._cond.notify_all()

    def _probe(self, timeout: float) -> Health:
        try:
            if self._provider is None:
                self._provider = self._make()
            health = self._provider.health(timeout=timeout)
        except Exception as exc:  # health() should not raise; a plugin's may, and the route must still answer
            if not self._failing:
                log.warning("the provider's health probe raised", extra={"error": repr(exc)})
            self._failing = True
            return self._failed("the provider's health probe failed", repr(exc)[:255])
        self._failing = False
        return health

    def _name(self) -> str:
        return self._provider.name if self._provider is not None else ""

    def _failed(self, message: str, error: str) -> Health:
        return Health(ok=False, message=message, url=str(getattr(self._provider, "url", "")), error_details=error)
