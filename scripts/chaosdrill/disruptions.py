"""The disruptions: each runs to its end and returns what it did, for the report."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
import psutil
import redis

from chaosdrill.drill import (
    CHAT_MODEL,
    HEARTBEAT_MS,
    JOB_TIMEOUT_MS,
    MAX_JOB_BYTES,
    QUEUE_OF,
    SUPERVISOR_KILL_GRACE,
    SWEEP,
    TIMEOUT_GRACE_MS,
    Drill,
    Host,
    Pushed,
)
from llm_worker.devtools.localredis import LocalRedis

# ---- disruptions: each runs to its end and returns what it did ------------------------------------


def wait_gone(r: redis.Redis, keys: list[str], since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until none of ``keys`` exists (the lists were recovered); None on timeout."""
    while time.monotonic() - since < timeout:
        if not keys or not r.exists(*keys):
            return round(time.monotonic() - since, 3)
        time.sleep(0.02)
    return None


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_workers(drill: Drill) -> dict[str, Any]:
    """SIGKILL two random workers, busy ones first; time until what they held is back in a queue."""
    r = drill.r
    busy = drill.busy_workers()
    idle = [(h, w) for h in drill.hosts for w in h.worker_ids(r) if (h, w) not in busy]
    drill.rng.shuffle(busy)
    drill.rng.shuffle(idle)
    victims = (busy + idle)[:2]
    held = [w for _, w in victims if r.llen(f"llm:processing:{w}")]
    killed_at = time.monotonic()
    for _, worker_id in victims:
        os.kill(int(worker_id.rsplit(":", 1)[1]), signal.SIGKILL)
    seconds = wait_gone(r, [f"llm:processing:{w}" for w in held], killed_at, 30)
    if held:
        drill.reclaims.append({"what": "worker SIGKILLed", "workers": held, "seconds": seconds})
    return {"workers": [w for _, w in victims], "holding": held, "reclaimSeconds": seconds}


def stop_worker(drill: Drill) -> dict[str, Any]:
    """SIGSTOP a busy worker and leave it: its supervisor must kill it past its job's timeout and recover its job."""
    r = drill.r
    deadline = time.monotonic() + 10
    while not (busy := drill.busy_workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not busy:
        return {"skipped": "no busy worker within 10 s"}
    _, worker_id = drill.rng.choice(busy)
    pid = int(worker_id.rsplit(":", 1)[1])
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    limit = (JOB_TIMEOUT_MS + TIMEOUT_GRACE_MS) / 1000 + SUPERVISOR_KILL_GRACE + 20
    try:
        while not process_gone(pid) and time.monotonic() - stopped_at < limit:
            time.sleep(0.05)
        killed = round(time.monotonic() - stopped_at, 2) if process_gone(pid) else None
        seconds = wait_gone(r, [f"llm:processing:{worker_id}"], stopped_at, limit)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGCONT)  # never leave a stopped process behind
    drill.reclaims.append({"what": "worker stopped past its job's timeout", "workers": [worker_id], "seconds": seconds})
    return {"worker": worker_id, "killedAfterSeconds": killed, "reclaimSeconds": seconds}


def _jobs_held_by_host(r: redis.Redis, host: Host) -> dict[str, int]:
    return {key.decode(): int(r.llen(key)) for key in r.scan_iter(f"llm:processing:{host.name}:*") if r.llen(key)}


def _wait_until_host_holds_jobs(drill: Drill, host: Host) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while not (held := _jobs_held_by_host(drill.r, host)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def kill_host(drill: Drill) -> dict[str, Any]:
    """SIGKILL a whole supervisor with its workers; the other host must recover its jobs; then start it again."""
    host = drill.hosts[sum(h.starts for h in drill.hosts) % 2]  # take turns
    other = next(h for h in drill.hosts if h is not host)
    _wait_until_host_holds_jobs(drill, host)
    assert host.service is not None
    killed_at = time.monotonic()
    host.service.kill_all()
    # What it holds now that it is dead: a job it acknowledged between the look and the kill is not a recovery.
    held = _jobs_held_by_host(drill.r, host)
    seconds = wait_gone(drill.r, list(held), killed_at, 3 * HEARTBEAT_MS / 1000 + 30)
    recovery = {
        "host": host.name,
        "recoveredBy": other.name,
        "jobsHeld": sum(held.values()),
        "workersHolding": len(held),
        "seconds": seconds,
        "heartbeatTimeoutSeconds": HEARTBEAT_MS / 1000,
        "how": "killed",
        "withinExpiry": within_expiry(seconds),
    }
    if held:
        drill.host_recoveries.append(recovery)
        drill.reclaims.append(
            {"what": "host SIGKILLed", "workers": [k.rsplit("processing:", 1)[1] for k in held], "seconds": seconds}
        )
    restart_at = time.monotonic()
    host.start()
    return {**recovery, "restartSeconds": round(time.monotonic() - restart_at, 1)}


def within_expiry(seconds: float | None) -> bool:
    """Recovered once the dead host's heartbeats expired and another host's next sweep ran (0.5 s when busy)."""
    return seconds is not None and seconds <= HEARTBEAT_MS / 1000 + SWEEP + 0.5


def _items_held_by_host(r: redis.Redis, host: Host) -> set[tuple[bytes, bytes]]:
    """Each job the host holds now, as (processing list, payload)."""
    return {(key, item) for key in r.scan_iter(f"llm:processing:{host.name}:*") for item in r.lrange(key, 0, -1)}


def _freeze_with_a_fresh_job(drill: Drill, host: Host, group: int) -> tuple[float, dict[str, int], int]:
    """SIGSTOP the host just after one of its workers took a job, and while it still holds it.

    A job taken moments before the freeze has its whole timeout ahead of it, so
    when the host wakes its worker is not killed for hanging: it finishes the
    job, which was recovered meanwhile, and the fence must drop that late
    outcome. Returns with the host stopped: when, what it holds, and the tries.
    """
    give_up = time.monotonic() + 30
    tries = 0
    seen = _items_held_by_host(drill.r, host)
    while True:
        time.sleep(0.02)
        now = _items_held_by_host(drill.r, host)
        fresh, seen = now - seen, now
        if not fresh and time.monotonic() < give_up:
            continue
        tries += 1
        frozen_at = time.monotonic()
        os.killpg(group, signal.SIGSTOP)
        try:
            still = _items_held_by_host(drill.r, host)
        except BaseException:
            os.killpg(group, signal.SIGCONT)
            raise
        if fresh & still or time.monotonic() >= give_up:
            return frozen_at, _jobs_held_by_host(drill.r, host), tries
        os.killpg(group, signal.SIGCONT)
        seen = _items_held_by_host(drill.r, host)


def _late_outcomes_dropped(host: Host) -> int:
    return sum(1 for e in host.log() if str(e.get("message", "")).startswith("job no longer ours"))


def freeze_host(drill: Drill) -> dict[str, Any]:
    """SIGSTOP a whole host past its heartbeat expiry, then SIGCONT it.

    The other host recovers its jobs while it is frozen; when it wakes, its
    workers finish jobs that are no longer theirs, and the fence must drop
    those outcomes: the freeze lands just after a worker took a job, so there
    is always at least one, and this waits for the fence's word on it.
    """
    host = drill.hosts[drill.rng.randrange(2)]
    assert host.service is not None
    group = host.service.pid
    dropped_before = _late_outcomes_dropped(host)
    frozen_at, held, tries = _freeze_with_a_fresh_job(drill, host, group)
    try:
        seconds = wait_gone(drill.r, list(held), frozen_at, 3 * HEARTBEAT_MS / 1000 + 30)
    finally:
        os.killpg(group, signal.SIGCONT)
    # Its workers' outcomes for the recovered jobs: within a job's timeout, unless recovery never came.
    woke = time.monotonic()
    limit = (JOB_TIMEOUT_MS + TIMEOUT_GRACE_MS) / 1000 + SUPERVISOR_KILL_GRACE + 2
    dropped = 0
    while seconds is not None and time.monotonic() - woke < limit:
        dropped = _late_outcomes_dropped(host) - dropped_before
        if dropped >= sum(held.values()):
            break
        time.sleep(0.1)
    recovery = {
        "host": host.name,
        "recoveredBy": next(h.name for h in drill.hosts if h is not host),
        "jobsHeld": sum(held.values()),
        "workersHolding": len(held),
        "seconds": seconds,
        "heartbeatTimeoutSeconds": HEARTBEAT_MS / 1000,
        "how": "frozen",
        "withinExpiry": within_expiry(seconds),
        "lateOutcomesDropped": dropped,
        "freezeTries": tries,
    }
    if held:
        drill.host_recoveries.append(recovery)
    return recovery


def restart_redis(drill: Drill) -> dict[str, Any]:
    """SIGKILL Redis, keep it down a moment, start it again on the same port and AOF.

    With Sentinel: SIGKILL the master; a replica is promoted, and the old
    master comes back as its replica.
    """
    if drill.group is not None:
        return _fail_over(drill, planned=False)
    outage = round(drill.rng.uniform(0.5, 3.0), 1)
    drill.redis.kill()
    time.sleep(outage)
    drill.redis.start()
    return {"downSeconds": outage}


def planned_failover(drill: Drill) -> dict[str, Any]:
    """SENTINEL FAILOVER: the master is demoted while it still takes writes, a replica promoted."""
    assert drill.group is not None
    return _fail_over(drill, planned=True)


def _fail_over(drill: Drill, planned: bool) -> dict[str, Any]:
    group = drill.group
    assert group is not None
    group.wait_watched(60)  # a failover needs the sentinels to know each other and the replica
    old = group.master()
    began = time.monotonic()
    if planned:
        group.failover()
    else:
        old.kill()
    new = group.wait_new_master(old.port, timeout=60)
    seconds = round(time.monotonic() - began, 2)
    if not planned:
        old.start()  # stale, until the sentinels make it a replica of the new master
    deadline = time.monotonic() + 60
    while not _in_sync_replica(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {
        "oldMaster": old.port,
        "newMaster": new.port,
        "failoverSeconds": seconds,
        "oldMasterReplicaAfterSeconds": round(time.monotonic() - began, 1) if _in_sync_replica(old) else None,
    }


def _in_sync_replica(server: LocalRedis) -> bool:
    try:
        info = server.client().info("replication")
    except redis.RedisError:
        return False
    return (
        info.get("role") == "slave"
        and info.get("master_link_status") == "up"
        and not info.get("master_sync_in_progress")
    )


def _provider_fault(drill: Drill, *faults: dict[str, Any], hold: float = 2.5) -> dict[str, Any]:
    drill.sim("POST", "/_sim/faults", {"faults": list(faults)})
    time.sleep(hold)
    drill.sim("DELETE", "/_sim/faults")
    return {"faults": list(faults), "seconds": hold}


def provider_500(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"status": 500, "reason": "runner", "probability": 0.5})


def provider_503(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"status": 503, "reason": "busy", "probability": 0.6})


def provider_hangs(drill: Drill) -> dict[str, Any]:
    """Requests held with no answer: only the job's own deadline frees the worker."""
    return _provider_fault(drill, {"kind": "hang", "probability": 0.3})


def streams_cut(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"kind": "cut", "after_chunks": 2, "probability": 0.5})


def slow_loads(drill: Drill) -> dict[str, Any]:
    """Unload every model, as an evicting Ollama would: the next requests wait for a (slow) load."""
    loaded = sorted({m["name"] for ps in drill.sim("GET", "/api/ps") for m in ps["models"]})
    for name in loaded:  # a host that does not have it loaded answers at once
        drill.sim("POST", "/api/generate", {"model": name, "keep_alive": 0})
    time.sleep(2.0)
    return {"unloaded": loaded, "loadSeconds": drill.args.load_ms / 1000}


def malformed_payloads(drill: Drill) -> dict[str, Any]:
    """Payloads that are not runnable jobs; each must be dead-lettered, and answered when it names an id."""
    client = drill.producer()
    variants: list[tuple[str, bool, Callable[[str], bytes]]] = [
        ("not JSON", False, lambda k: f"not json at all {k}".encode()),
        ("binary", False, lambda k: b"\xff\xfe\x00 binary " + k.encode()),
        ("array", False, lambda k: msgspec.json.encode([k, 1, 2])),
        ("no id", False, lambda k: msgspec.json.encode({"no": "id", "tag": k})),
        ("unusable id", False, lambda k: msgspec.json.encode({"id": f"bad id/{k}", "type": "chat"})),
        (
            "bad role",
            True,
            lambda k: msgspec.json.encode(
                {
                    "id": k,
                    "type": "chat",
                    "userId": "chaos",
                    "model": CHAT_MODEL,
                    "request": {"messages": [{"role": "wizard", "content": "x"}]},
                }
            ),
        ),
        (
            "unknown type",
            True,
            lambda k: msgspec.json.encode({"id": k, "type": "dance", "userId": "chaos", "request": {}}),
        ),
        (
            "oversized",
            True,
            lambda k: (
                b'{"id": "' + k.encode() + b'", "type": "chat", "request": {"messages": [{"role": '
                b'"user", "content": "' + b"x" * (MAX_JOB_BYTES + 100) + b'"}]}}'
            ),
        ),
    ]
    for name, has_id, build in variants:
        key = drill.next_key()
        queue = drill.rng.choice(list(set(QUEUE_OF.values())))
        drill.push(client, Pushed(key, f"malformed:{name}", has_id), queue, build(key))
    return {"payloads": len(variants)}


DISRUPTIONS: list[tuple[str, Callable[[Drill], dict[str, Any]]]] = [
    ("kill workers", kill_workers),
    ("stop a worker past its timeout", stop_worker),
    ("kill a host and restart it", kill_host),
    ("freeze a host past its heartbeat expiry", freeze_host),
    ("kill and restart Redis", restart_redis),
    ("provider answers 500", provider_500),
    ("provider answers 503", provider_503),
    ("provider hangs", provider_hangs),
    ("provider cuts streams", streams_cut),
    ("slow model loads", slow_loads),
    ("malformed payloads", malformed_payloads),
]


def disruptions(drill: Drill) -> list[tuple[str, Callable[[Drill], dict[str, Any]]]]:
    """DISRUPTIONS, and with Sentinel a planned failover too ("kill and restart Redis" then kills the master)."""
    return list(DISRUPTIONS) + ([("planned Sentinel failover", planned_failover)] if drill.group is not None else [])


def run_schedule(drill: Drill, until: float) -> None:
    """Every disruption once per cycle, shuffled, with short gaps; the first cycle always completes."""
    cycle = 0
    while cycle == 0 or time.monotonic() < until:
        order = disruptions(drill)
        drill.rng.shuffle(order)
        for name, disrupt in order:
            if cycle and time.monotonic() >= until:
                return
            at = drill.elapsed()
            began = time.monotonic()
            record = {"name": name, "at": at, **disrupt(drill), "took": round(time.monotonic() - began, 1)}
            drill.disruptions.append(record)
            print(f"[{at:7.1f}s] {name}: {_brief(record)}", flush=True)
            time.sleep(drill.rng.uniform(1.0, 2.5))
        cycle += 1


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("name", "at", "faults"))
