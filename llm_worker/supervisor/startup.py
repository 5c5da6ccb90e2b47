"""What the supervisor refuses at start, before it forks anything: a Redis too old, a WORKER_ID in use.

Each is a mistake that would otherwise show as a crash loop (every worker
failing on its first BLMOVE) or, worse, as two hosts recovering each other's
live jobs (two supervisors beating and sweeping under one WORKER_ID). The
caller stops with the message and exit code 2.
"""

from __future__ import annotations

import psutil

from llm_worker.host.procs import alive
from llm_worker.queue.connection import RedisTooOld, refuse_old_redis
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo


def refusal(rq: ReliableQueue, host_id: str, own_hostname: str, heartbeat_ms: int) -> str | None:
    """Why this supervisor must not start on this Redis, or None. Raises redis.RedisError if Redis does not answer."""
    try:
        refuse_old_redis(rq.redis)
    except RedisTooOld as exc:
        return str(exc)
    holders = live_holders(rq, host_id, own_hostname)
    if not holders:
        return None
    hostnames = sorted({info.hostname for info in holders})
    pids = ", ".join(str(info.pid) for info in sorted(holders, key=lambda i: i.pid))
    supervisors = sorted({p for info in holders if info.hostname == own_hostname and (p := _parent(info.pid))})
    where = f"host {', '.join(hostnames)}"
    if supervisors:
        where += f" (supervisor pid {', '.join(map(str, supervisors))})"
    return (
        f"WORKER_ID={host_id!r} is in use by a live supervisor on {where}, whose workers (pids {pids}) are beating "
        f"in Redis: two supervisors with one WORKER_ID would recover each other's jobs. Give this one another "
        f"WORKER_ID, or stop that one; if it died, start again once its heartbeats expire "
        f"(WORKER_HEARTBEAT_TIMEOUT, {heartbeat_ms} ms)."
    )


def live_holders(rq: ReliableQueue, host_id: str, own_hostname: str) -> list[WorkerInfo]:
    """Registered workers of ``host_id`` that are alive: heartbeat key present, and on this machine a live pid.

    A worker of an earlier run on this machine whose pid is gone is no holder, even while
    its heartbeat lasts: the start recovers its jobs at once (Recovery.previous_incarnation).
    """
    candidates = [
        (worker, info)
        for worker, info in rq.registered().items()
        if info.host == host_id and (info.hostname != own_hostname or _running(info.pid))
    ]
    if not candidates:
        return []
    pipe = rq.redis.pipeline(transaction=False)
    for worker, _ in candidates:
        pipe.exists(rq.keys.heartbeat(worker))
    return [info for (_, info), beating in zip(candidates, pipe.execute()) if beating]


def _running(pid: int) -> bool:
    """A process with this pid exists and is not a zombie (a killed worker whose reaper has not waited yet)."""
    if not alive(pid):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # another user's: it exists
        return True


def _parent(pid: int) -> int | None:
    try:
        parent = psutil.Process(pid).ppid()
    except psutil.Error:  # gone, or not ours to see: the hostname and worker pids say enough
        return None
    return parent if parent > 1 else None
