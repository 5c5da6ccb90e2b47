"""The WSGI app of the HTTP process: health, readiness and metrics, read from shared memory.

It runs in its own child of the supervisor under waitress, so the supervisor
stays single-threaded; every answer comes from the shared tables, never from
Redis or Ollama on the request path.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from llm_worker import __version__, logs
from llm_worker.config import Settings
from llm_worker.jobs import iso
from llm_worker.shm import Phase, SharedState, SlotState

log = logging.getLogger("llm_worker.http")
LIVE_STALE = 10.0  # seconds without a supervisor loop turn before liveness fails
REDIS_STALE = 5.0  # seconds without a Redis check before readiness stops trusting it

StartResponse = Callable[..., Any]
_encode = msgspec.json.Encoder().encode


class Health:
    """Answers about the host, from shared memory."""

    def __init__(self, settings: Settings, state: SharedState) -> None:
        self.settings = settings
        self.state = state

    def uptime(self) -> float:
        return time.time() - self.state.header.started

    def live(self) -> bool:
        return time.monotonic() - self.state.header.loop_beat < LIVE_STALE

    def workers_up(self) -> int:
        return sum(1 for s in self.state.slots if s.pid > 0 and s.state in (SlotState.IDLE, SlotState.BUSY))

    def not_ready(self) -> str | None:
        """Why the host should get no traffic now, or None when it is ready."""
        header = self.state.header
        phase = Phase(header.phase)
        if not self.live():
            return "supervisor loop is not turning"
        if phase == Phase.STARTING:
            return "starting"
        if phase in (Phase.DRAINING, Phase.STOPPING):
            return "draining"
        if not header.redis_up or time.monotonic() - header.redis_checked > REDIS_STALE:
            return "Redis unreachable"
        wanted = header.workers_wanted
        needed = math.ceil(wanted * self.settings.http.min_ready_workers)
        if self.workers_up() < max(1, needed) and wanted > 0:
            return f"{self.workers_up()} of {wanted} workers up, {needed} needed"
        return None


class ShmCollector(Collector):
    """Prometheus metrics computed at scrape time from the shared tables."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def collect(self) -> Iterable[Any]:
        state = self.health.state
        info = InfoMetricFamily("llm_worker_build", "Version of llm-worker running")
        info.add_metric([], {"version": __version__})
        yield info
        up = GaugeMetricFamily("llm_worker_redis_up", "Whether Redis answered the supervisor's last ping")
        up.add_metric([], float(state.header.redis_up))
        yield up
        workers = GaugeMetricFamily("llm_worker_workers", "Worker processes by state", labels=["state"])
        counts = {s.name.lower(): 0 for s in SlotState if s != SlotState.EMPTY}
        for slot in state.slots:
            if slot.pid > 0 and slot.state != SlotState.EMPTY:
                counts[SlotState(slot.state).name.lower()] += 1
        for name, count in counts.items():
            workers.add_metric([name], count)
        yield workers


class App:
    """The WSGI callable: a small route table over Health."""

    def __init__(self, settings: Settings, state: SharedState) -> None:
        self.health = Health(settings, state)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(ShmCollector(self.health))
        self.metrics = make_wsgi_app(registry)
        self.routes: dict[str, Callable[[dict[str, Any]], tuple[int, Any]]] = {
            "/": self.basic, "/health": self.basic, "/health/live": self.liveness, "/health/ready": self.readiness,
        }

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self.metrics(environ, start_response)
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            return _json(start_response, 404, {"error": "Not found"})
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _json(start_response, 405, {"error": "Method not allowed"})
        status, body = route(environ)
        return _json(start_response, status, body)

    def _base(self) -> dict[str, Any]:
        return {"timestamp": iso(), "uptime": round(self.health.uptime(), 3), "workerId": self.health.settings.worker.id}

    def basic(self, environ: dict[str, Any]) -> tuple[int, Any]:
        reason = self.health.not_ready()
        body = {"status": "healthy" if reason is None else "unhealthy", **self._base(), "version": __version__}
        if reason is not None:
            body["reason"] = reason
        return 200, body

    def liveness(self, environ: dict[str, Any]) -> tuple[int, Any]:
        if self.health.live():
            return 200, {"status": "alive", **self._base()}
        return 503, {"status": "dead", **self._base()}

    def readiness(self, environ: dict[str, Any]) -> tuple[int, Any]:
        reason = self.health.not_ready()
        base = self._base()
        del base["uptime"]
        if reason is None:
            return 200, {"status": "ready", **base}
        return 503, {"status": "not ready", "reason": reason, **base}


_REASONS = {200: "200 OK", 401: "401 Unauthorized", 404: "404 Not Found", 405: "405 Method Not Allowed", 503: "503 Service Unavailable"}


def _json(start_response: StartResponse, status: int, body: Any) -> list[bytes]:
    data = _encode(body)
    start_response(_REASONS.get(status, f"{status} Status"), [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")])
    return [data]


def serve(settings: Settings, state: SharedState, supervisor_pid: int) -> NoReturn:
    """The HTTP child's life: serve until the supervisor says stop, or dies."""
    import waitress

    logs.setup(settings.log, role="http", workerId=settings.worker.id)
    threading.Thread(target=_exit_with_parent, args=(supervisor_pid,), daemon=True, name="parent-watch").start()
    try:
        server = waitress.create_server(App(settings, state), host=settings.http.host, port=settings.http.port,
                                        threads=4, ident="llm-worker")
    except OSError as exc:
        log.error(f"cannot listen on {settings.http.host}:{settings.http.port}: {exc.strerror}")
        os._exit(1)
    log.info("HTTP listening", extra={"host": settings.http.host, "port": settings.http.port})
    try:
        server.run()
    finally:
        os._exit(0)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
