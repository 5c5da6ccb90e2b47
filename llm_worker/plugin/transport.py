"""JSON over HTTP for providers: one kept-alive connection per thread, deadlines, error kinds, streams.

The transport every provider plugin uses, built-in or not (``from
llm_worker.plugin import JsonHttp``): ``JsonHttp`` sends a request within a
job's ``Deadline`` and turns every failure into a ``ProviderError`` of the
right kind; ``lines`` and ``events`` read a streamed answer (NDJSON lines,
or Server-Sent Events) within it; a 429 becomes ``RateLimited`` with the wait
its headers ask for (``plugin/ratelimit.wait_from_headers``), unless its body
says the account is out of quota. A provider that reads its API's own error shape
subclasses ``JsonHttp`` and overrides ``error_of``.

A worker process runs one job at a time, so it needs one connection to its
provider, not a pool. We keep it with the standard library's http.client:
measured on the 2-core hosts this project targets, a call through it cost
~0.2 ms of CPU, through urllib3's pool ~0.45 ms and through a requests
Session ~1 ms, against a per-job budget of about 1 ms for everything. What a
pool would add is done here explicitly: a kept-alive connection the server
closed while idle is noticed before it is reused (as urllib3 does), and
OLLAMA_MAX_CONNECTIONS bounds the connections one process (its threads) uses.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import msgspec

from llm_worker import __version__
from llm_worker.host.backoff import compute_backoff
from llm_worker.plugin.providers import Deadline, ProviderError, RateLimited
from llm_worker.plugin.ratelimit import wait_from_headers
from llm_worker.protocol.jobs import ErrorKind

Classify = Callable[[int, str], ErrorKind]
Response = http.client.HTTPResponse
_encode = msgspec.json.Encoder().encode
_decode_error = msgspec.json.Decoder(dict[str, Any]).decode
_BROKEN = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)


class JsonHttp:
    """One base URL; one connection per calling thread.

    Retries within a call only what the server never saw or refused for load:
    failed connects, a kept-alive connection that died before the reply began,
    and the statuses ``retry_statuses`` (503 busy). Everything else is raised
    at once as a ProviderError, for the job-level retry, breaker and fallback;
    a 429 as ``RateLimited``, with the wait its headers ask for: the job waits
    that long in the delayed set, and other calls of the host with it.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        max_retries: int,
        retry_delay: float,
        classify: Classify,
        headers: dict[str, str] | None = None,
        retry_statuses: frozenset[int] = frozenset({503}),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/")
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"llm-worker/{__version__}",
            **(headers or {}),
        }
        self._local = threading.local()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[http.client.HTTPConnection] = set()
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.classify = classify
        self.retry_statuses = retry_statuses

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._local.__dict__.clear()

    def request(self, method: str, path: str, body: Any, deadline: Deadline, retries: int | None = None) -> Response:
        """Send one request; return its 2xx response, unread. ``retries``: in place of max_retries."""
        retries = self.max_retries if retries is None else retries
        payload = _encode(body) if body is not None else None
        what = f"{method} {path}"
        attempt = 0
        while True:
            left = deadline.check(what)
            try:
                resp = self._send(method, path, payload, left)
            except _Retryable as exc:
                error = ProviderError(f"{what}: {exc}", ErrorKind.NETWORK, unreachable=exc.unreachable)
            except socket.timeout:
                raise ProviderError(
                    f"{what}: no answer within {min(self.read_timeout, left):.1f}s", ErrorKind.TIMEOUT
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                # The connection broke after the request went out: the server may
                # have run it, so it is not repeated here (the job-level retry decides).
                raise ProviderError(f"{what}: connection broken: {_reason(exc)}", ErrorKind.PROVIDER) from None
            else:
                if 200 <= resp.status < 300:
                    return resp  # unread: the caller reads it whole (json) or line by line (lines)
                error = self.error_of(resp, what)
                if resp.status not in self.retry_statuses:
                    raise error
            attempt += 1
            if attempt > retries:
                raise error
            # Capped at the time left: a pause that would reach the deadline is not taken at all.
            left = deadline.left()
            pause = compute_backoff(attempt, self.retry_delay, cap=left)
            if pause >= left:
                raise error
            time.sleep(pause)

    def _send(self, method: str, path: str, payload: bytes | None, left: float) -> Response:
        conn, fresh = self._connection(left)
        timeout = min(self.read_timeout, left)
        try:
            conn.sock.settimeout(timeout)
            conn.request(method, self._path + path, body=payload, headers=self._headers)
            return conn.getresponse()
        except _BROKEN as exc:
            self._drop(conn)
            if not fresh:
                # A kept-alive connection the server closed between our check and
                # our request: it never read this one. Once more, on a new one.
                conn, _ = self._connection(left)
                conn.sock.settimeout(timeout)
                conn.request(method, self._path + path, body=payload, headers=self._headers)
                return conn.getresponse()
            raise exc from None
        except BaseException:
            self._drop(conn)
            raise

    def _connection(self, left: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, opened or reopened as needed; and whether it is new."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None and not _idle_and_open(conn.sock):
            self._drop(conn)
            conn = None
        if conn is not None and conn.sock is not None:
            return conn, False
        if conn is None:
            if not self._slots.acquire(timeout=max(0.0, left)):
                raise _Retryable(f"all {len(self._open)} connections to {self.base_url} are in use", unreachable=False)
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            extra = {"context": ssl.create_default_context()} if self._https else {}
            conn = kind(self._host, self._port, timeout=min(self.connect_timeout, left), **extra)
            self._local.conn = conn
            self._open.add(conn)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            self._drop(conn)
            raise _Retryable(f"cannot reach {self.base_url}: {_reason(exc)}", unreachable=True) from None
        return conn, True

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if conn in self._open:
            self._open.discard(conn)
            self._slots.release()
        if getattr(self._local, "conn", None) is conn:
            del self._local.conn

    def error_of(self, resp: Response, what: str) -> ProviderError:
        """The error a non-2xx answer is: its ``{"error": ...}`` message, its kind by ``classify``.

        Override it to read an API's own error shape (or its headers:
        ``resp.getheader("retry-after")``); ``resp`` is unread. Return, do not
        raise: ``request`` decides whether the status is retried first.
        """
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException):
            data = b""
        message = _message(data) or f"HTTP {resp.status}"
        if resp.status == 429 and _out_of_quota(data):
            # Out of credit or over a spend limit: waiting does not lift it, and every retry is refused alike.
            return ProviderError(f"{what}: {message}", ErrorKind.PROVIDER, status=429, retryable=False)
        if resp.status == 429:
            return RateLimited(f"{what}: {message}", retry_after=wait_from_headers(resp.getheader, time.time()))
        return ProviderError(f"{what}: {message}", self.classify(resp.status, message), status=resp.status)

    def json(
        self, method: str, path: str, body: Any, deadline: Deadline, type: Any = Any, retries: int | None = None
    ) -> Any:
        resp = self.request(method, path, body, deadline, retries)
        try:
            data = resp.read()
        except socket.timeout:
            raise ProviderError(f"{method} {path}: answer stalled", ErrorKind.TIMEOUT) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ProviderError(f"{method} {path}: answer cut: {_reason(exc)}", ErrorKind.PROVIDER) from None
        try:
            return msgspec.json.decode(data, type=type)
        except msgspec.MsgspecError as exc:
            raise ProviderError(
                f"{method} {path}: unexpected answer: {exc}", ErrorKind.PROVIDER, status=resp.status
            ) from None

    def lines(self, resp: Response, deadline: Deadline, what: str) -> Iterator[bytes]:
        """Yield the non-empty lines of a streamed answer, minding the deadline.

        A caller that stops at its last line calls ``finish(resp)`` so the
        connection can be reused; one that stops for an error leaves it, and
        the half-read connection is closed.
        """
        return self._read_lines(resp, deadline, what, keep_blank=False)

    def events(self, resp: Response, deadline: Deadline, what: str) -> Iterator[ServerSentEvent]:
        """Yield the Server-Sent Events of a streamed answer, minding the deadline (see ``sse_events``).

        Every line that arrives, a comment (a keep-alive) included, restarts
        the wait for the next byte (``read_timeout``); the job's deadline
        bounds the whole. Finish or stop as with ``lines``.
        """
        return sse_events(self._read_lines(resp, deadline, what, keep_blank=True))

    def _read_lines(self, resp: Response, deadline: Deadline, what: str, keep_blank: bool) -> Iterator[bytes]:
        conn = getattr(self._local, "conn", None)
        sock = conn.sock if conn is not None else None
        try:
            while True:
                if sock is not None:
                    sock.settimeout(max(0.001, min(self.read_timeout, deadline.check(what))))
                line = resp.readline()
                if not line:
                    return
                if keep_blank or line.strip():
                    yield line
                deadline.check(what)
        except socket.timeout:
            raise ProviderError(f"{what}: stream stalled", ErrorKind.TIMEOUT) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ProviderError(f"{what}: stream cut: {_reason(exc)}", ErrorKind.PROVIDER) from None
        finally:
            if not resp.isclosed():
                self._drop_current()

    def finish(self, resp: Response) -> None:
        """Read what is left of a finished stream (its last chunk), so the connection is reused."""
        try:
            resp.read()
        except (OSError, http.client.HTTPException):
            self._drop_current()

    def _drop_current(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._drop(conn)


class ServerSentEvent(NamedTuple):
    """One event of a ``text/event-stream``: its name (``message`` when it has none) and its data."""

    event: str
    data: bytes  # its data lines, joined with newlines


def sse_events(lines: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Read Server-Sent Events from an answer's lines, as the WHATWG event-stream rules say.

    Lines starting with ``:`` are comments, which servers send as keep-alives
    (OpenRouter's ``: OPENROUTER PROCESSING``), and are skipped; ``event:``
    names the event, each ``data:`` line adds to its data, ``id:`` and
    ``retry:`` are not used; a blank line ends the event, and one without data
    is no event. An event the stream ends in the middle of is dropped, as the
    rules say: a cut stream shows as a missing end, never as half an event.
    Closing this iterator closes ``lines``.
    https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
    """
    name, data = "", []
    try:
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if not line:
                if data:
                    yield ServerSentEvent(name or "message", b"\n".join(data))
                name, data = "", []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value.decode(errors="replace")
    finally:
        close = getattr(lines, "close", None)
        if close is not None:
            close()


class _Retryable(Exception):
    """The request never reached the server: safe to send again.

    ``unreachable``: no connection could be made at all (refused, no route,
    connect timeout), the sign that the server is down rather than busy.
    """

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _idle_and_open(sock: socket.socket) -> bool:
    """Whether a kept-alive socket is still open: readable now means EOF (or garbage)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


# The codes of a 429 that is a billing refusal, not a rate limit (OpenAI's error codes guide,
# https://platform.openai.com/docs/guides/error-codes: "You exceeded your current quota, please check your
# plan and billing details"; the spend and credit limits answer alike).
QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)


def _out_of_quota(data: bytes) -> bool:
    """Whether an OpenAI-shaped error body says the account is out of quota (its type or code)."""
    try:
        body = _decode_error(data)
    except msgspec.MsgspecError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and bool({error.get("type"), error.get("code")} & QUOTA_CODES)


def _message(data: bytes) -> str:
    try:
        body = _decode_error(data)
    except msgspec.MsgspecError:
        return data[:300].decode(errors="replace").strip()
    error = body.get("error")
    if isinstance(error, dict):  # the OpenAI shape: {"error": {"message": ...}}
        error = error.get("message")
    return str(error) if error else data[:300].decode(errors="replace")


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.split(": ", 1)[-1][:200] if "Errno" in text else text[:200]
