"""The /dashboard page: its three files, and the JSON it reads besides /status.

The page is plain HTML, CSS and one script shipped in this package
(package data): no build step, nothing fetched from elsewhere. It reads
/status (this host, from shared memory) and /dashboard/data (what only Redis
knows: the dead letters, the last events, every host's registered workers and
the queues' outcome counters) and calls the /admin routes with the operator's
token. Every response of the page carries a Content-Security-Policy that
allows only this origin's script and style, so that even a string that got
into the page's data unescaped could not run.

Dead letters hold the jobs as producers sent them, prompts included. The data
route shows a preview with every text replaced by its length, unless
LOG_PROMPTS is on and the request carries the admin token: the HTTP port
listens on every interface, and prompt text must not be one unauthenticated
GET away even where the operator lets it into the logs.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import msgspec

from llm_worker.host.layout import MAX_MODELS
from llm_worker.host.shm import SharedState
from llm_worker.protocol.jobs import iso
from llm_worker.queue.admin import QueueAdmin
from llm_worker.queue.reliable import registered_workers
from llm_worker.settings.config import Settings

StartResponse = Callable[..., Any]

# Only this origin's script, style and requests; no inline script or style, no frames, no forms posted.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
]
FILES = {
    "/dashboard": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}
DEAD_LETTERS = 20  # newest dead letters shown
EVENTS = 50  # newest events shown
HOST_WORKERS = 500  # registered workers read, all hosts together
PREVIEW = 600  # characters of a dead letter's payload preview
ERROR_SHOWN = 500  # characters of a dead letter's reason
TEXT_SHOWN = 200  # characters of one text kept in a preview when prompts may be shown
FRESH = 1.0  # seconds a data document is reused: many open tabs cost Redis one read a second
# Strings under these keys are ids, names and settings, never what a user wrote: a preview keeps them.
# Every other string (message contents, prompts, inputs, images, tool arguments, fields yet to come)
# is replaced by its length, so a field a producer adds tomorrow is hidden until named here.
SHOWN_KEYS = frozenset(
    {"id", "type", "userId", "model", "correlationId", "createdAt", "role", "keepAlive", "think", "tool_name"}
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The page's files, read once: they change only with the package."""
    folder = resources.files(__name__)
    out = {}
    for path, (name, content_type) in FILES.items():
        body = (folder / name).read_bytes()
        out[path] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return out


def serve_asset(asset: Asset, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """One file of the page. ``no-cache`` with an ETag: the browser asks each time and gets a 304 while the
    package is the same, and the new page at once after an upgrade (never a stale script against a new /status)."""
    headers = [("Cache-Control", "no-cache"), ("ETag", asset.etag), *SECURITY_HEADERS]
    if asset.etag in environ.get("HTTP_IF_NONE_MATCH", ""):
        start_response("304 Not Modified", headers)
        return []
    start_response("200 OK", [("Content-Type", asset.content_type), ("Content-Length", str(len(asset.body))), *headers])
    return [asset.body] if environ.get("REQUEST_METHOD") != "HEAD" else []


def hidden(text: str) -> str:
    return f"[hidden: {len(text)} chars]"


def redact(value: Any, show_text: bool, key: str = "") -> Any:
    """A job's JSON with the text a user wrote replaced by its length (or only shortened, with ``show_text``)."""
    if isinstance(value, dict):
        return {k: redact(v, show_text, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, show_text, key) for v in value]  # a list's items are what its key names (input: [...])
    if isinstance(value, str):
        if key in SHOWN_KEYS:
            return value[:TEXT_SHOWN]
        if show_text:
            return value if len(value) <= TEXT_SHOWN else value[:TEXT_SHOWN] + f"... [{len(value)} chars]"
        return hidden(value)
    return value


def dead_letter_row(raw: bytes, show_text: bool) -> dict[str, Any]:
    """One dead letter as the page shows it: why, when, where, and a preview of the payload."""
    try:
        entry = msgspec.json.decode(raw)
    except msgspec.MsgspecError:
        entry = {}
    if not isinstance(entry, dict):
        entry = {}
    job = entry.get("job")
    if isinstance(job, dict):
        preview = msgspec.json.encode(redact(job, show_text)).decode()
    elif isinstance(entry.get("raw"), str):  # not JSON, or not a job: no structure to walk, so all of it or none
        text = entry["raw"]
        preview = text[:PREVIEW] if show_text else f"not a job: {hidden(text)}"
    else:
        preview = ""
    job = job if isinstance(job, dict) else {}
    return {
        "queue": entry.get("queue"),
        "error": str(entry.get("error") or "")[:ERROR_SHOWN],
        "errorType": entry.get("errorType"),
        "failedAt": entry.get("failedAt"),
        "workerId": entry.get("workerId"),
        "attempts": entry.get("attempts"),
        "jobId": job.get("id") if isinstance(job.get("id"), str) else None,  # requeue needs it
        "type": job.get("type") if isinstance(job.get("type"), str) else None,
        "model": job.get("model") if isinstance(job.get("model"), str) else None,
        "preview": preview if len(preview) <= PREVIEW else preview[:PREVIEW] + "...",
    }


class DashboardData:
    """What /dashboard/data answers: the dead letters, events, hosts and queue counters, from Redis."""

    def __init__(self, settings: Settings, state: SharedState, admin: Callable[[], QueueAdmin]) -> None:
        self.settings = settings
        self.state = state
        self.admin = admin
        self._lock = threading.Lock()
        self._last: dict[bool, tuple[float, dict[str, Any]]] = {}

    def document(self, show_text: bool) -> dict[str, Any]:
        with self._lock:  # requests together share one read
            now = time.monotonic()
            cached = self._last.get(show_text)
            if cached is None or now - cached[0] >= FRESH:
                cached = self._last[show_text] = (now, self._read(show_text))
            return cached[1]

    def _read(self, show_text: bool) -> dict[str, Any]:
        admin = self.admin()
        client, keys = admin.redis, admin.keys
        pipe = client.pipeline(transaction=False)
        pipe.llen(keys.dead_letter)
        pipe.lrange(keys.dead_letter, 0, DEAD_LETTERS - 1)  # LPUSHed: the newest first
        pipe.xrevrange(keys.events, count=EVENTS)
        dead_total, dead, events = pipe.execute()
        return {
            "workerId": self.settings.worker.id,
            "timestamp": iso(),
            "admin": {"enabled": bool(self.settings.http.admin_token)},
            "promptsShown": show_text,
            "deadLetters": {
                "queue": keys.dead_letter,
                "total": dead_total,
                "newest": [dead_letter_row(raw, show_text) for raw in dead],
            },
            "events": [_event(entry_id, fields) for entry_id, fields in events],
            "queues": admin.stats(),  # completed and failed counters, all hosts: the page derives rates
            "hosts": self._hosts(admin),
            "modelsLastUsedSecondsAgo": self._last_used(),
        }

    def _hosts(self, admin: QueueAdmin) -> dict[str, list[dict[str, Any]]]:
        """Every host's registered workers, with the jobs each holds and whether its heartbeat is alive."""
        workers = sorted(registered_workers(admin.redis, admin.keys).items())[:HOST_WORKERS]
        pipe = admin.redis.pipeline(transaction=False)
        for wid, _ in workers:
            pipe.llen(admin.keys.processing(wid))
            pipe.exists(admin.keys.heartbeat(wid))
        replies = pipe.execute()
        hosts: dict[str, list[dict[str, Any]]] = {}
        for i, (wid, info) in enumerate(workers):
            hosts.setdefault(info.host, []).append(
                {
                    "workerId": wid,
                    "pid": info.pid,
                    "hostname": info.hostname,
                    "queue": info.queue,
                    "since": info.since,
                    "holding": replies[2 * i],
                    "alive": bool(replies[2 * i + 1]),
                }
            )
        return hosts

    def _last_used(self) -> dict[str, float | None]:
        """Seconds since a job of this host last used each model, on any of its endpoints (the call gate stamps
        each endpoint's row in shared memory)."""
        now = time.monotonic()
        endpoints = self.state.loads.endpoints[: max(1, self.state.providers.count)]
        out: dict[str, float | None] = {}
        for i, label in enumerate(self.state.model_labels()[:MAX_MODELS]):
            last = max(block.rows[i].last_used for block in endpoints)
            out[label] = round(now - last, 1) if last > 0 else None
        return out


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """One entry of the event stream (events carry ids, models and timings, never prompt text)."""
    try:
        data = msgspec.json.decode(fields.get(b"data", b"{}"))
    except msgspec.MsgspecError:
        data = {}
    millis = int(entry_id.split(b"-", 1)[0])
    return {
        "id": entry_id.decode(),
        "at": iso(millis / 1000),
        "type": fields.get(b"type", b"").decode(errors="replace"),
        "data": data if isinstance(data, dict) else {},
    }
