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

from llm_worker.plugin import BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPENED, Record, StashKey, hookimpl

if TYPE_CHECKING:
    from llm_worker.plugin import WorkerContext

__all__ = ["llm_worker_record", "llm_worker_worker_started"]

log = logging.getLogger(__name__)

BREAKER_STATES = {BREAKER_OPENED: "opened", BREAKER_HALF_OPEN: "half_open", BREAKER_CLOSED: "closed"}


class StatsD:
    """One process's StatsD client: its own non-blocking UDP socket, the agent's address, the prefix."""

    def __init__(self, sock: socket.socket, address: tuple[Any, ...], prefix: str) -> None:
        self.sock = sock
        self.address = address  # as getaddrinfo gives it: resolved once, not per send
        self.prefix = prefix

    def record(self, event: Record) -> None:
        """Send a job outcome's counter and timer, or a breaker transition's counter."""
        if event.outcome is not None:
            tags = _tags({"queue": event.queue, "model": event.model, "type": event.job_type})
            lines = [f"{self.prefix}.jobs.{event.outcome}:1|c{tags}"]
            if event.duration is not None:
                lines.append(f"{self.prefix}.job.duration:{event.duration * 1000:.3f}|ms{tags}")
            self.send("\n".join(lines))  # one datagram: StatsD reads one metric per line
        elif event.type in BREAKER_STATES:
            self.send(f"{self.prefix}.breaker.{BREAKER_STATES[event.type]}:1|c{_tags({'model': event.model})}")

    def send(self, payload: str) -> None:
        try:
            self.sock.sendto(payload.encode(), self.address)
        except OSError:  # a full buffer, nobody listening (ICMP refused): drop the metric
            pass


# Where each process keeps its StatsD client: on the stash of the process's WorkerContext.
CLIENT = StashKey[StatsD]()


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    """Resolve the StatsD address once and open this process's non-blocking UDP socket."""
    host = os.environ.get("STATSD_HOST", "127.0.0.1")
    port = int(os.environ.get("STATSD_PORT", "8125"))  # not a number: the worker does not boot, and says why
    prefix = os.environ.get("STATSD_PREFIX", "llm_worker")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as exc:  # no DNS now must not stop the jobs: this process sends no metrics
        log.warning(f"statsd: cannot resolve {host}:{port} ({exc}); no StatsD metrics from {worker.worker_id}")
        return
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    worker.stash[CLIENT] = StatsD(sock, address, prefix)


@hookimpl
def llm_worker_record(event: Record, worker: WorkerContext) -> None:
    client = worker.stash.get(CLIENT)
    if client is not None:  # None where the address did not resolve
        client.record(event)


def _tags(tags: dict[str, str | None]) -> str:
    """DogStatsD tags, ``|#key:value,...``; queue and model names cannot hold ``,``, ``|`` or ``#``."""
    present = ",".join(f"{key}:{value}" for key, value in tags.items() if value)
    return f"|#{present}" if present else ""
