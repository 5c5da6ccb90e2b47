"""Live health probes of the provider's endpoints, shared by every thread of the HTTP process that asks.

One probe asks every endpoint of the provider (each Ollama of OLLAMA_BASE_URL)
at once, each on a thread of its own, and answers when all have: the host's
provider is up when any endpoint is, and the answer says which are down.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llm_worker.plugin.providers import Health, Provider, endpoint_of

log = logging.getLogger("llm_worker.http.liveprobe")
FRESH = 1.0  # seconds an answer is reused, counted from its probe's start
GRACE = 0.2  # seconds a caller waits past its timeout, for the probe's own timeout error to arrive first


@dataclass(frozen=True)
class Probed:
    """One endpoint's answer."""

    endpoint: str  # its name: "ollama", "ollama@2"
    health: Health


@dataclass(frozen=True)
class Answer:
    health: Health  # the provider's: ok when any endpoint is (see ``whole``)
    provider: str  # the provider's name; "" when it could not be made
    started: float  # monotonic: when the probe began
    finished: float  # monotonic: when its answer came (for a caller that gave up: when it did)
    endpoints: tuple[Probed, ...] = ()  # each endpoint's own, in order

    @property
    def down(self) -> list[Probed]:
        return [p for p in self.endpoints if not p.health.ok]


class LiveProbe:
    """Single-flight, rate-limited ``health(timeout)`` calls to one provider's endpoints (see the module docstring).

    ``providers`` makes the provider objects, one per endpoint; it is called
    once, on the probe thread, at the first probe. ``on_answer`` is called on
    the probe thread with each probe's answer, before any caller sees it.
    """

    def __init__(
        self,
        providers: Callable[[], Sequence[Provider]],
        *,
        fresh: float = FRESH,
        on_answer: Callable[[Answer], None] | None = None,
    ) -> None:
        self._make = providers
        self.fresh = fresh
        self.on_answer = on_answer
        self._cond = threading.Condition()
        self._last: Answer | None = None
        self._wanted: float | None = None  # the timeout of the probe asked for or running; None: none is
        self._finished = 0  # probes finished so far: a waiter waits for this to move
        self._thread: threading.Thread | None = None
        self._providers: Sequence[Provider] | None = None
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
                    each = tuple(Probed(endpoint_of(p), failed) for p in self._providers or ())
                    return Answer(failed, self._name(), now, now, each)
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
            each = self._probe(timeout)
            answer = Answer(whole([p.health for p in each]), self._name(), started, time.monotonic(), tuple(each))
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

    def _probe(self, timeout: float) -> list[Probed]:
        """Every endpoint's health, asked at once (one alone: on this thread)."""
        try:
            if self._providers is None:
                self._providers = list(self._make())
        except Exception as exc:  # a plugin that cannot make its provider: the route must still answer
            return [Probed("", self._health_failed(None, exc))]
        providers = self._providers
        if len(providers) == 1:
            return [Probed(endpoint_of(providers[0]), self._health(providers[0], timeout))]
        out: list[Probed | None] = [None] * len(providers)

        def ask(i: int) -> None:
            out[i] = Probed(endpoint_of(providers[i]), self._health(providers[i], timeout))

        threads = [threading.Thread(target=ask, args=(i,), daemon=True) for i in range(len(providers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [p for p in out if p is not None]

    def _health(self, provider: Provider, timeout: float) -> Health:
        try:
            health = provider.health(timeout=timeout)
        except Exception as exc:  # health() should not raise; a plugin's may, and the route must still answer
            return self._health_failed(provider, exc)
        self._failing = False
        return health

    def _health_failed(self, provider: Provider | None, exc: Exception) -> Health:
        if not self._failing:
            log.warning("the provider's health probe raised", extra={"error": repr(exc)})
        self._failing = True
        url = str(getattr(provider, "url", ""))
        return Health(ok=False, message="the provider's health probe failed", url=url, error_details=repr(exc)[:255])

    def _name(self) -> str:
        return self._providers[0].name if self._providers else ""

    def _failed(self, message: str, error: str) -> Health:
        url = str(getattr(self._providers[0], "url", "")) if self._providers else ""
        return Health(ok=False, message=message, url=url, error_details=error)


def whole(each: list[Health]) -> Health:
    """The provider's health from its endpoints': up when any is (the first that is), down when none is.

    With several, ``error_details`` names those that are down, by URL.
    """
    if len(each) == 1:
        return each[0]
    up = [h for h in each if h.ok]
    down = "; ".join(f"{h.url}: {h.error_details or h.message}" for h in each if not h.ok) or None
    if up:
        message = up[0].message if len(up) == len(each) else f"{len(up)} of {len(each)} endpoints answer"
        return Health(ok=True, message=message, url=up[0].url, version=up[0].version, error_details=down)
    first = each[0] if each else Health(ok=False, message="no provider", url="")
    return Health(ok=False, message=first.message, url=first.url, error_details=down or first.error_details)
