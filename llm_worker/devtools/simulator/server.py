"""HTTP on top of the engine: a keep-alive ThreadingHTTPServer, and the Simulator that runs it.

Bound to a loopback address, it refuses requests whose Host header names a
host Ollama would not serve there, as server/routes.go allowedHostsMiddleware
does (v0.33), before any route, with an empty 403: allowed are a missing
host, "localhost", the machine's own hostname, names ending in .localhost,
.local or .internal, and IP addresses that are loopback, private (10/8,
172.16/12, 192.168/16, fc00::/7), unspecified or the machine's own. Bound to
any other address it serves every Host. The /_sim control routes are never
refused.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import msgspec

from llm_worker.devtools.simulator.config import Fault, SimulatorConfig
from llm_worker.devtools.simulator.engine import Engine, RequestContext
from llm_worker.devtools.simulator.faults import (
    RUN_REASONS,
    fault_message,
    fault_reason,
    fault_status,
    retry_after_header,
)
from llm_worker.devtools.simulator.models import normalize_name
from llm_worker.devtools.simulator.protocol import NDJSON, OLLAMA, SSE, ApiError, Dialect, Reply, StreamReply
from llm_worker.devtools.simulator.routes import BY_HEADER, ROUTES, Route
from llm_worker.devtools.simulator.stats import ClientGone, SimStats, Stopping
from llm_worker.devtools.simulator.versions import is_out_of_memory

# Response heads are assembled from bytes made once: this path bounds every benchmark.
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}
_STREAM_HEADS = {
    kind: _STATUS_LINES[200] + b"Content-Type: " + kind + b"\r\nTransfer-Encoding: chunked\r\n"
    for kind in (NDJSON, SSE)
}
_STREAM_END = b"0\r\n\r\n"
# gin's serveError, with HandleMethodNotAllowed as Ollama sets it: plain text, no charset.
_NOT_FOUND = Reply(404, b"404 page not found", b"text/plain")
_NOT_ALLOWED = Reply(405, b"405 method not allowed", b"text/plain")
_PATHS = frozenset(path for _, path in ROUTES)
_FORBIDDEN = Reply(403, b"", b"")  # gin's AbortWithStatus: no body, no Content-Type
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {
    route.body: msgspec.json.Decoder(route.body) for route in ROUTES.values() if route.body
}
HANG_POLL_SECONDS = 0.5  # how often a hung request checks whether its client has left
# netip.Addr.IsPrivate: RFC 1918 and RFC 4193 only (Python's is_private takes in much more).
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


class SimRequestHandler(BaseHTTPRequestHandler):
    """Answer one keep-alive connection's requests from the route table."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each response waits ~40 ms on delayed ACKs
    server: SimHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # per-request logging would cost more than the request

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        key = (method, self.path.partition("?")[0])
        route = ROUTES.get(key)
        alternate = BY_HEADER.get(key)
        if alternate is not None and any(name in self.headers for name in alternate[0]):
            route = alternate[1]  # another API's route at the same path, told apart by its headers
        self._counted = route is None or route.name != "_sim"  # stats tell of Ollama traffic only
        self._dialect: Dialect = route.dialect if route is not None else OLLAMA
        self._endpoint = route.name if route is not None else ""
        body = self._read_body()
        if body is None:
            return
        if self._counted and not self.server.host_allowed(self.headers.get("Host")):
            self._send(_FORBIDDEN, head_only=method == "HEAD")
            return
        engine = self.server.engine
        engine.bind(RequestContext(endpoint=self._endpoint, gone=self._client_left))
        try:
            self._answer(method, route, body)
        finally:
            engine.unbind()

    def _answer(self, method: str, route: Route | None, body: bytes) -> None:
        fault = None
        if route is None:
            reply: Reply | StreamReply = _NOT_ALLOWED if self.path.partition("?")[0] in _PATHS else _NOT_FOUND
        else:
            try:
                request, fault = self._admit(route, body)
                reply = route.handler(self.server.engine, request)
            except ApiError as exc:
                reply = self._dialect.error(exc.status, exc.message)
                if exc.headers:
                    reply = Reply(reply.status, reply.body, reply.content_type, reply.headers + exc.headers)
            except (Stopping, ClientGone):
                self.close_connection = True
                return
        try:
            if isinstance(reply, StreamReply):
                self._send_stream(reply, fault)
            else:
                self._send_whole(reply, fault, head_only=method == "HEAD")
        except (Stopping, ClientGone, OSError):
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        """Return the request body, or None after refusing the request."""
        length = self.headers.get("Content-Length")
        if length is None and "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send(self._dialect.error(411, "send the body with a Content-Length"))
            return None
        try:
            return self.rfile.read(int(length)) if length else b""
        except ValueError:
            self.close_connection = True
            self._send(self._dialect.error(400, f"bad Content-Length {length!r}"))
            return None

    def _admit(self, route: Route, body: bytes) -> tuple[Any, Fault | None]:
        """Decode and count the request, then act on its fault.

        A status fault raises its ApiError, a hang holds the request here, an
        abort goes to the handler (through the request's context); a stream
        fault is returned for the sender to act on.
        """
        if route.name == "_sim":
            return _decode(route, body), None
        engine = self.server.engine
        try:
            if route.dialect.authorize is not None:
                route.dialect.authorize(self.headers, engine.config.api_key)
            request = _decode(route, body)
        except ApiError:
            engine.counters.request(route.name, None)
            raise
        asked = getattr(request, "model", "") or None
        model = normalize_name(asked) if asked else None
        engine.counters.request(route.name, model)
        fault = engine.faults.pick("load" if _loads_only(route.name, request) else route.name, model)
        if fault is None or fault.kind in ("stream_error", "cut"):
            return request, fault
        if fault.kind == "status":
            status = fault_status(fault, route.name, engine.version)
            raise ApiError(status, self._fault_text(fault, asked), retry_after_header(fault))
        if fault.kind == "abort":
            engine.context().abort = fault
        else:
            self._hang(fault.seconds)
        return request, None

    def _hang(self, seconds: float | None) -> None:
        """Hold the request unanswered; give up when the client leaves or the simulator stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            wait = HANG_POLL_SECONDS if deadline is None else min(HANG_POLL_SECONDS, deadline - time.monotonic())
            if wait <= 0:
                return
            if self.server.engine.stopping.wait(wait):
                raise Stopping
            if self._client_left():
                raise ClientGone

    def _client_left(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _send_whole(self, reply: Reply, fault: Fault | None, head_only: bool) -> None:
        if fault is not None and reply.status == 200:
            if fault.kind == "cut":
                self.close_connection = True  # the client sees the connection close, no answer
                return
            reply = self._dialect.error(500, self._fault_text(fault))
        self._send(reply, head_only)

    def _send(self, reply: Reply, head_only: bool = False) -> None:
        if self._counted:
            self.server.engine.counters.response(reply.status)
        kind = b"Content-Type: %s\r\n" % reply.content_type if reply.content_type else b""
        head = b"%s%sContent-Length: %d\r\n%s%s\r\n" % (
            _status_line(reply.status),
            kind,
            len(reply.body),
            reply.headers,
            b"Connection: close\r\n" if self.close_connection else b"",
        )
        self.wfile.write(head if head_only else head + reply.body)

    def _send_stream(self, reply: StreamReply, fault: Fault | None) -> None:
        """Send each line as its own chunk as soon as it is produced."""
        try:
            if (
                fault is not None
                and fault.kind == "stream_error"
                and fault.after_chunks == 0
                and self._dialect is OLLAMA
            ):
                # routes.go streamResponse: an error before any line is written goes out as the
                # whole answer, JSON with its status (500: the error carries none of its own).
                self._send(self._dialect.error(500, self._fault_text(fault)))
                return
            self.server.engine.counters.response(200)
            # The head goes out with the first chunk, after the first-byte latency.
            self._head = _STREAM_HEADS[self._dialect.stream_type] + reply.headers + b"\r\n"
            if fault is None:
                for chunk in reply.lines:
                    self._send_chunk(chunk)
            elif not self._send_until_fault(reply, fault):
                return
            self.wfile.write(self._head + _STREAM_END)
        finally:
            reply.close()

    def _send_until_fault(self, reply: StreamReply, fault: Fault) -> bool:
        """Send lines until the fault's turn; return False if the connection was cut."""
        lines = iter(reply.lines)
        ahead = next(lines, None)
        sent = 0
        while ahead is not None:
            # Look one line ahead, so that the fault lands before the final line at the latest.
            current, ahead = ahead, next(lines, None)
            if sent == fault.after_chunks or ahead is None:
                break
            self._send_chunk(current)
            sent += 1
        if fault.kind == "cut":
            self.wfile.write(self._head)
            self.close_connection = True
            return False
        status = fault_status(fault, self._endpoint, self.server.engine.version)
        self._send_chunk(self._dialect.stream_error(status, self._fault_text(fault)))
        return True

    def _send_chunk(self, chunk: bytes) -> None:
        self.wfile.write(b"%s%x\r\n%s\r\n" % (self._head, len(chunk), chunk))
        self._head = b""

    def _fault_text(self, fault: Fault, model: str | None = None) -> str:
        """Return the fault's error text; one of the call itself that says out of memory expires every model."""
        engine = self.server.engine
        own = self._dialect.messages.get(fault_reason(fault)) if fault.message is None else None
        if own is not None:  # another API's words for it (Anthropic's, OpenRouter's): no Ollama runner behind
            return own.format(model=model or "")
        text = fault_message(
            fault,
            model,
            engine.config.not_found_style or engine.version.not_found_wording(self._endpoint),
            engine.version,
        )
        if (fault.kind == "stream_error" or fault_reason(fault) in RUN_REASONS) and is_out_of_memory(text):
            engine.scheduler.expire_all()  # routes.go: s.sched.expireRunnersForRuntimeOOM
        return text


def _split_host_port(host: str) -> str:
    """Return the host of a Host header as Go's net.SplitHostPort does; on its error, the whole header."""
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        return inside if bracket and rest.startswith(":") and ":" not in rest[1:] else host
    name, colon, _ = host.partition(":")
    return name if colon and host.count(":") == 1 else host


def _own_addresses(hostname: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The machine's own addresses, as far as its name resolves (Go's isLocalIP asks the interfaces)."""
    try:
        infos = socket.getaddrinfo(hostname, None)
    except OSError:
        return frozenset()
    return frozenset(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)


def _status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Status %d\r\n" % (status, status)


def _decode(route: Route, body: bytes) -> Any:
    if route.body is None:
        return None
    if not body:
        raise ApiError(400, "missing request body")
    try:
        return _DECODERS[route.body].decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise ApiError(400, f"invalid options: {text}" if "$.options" in text else text) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, str(exc)) from None


class SimHTTPServer(ThreadingHTTPServer):
    """A thread per connection; stop() may still find some of them blocked, so it closes their sockets."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], engine: Engine) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.engine = engine
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, SimRequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall for seconds without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        # allowedHostsMiddleware checks Host only on a loopback listener.
        self._check_hosts = ipaddress.ip_address(self.server_name.split("%")[0]).is_loopback
        self._hostname = socket.gethostname().lower()
        self._own_addresses: frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
        self._hosts_seen: dict[str | None, bool] = {}

    def host_allowed(self, header: str | None) -> bool:
        """Return whether Ollama would serve a request with this Host header here (remembered: a hot path)."""
        if not self._check_hosts:
            return True
        allowed = self._hosts_seen.get(header)
        if allowed is None:
            if len(self._hosts_seen) > 1024:
                self._hosts_seen.clear()
            allowed = self._hosts_seen[header] = self._judge_host(header)
        return allowed

    def _judge_host(self, header: str | None) -> bool:
        host = _split_host_port(header or "")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            name = host.lower()
            return name in ("", "localhost", self._hostname) or name.endswith(_LOCAL_SUFFIXES)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # netip unmaps before IsLoopback and IsPrivate
        if address.is_loopback or address.is_unspecified or any(address in net for net in _PRIVATE):
            return True
        if self._own_addresses is None:  # resolved on first need: a lookup can stall without DNS
            self._own_addresses = _own_addresses(self._hostname)
        return address in self._own_addresses

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients that vanish are business as usual
            super().handle_error(request, client_address)

    def track(self, connection: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Simulator:
    """An Ollama look-alike served from a background thread.

    ``with Simulator(SimulatorConfig(...)) as sim:`` starts it; ``sim.url`` is
    its address. A stopped simulator cannot start again; make a new one
    (with the old port, to come back where it was).
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._engine = Engine(self.config)
        self._server: SimHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    def start(self) -> Simulator:
        if self._engine.stopping.is_set():
            raise RuntimeError("a stopped simulator cannot start again; make a new one")
        if self._server is None:
            self._server = SimHTTPServer((self.config.host, self.config.port), self._engine)
            self._port = self._server.server_port
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"ollama-simulator:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def set_faults(self, faults: Iterable[Fault]) -> None:
        """Replace the faults in force."""
        self._engine.faults.replace(faults)

    def clear_faults(self) -> None:
        self._engine.faults.clear()

    def stats(self) -> SimStats:
        return self._engine.stats()

    def reset(self) -> None:
        """Forget the stats and unload every model; faults stay."""
        self._engine.reset()

    def stop(self) -> None:
        """Stop serving at once: held and waiting requests are dropped, connections closed."""
        self._engine.stop()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _loads_only(endpoint: str, request: Any) -> bool:
    """Whether a request has nothing to answer and only loads or unloads its model (Ollama's empty request)."""
    if endpoint == "chat":
        return not getattr(request, "messages", None)
    if endpoint == "generate":
        return not getattr(request, "prompt", None)
    if endpoint == "embed":
        return not getattr(request, "input", None)
    return False
