"""The WSGI app of the HTTP process: health, readiness, status, metrics and admin routes.

It runs in its own child of the supervisor under waitress, so the supervisor
stays single-threaded. Health, readiness, status and metrics answer from
shared memory, never from Redis or Ollama on the request path; the admin
routes, which operators call by hand, read Redis; /health/ollama asks Ollama
live, as the service this replaced did, through the sampler's LiveProbe (one
probe in flight, at most one a second). /dashboard is a page over /status,
/dashboard/data (Redis: dead letters, events) and the admin routes (see dashboard.py).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn
from urllib.parse import parse_qs

import msgspec
import redis
from prometheus_client import CollectorRegistry, make_wsgi_app

from llm_worker import __version__, logs
from llm_worker.host.breaker import Breakers, breaker_record
from llm_worker.host.layout import Phase, SlotState
from llm_worker.host.procs import exit_with_parent, worker_id
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.http.dashboard import DashboardData, load_assets, serve_asset
from llm_worker.http.liveprobe import Answer, LiveProbe
from llm_worker.http.metrics import ShmCollector
from llm_worker.models.fleet import FleetSeen
from llm_worker.plugin.context import WorkerContext
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.protocol.jobs import iso
from llm_worker.queue.admin import QueueAdmin
from llm_worker.queue.connection import connect
from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.http.app")
LIVE_STALE = 10.0  # seconds without a supervisor loop turn before liveness fails
REDIS_STALE = 5.0  # seconds without a Redis check before readiness stops trusting it
UNLOAD_TIMEOUT = 10.0  # seconds for Ollama to answer an unload by hand (as `llm-worker models unload`)
THREADS = 8  # waitress's request threads
# /health/ollama requests that may wait on a probe at once: a hanging Ollama holds each
# for up to HEALTHCHECK_TIMEOUT, and the other threads must stay free for liveness.
OLLAMA_WAITING = THREADS // 2

StartResponse = Callable[..., Any]
Route = Callable[[dict[str, Any]], tuple[int, Any]]
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
        return sum(1 for s in self.state.slots if s.up())

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
        needed = max(1, math.ceil(wanted * self.settings.http.min_ready_workers))
        if wanted > 0 and self.workers_up() < needed:
            return f"{self.workers_up()} of {wanted} workers up, {needed} needed"
        if not header.models_ready:
            return "preloading models"
        paused = self.paused_pools()
        if paused and len(paused) == len({s.pool for s in self.state.slots if s.pid > 0}):
            return "every pool takes no jobs: " + "; ".join(f"{pool}: {why}" for pool, why in paused.items())
        return None

    def paused_pools(self) -> dict[str, str]:
        from llm_worker.http.status import pool_pauses

        return pool_pauses(self.state)


class App:
    """The WSGI callable: a route table over Health and the shared tables."""

    def __init__(
        self, settings: Settings, state: SharedState, live: LiveProbe, fleet: Callable[[], FleetSeen] | None = None
    ) -> None:
        self.settings = settings
        self.state = state
        self.health = Health(settings, state)
        self.live = live
        self.fleet = fleet  # the sampler's last look at the fleet (model affinity), for /status
        self._ollama_waiting = threading.BoundedSemaphore(OLLAMA_WAITING)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ShmCollector(settings, state))
        self.metrics = make_wsgi_app(registry)
        self._admin: QueueAdmin | None = None
        self._providers: list[Any] | None = None  # the Ollama providers, for unloads by hand (made on the first)
        self.routes: dict[str, Route] = {
            "/": self.basic,
            "/health": self.basic,
            "/health/live": self.liveness,
            "/health/ready": self.readiness,
            "/health/ollama": self.ollama,
            "/status": self.status,
            "/dashboard/data": self.dashboard_data,
        }
        self.assets = load_assets()  # /dashboard and its files
        self.dashboard = DashboardData(settings, state, self._queue_admin)
        self.admin_routes: dict[str, Route] = {
            "/admin/queue/stats": self.queue_stats,
            "/admin/breakers": self.breakers_list,
        }
        self.admin_actions: dict[str, Route] = {
            f"/admin/breakers/{action}": self._breaker_action(action)
            for action in ("force-open", "force-close", "reset")
        }
        self.admin_actions.update(
            {
                "/admin/queue/requeue": self.requeue,
                "/admin/queue/purge": self.purge,
                "/admin/models/unload": self.unload_model,
            }
        )
        self.breakers = Breakers(state.breakers, state.lock, settings)
        self.plugins: PluginManager | None = None  # set by serve(): breaker events go to the sinks

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path in self.admin_actions or path in self.admin_routes:
            denied = self._denied(environ)
            if denied is not None:
                return _json(start_response, *denied)
            route = (self.admin_actions if method == "POST" else self.admin_routes).get(path)
            if route is None:
                return _json(start_response, 405, {"error": "Method not allowed"})
            return self._answer(start_response, route, environ)
        if method not in ("GET", "HEAD"):
            return _json(start_response, 405, {"error": "Method not allowed"})
        if path == "/metrics":
            return self.metrics(environ, start_response)
        if path == "/dashboard" and environ.get("PATH_INFO", "").endswith("/"):
            # The page's paths are relative to /dashboard (it may sit under a proxy's prefix): at /dashboard/
            # they would name /dashboard/dashboard/...; the browser goes to the page's one address instead.
            start_response("301 Moved Permanently", [("Location", "../dashboard"), ("Content-Length", "0")])
            return []
        asset = self.assets.get(path)
        if asset is not None:
            return serve_asset(asset, environ, start_response)
        route = self.routes.get(path)
        if route is None:
            return _json(start_response, 404, {"error": "Not found"})
        return self._answer(start_response, route, environ)

    def _answer(self, start_response: StartResponse, route: Route, environ: dict[str, Any]) -> list[bytes]:
        try:
            status, body = route(environ)
        except redis.RedisError as exc:
            status, body = 503, {"error": f"Redis unreachable: {exc}"}
        return _json(start_response, status, body)

    def _denied(self, environ: dict[str, Any]) -> tuple[int, Any] | None:
        token = self.settings.http.admin_token
        if not token:  # admin routes are off unless a token is set
            return 404, {"error": "Not found"}
        if not self._token_given(environ):
            return 401, {"error": "a bearer token is required (Authorization: Bearer <ADMIN_TOKEN>)"}
        return None

    def _token_given(self, environ: dict[str, Any]) -> bool:
        """Whether the request carries the admin token (False when none is set)."""
        token = self.settings.http.admin_token
        scheme, _, credential = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        return (
            bool(token)
            and scheme.lower() == "bearer"
            and hmac.compare_digest(credential.strip().encode(), token.encode())
        )

    # ---- health ---------------------------------------------------------------

    def _base(self) -> dict[str, Any]:
        return {"timestamp": iso(), "uptime": round(self.health.uptime(), 3), "workerId": self.settings.worker.id}

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
            # Some pools may be paused (their models' breakers open) while others serve: still ready, and said.
            paused = self.health.paused_pools()
            return 200, {"status": "ready", **base, **({"pausedPools": paused} if paused else {})}
        return 503, {"status": "not ready", "reason": reason, **base}

    def ollama(self, environ: dict[str, Any]) -> tuple[int, Any]:
        """Whether Ollama answers a GET now (HEALTHCHECK_TIMEOUT): 200 if it did, else 503.

        With several Ollama servers (OLLAMA_BASE_URL), 200 while at least one
        answers; ``endpoints`` has each one's answer and ``down`` the URLs of
        those that did not. Requests that arrive together share one probe, and
        an answer whose probe started under a second ago is reused (see
        liveprobe). At most OLLAMA_WAITING requests wait on a probe at once;
        any more are answered at once with the last probe's answer
        (``checkedSecondsAgo`` says how old), or 503 "unknown" before there is one.
        """
        url = self.settings.ollama.base_url
        if self._ollama_waiting.acquire(blocking=False):
            try:
                answer: Answer | None = self.live.check(self.settings.http.healthcheck_timeout)
            finally:
                self._ollama_waiting.release()
        else:
            answer = self.live.last()
        if answer is None:
            return 503, {
                "status": "unknown",
                "message": "not probed yet",
                "url": url,
                "error_details": f"{OLLAMA_WAITING} requests already wait on the first probe; ask again",
            }
        health = answer.health
        age = round(max(0.0, time.monotonic() - answer.finished), 1)
        each = {
            "endpoints": [
                {
                    "endpoint": p.endpoint,
                    "url": p.health.url,
                    "status": "healthy" if p.health.ok else "unhealthy",
                    "version": p.health.version or None,
                    "error_details": None if p.health.ok else (p.health.error_details or p.health.message),
                }
                for p in answer.endpoints
            ],
            "down": [p.health.url for p in answer.down],
        }
        if health.ok:
            several = len(answer.endpoints) > 1
            return 200, {
                "status": "healthy",
                "message": f"Ollama server is reachable{f' ({health.message})' if several and answer.down else ''}.",
                "url": url,
                "error_details": health.error_details if answer.down else None,
                "version": health.version or "",
                "checkedSecondsAgo": age,
                **each,
            }
        # The provider's own message: "Ollama is not reachable", or what to set when Ollama refused us.
        return 503, {
            "status": "unhealthy",
            "message": health.message,
            "url": url,
            "error_details": health.error_details or health.message,
            "checkedSecondsAgo": age,
            **each,
        }

    # ---- status and admin -----------------------------------------------------------

    def status(self, environ: dict[str, Any]) -> tuple[int, Any]:
        from llm_worker.http.status import snapshot

        fleet = self.fleet() if self.fleet is not None else None
        return 200, snapshot(self.settings, self.state, self.health.not_ready(), fleet)

    def breakers_list(self, environ: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"enabled": self.breakers.enabled, "breakers": self.breakers.rows()}

    def _breaker_action(self, action: str) -> Route:
        def act(environ: dict[str, Any]) -> tuple[int, Any]:
            key = parse_qs(environ.get("QUERY_STRING", "")).get("key", [""])[0]
            if not key:
                return 400, {"error": f"say which breaker: POST /admin/breakers/{action}?key=<provider>:<model>"}
            if not self.breakers.force(key, action):
                return 404, {"error": f"no breaker {key!r}"}
            for t in self.breakers.transitions:
                log.warning(f"circuit breaker {t.to}: {t.key}: {t.reason}")
                if self.plugins is not None:
                    self.plugins.record(breaker_record(t, worker_id(self.settings.worker.id, os.getpid())))
            self.breakers.transitions.clear()
            row = next(r for r in self.breakers.rows() if r["key"] == key)
            return 200, row

        return act

    def _queue_admin(self) -> QueueAdmin:
        if self._admin is None:
            self._admin = QueueAdmin(connect(self.settings, timeout=2.0), self.settings)
        return self._admin

    def queue_stats(self, environ: dict[str, Any]) -> tuple[int, Any]:
        return 200, self._queue_admin().stats()

    def dashboard_data(self, environ: dict[str, Any]) -> tuple[int, Any]:
        # Prompt text only where the operator allowed it in the logs, and only to a holder of the admin token.
        return 200, self.dashboard.document(self.settings.log.prompts and self._token_given(environ))

    def requeue(self, environ: dict[str, Any]) -> tuple[int, Any]:
        """Dead letters back to the end of their queues: one (``?id=JOB_ID``) or every one (``?all=1``)."""
        query = parse_qs(environ.get("QUERY_STRING", ""))
        job_id, every = query.get("id", [""])[0], query.get("all", [""])[0] in ("1", "true")
        if bool(job_id) == every:
            return 400, {"error": "say which: POST /admin/queue/requeue?id=<job id> or ?all=1"}
        moved, skipped = self._queue_admin().requeue(job_id or None)
        if job_id and not moved:
            return 404, {"error": f"no dead letter of job {job_id!r}"}
        log.warning(f"requeued {moved} dead letter(s) by an operator", extra={"jobId": job_id or None})
        return 200, {"requeued": moved, "notRequeued": skipped}

    def purge(self, environ: dict[str, Any]) -> tuple[int, Any]:
        """Empty one of this host's queues, or the dead-letter list (``?queue=NAME``), parked jobs included."""
        name = parse_qs(environ.get("QUERY_STRING", "")).get("queue", [""])[0]
        admin = self._queue_admin()
        # Only lists the settings name as queues: any other list in Redis (a worker's processing list,
        # say) is not the page's to delete; `llm-worker queues purge` can, after asking.
        known = [*admin.queues(), self.settings.queue.dead_letter]
        if name not in known:
            return 404, {"error": f"no queue {name!r}; this host's queues: {', '.join(known)}"}
        purged = admin.purge(name) or 0
        log.warning(f"purged {purged} job(s) from {name} by an operator", extra={"queue": name})
        return 200, {"queue": name, "purged": purged}

    def unload_model(self, environ: dict[str, Any]) -> tuple[int, Any]:
        """Ask Ollama to unload a model now (``?model=NAME``, ``&endpoint=NAME`` with several Ollama servers),
        as `llm-worker models unload` does.

        Refused while a worker of this host is calling the model: the model manager never unloads one in
        use, nor does this. The manager sees the model gone on its next look at Ollama.
        """
        query = parse_qs(environ.get("QUERY_STRING", ""))
        model, endpoint = query.get("model", [""])[0], query.get("endpoint", [""])[0]
        if not model:
            return 400, {"error": "say which model: POST /admin/models/unload?model=<name>"}
        labels = self.state.model_labels()
        busy = {s.model for s in self.state.slots if s.up() and s.state == SlotState.BUSY and s.model >= 0}
        label = model_label(model)
        # Index 0 counts the models past the label table: while one of those is busy, any unlabelled one may be.
        if (labels.index(label) if label in labels else 0) in busy:
            return 409, {"error": f"{model} is in use by a worker of this host; try again when its jobs are done"}
        provider = self._ollama(endpoint)
        if provider is None:
            return 404, {"error": f"no Ollama endpoint {endpoint!r} here" if endpoint else "no Ollama provider here"}
        try:
            provider.unload(model, Deadline(UNLOAD_TIMEOUT))
        except ProviderError as exc:
            return 502, {"error": exc.message}
        log.warning(f"model unloaded by an operator: {model}", extra={"model": label})
        return 200, {"unloaded": model}

    def _ollama(self, endpoint: str) -> Any:
        """The Ollama provider of an endpoint (the first without one), from the plugin's, made once; None when
        there is no such endpoint or the plugin is disabled."""
        from llm_worker.plugins.ollama import OllamaProvider

        if self._providers is None and self.plugins is not None:
            self._providers = [p for p in self.plugins.providers(self.settings) if isinstance(p, OllamaProvider)]
        mine = [p for p in self._providers or [] if not endpoint or getattr(p, "endpoint", None) == endpoint]
        return mine[0] if mine else None


_REASONS = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    502: "502 Bad Gateway",
    503: "503 Service Unavailable",
}


def _json(start_response: StartResponse, status: int, body: Any) -> list[bytes]:
    data = _encode(body)
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store")]
    if status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="llm-worker"'))
    start_response(_REASONS.get(status, f"{status} Status"), headers)
    return [data]


MAX_BODY = 64 * 1024
MAX_HEADERS = 64 * 1024


def serve(settings: Settings, state: SharedState, supervisor_pid: int, plugins: list[Found]) -> NoReturn:
    """The HTTP child's life: sample and serve until the supervisor says stop, or dies."""
    import waitress

    from llm_worker.http.sampler import Sampler

    logs.setup(settings.log, role="http", workerId=settings.worker.id)
    threading.Thread(target=exit_with_parent, args=(supervisor_pid,), daemon=True, name="parent-watch").start()
    sampler = Sampler(settings, state, plugins)
    app = App(settings, state, sampler.live, lambda: sampler.fleet_seen)
    try:
        # No route reads a body (admin actions take their arguments in the query), so
        # waitress refuses big ones with 413 instead of buffering up to its 1 GiB default.
        server = waitress.create_server(
            app,
            host=settings.http.host,
            port=settings.http.port,
            threads=THREADS,
            ident="llm-worker",
            channel_timeout=30,
            max_request_body_size=MAX_BODY,
            max_request_header_size=MAX_HEADERS,
        )
    except OSError as exc:
        log.error(f"cannot listen on {settings.http.host}:{settings.http.port}: {exc.strerror}")
        os._exit(1)
    app.plugins = PluginManager().load(plugins)
    try:
        app.plugins.worker_started(
            WorkerContext(settings, worker_id(settings.worker.id, os.getpid()), "http", None, state, None)
        )
    except Exception:
        log.exception("a plugin failed to start in the HTTP process; its sink may be silent here")
    sampler.start()
    state.header.http_bound = 1
    log.info("HTTP listening", extra={"host": settings.http.host, "port": settings.http.port})
    try:
        server.run()
    finally:
        os._exit(0)
