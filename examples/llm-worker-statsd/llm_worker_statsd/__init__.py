"""StatsD metrics for llm-worker, as a metric sink: job outcomes, durations and breaker events.

Read from the environment when each process starts: STATSD_HOST (default
127.0.0.1), STATSD_PORT (8125) and STATSD_PREFIX (llm_worker). Sends, with
DogStatsD tags, one UDP datagram per event:

    <prefix>.jobs.<outcome>:1|c|#queue:<q>,model:<m>,type:<t>   completed, failed, retried, rejected
    <prefix>.job.duration:<ms>|ms|#queue:<q>,model:<m>,type:<t>
    <prefix>.breaker.<state>:1|c|#model:<m>                     opened, half_open, closed

A tag whose value is unknown (a rejected payload has no model) is left out.
Sends never block and never raise: a lost datagram is a lost metric, never a
slower or failed job.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from llm_worker.plugin import BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPENED, Record, hookimpl

if TYPE_CHECKING:
    from llm_worker.plugin import WorkerContext

__all__ = ["llm_worker_record", "llm_worker_worker_started"]

log = logging.getLogger(__name__)

BREAKER_STATES = {BREAKER_OPENED: "opened", BREAKER_HALF_OPEN: "half_open", BREAKER_CLOSED: "closed"}

# One socket per process, opened after fork by llm_worker_worker_started.
_sock: socket.socket | None = None
_address: tuple[Any, ...] = ("127.0.0.1", 8125)  # as getaddrinfo gives it: resolved once, not per send
_prefix = "llm_worker"


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    """Resolve the StatsD address once and open this process's non-blocking UDP socket."""
    global _sock, _address, _prefix
    host = os.environ.get("STATSD_HOST", "127.0.0.1")
    port = int(os.environ.get("STATSD_PORT", "8125"))  # not a number: the worker does not boot, and says why
    _prefix = os.environ.get("STATSD_PREFIX", "llm_worker")
    try:
        family, kind, proto, _, _address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as exc:  # no DNS now must not stop the jobs: this process sends no metrics
        log.warning(f"statsd: cannot resolve {host}:{port} ({exc}); no StatsD metrics from {worker.worker_id}")
        return
    _sock = socket.socket(family, kind, proto)
    _sock.setblocking(False)


@hookimpl
def llm_worker_record(event: Record) -> None:
    """Send a job outcome's counter and timer, or a breaker transition's counter."""
    if _sock is None:
        return
    if event.outcome is not None:
        tags = _tags({"queue": event.queue, "model": event.model, "type": event.job_type})
        lines = [f"{_prefix}.jobs.{event.outcome}:1|c{tags}"]
        if event.duration is not None:
            lines.append(f"{_prefix}.job.duration:{event.duration * 1000:.3f}|ms{tags}")
        _send(_sock, "\n".join(lines))  # one datagram: StatsD reads one metric per line
    elif event.type in BREAKER_STATES:
        _send(_sock, f"{_prefix}.breaker.{BREAKER_STATES[event.type]}:1|c{_tags({'model': event.model})}")


def _tags(tags: dict[str, str | None]) -> str:
    """DogStatsD tags, ``|#key:value,...``; queue and model names cannot hold ``,``, ``|`` or ``#``."""
    present = ",".join(f"{key}:{value}" for key, value in tags.items() if value)
    return f"|#{present}" if present else ""


def _send(sock: socket.socket, payload: str) -> None:
    try:
        sock.sendto(payload.encode(), _address)
    except OSError:  # a full buffer, nobody listening (ICMP refused): drop the metric
        pass
