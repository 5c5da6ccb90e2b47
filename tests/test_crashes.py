"""Workers and hosts that die: no job is lost, none is answered twice."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime

import msgspec
import psutil
import redis
from support import assert_each_answered_once, chat, client_for, events, eventually, held_by, nothing_held, wait_all

from llm_worker.devtools.simulator import Simulator


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _starts(r: redis.Redis, job_id: str) -> list[float]:
    return [_epoch(e["timestamp"]) for e in events(r, "llm.request.started") if e["jobId"] == job_id]


def _busy_workers(svc, r: redis.Redis, count: int) -> dict[int, str]:
    """Wait until ``count`` workers each hold a job; return pid -> job id."""
    host = svc.env["WORKER_ID"]

    def holding() -> dict[int, str]:
        found = {}
        for pid in svc.worker_pids(r):
            jobs = held_by(r, f"{host}:{pid}")
            if jobs:
                found[pid] = jobs[0]
        return found if len(found) >= count else {}

    return eventually(holding, timeout=15, what=f"{count} busy workers")  # type: ignore[return-value]


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigkilled_busy_workers_lose_nothing_and_their_jobs_restart_at_once_not_at_heartbeat_expiry(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given three chat workers busy with slow jobs and more jobs waiting, and heartbeats that would outlive
    # the test: only the supervisor reaping its dead child can hand their jobs back, never their expiry
    sim.config.latency_ms = 400
    svc = service(WORKER_POOLS="llm-chat=3", JOB_MAX_CRASHES="5", WORKER_HEARTBEAT_TIMEOUT="600000")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(12)]
    for _ in range(2):
        # When every busy worker is SIGKILLed mid-job
        victims = _busy_workers(svc, r, 3)
        starts_before = {job_id: len(_starts(r, job_id)) for job_id in victims.values()}
        killed_at = time.time()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        # Then each job they held starts again on another worker, long before any heartbeat expires
        for job_id, before in starts_before.items():

            def restarted(job_id: str = job_id, before: int = before) -> bool:
                # Skip a start that raced the snapshot; timestamps are truncated to ms.
                return any(t >= killed_at - 0.001 for t in _starts(r, job_id)[before:])  # noqa: B023 - this turn's

            eventually(restarted, timeout=30, what=f"restart of {job_id}")
        for pid, job_id in victims.items():
            assert job_id not in held_by(r, f"{svc.env['WORKER_ID']}:{pid}")  # its processing list was handed back
    results = wait_all(client, ids, timeout=60)
    assert all(res["success"] for res in results.values())
    assert_each_answered_once(r, ids)
    assert nothing_held(r)
    assert len(svc.worker_pids(r)) == 3  # the slots were respawned


def test_a_worker_stopped_past_its_jobs_timeout_is_killed_and_its_job_recovered(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    sim.config.latency_ms = 300
    svc = service(WORKER_POOLS="llm-chat=2", WORKER_TIMEOUT_GRACE="500")
    client = client_for(redis_url)
    job_id = chat(client, timeout_ms=1500)
    ((pid, held),) = _busy_workers(svc, r, 1).items()
    assert held == job_id
    os.kill(pid, signal.SIGSTOP)
    try:
        eventually(lambda: _dead(pid), timeout=15, what="the stopped worker killed")
        result = wait_all(client, [job_id], timeout=15)[job_id]
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert result["success"] and result["workerId"] != f"{svc.env['WORKER_ID']}:{pid}"
    assert r.get(f"llm:crashes:{job_id}") is None  # cleared by its answer
    assert_each_answered_once(r, [job_id])


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_and_others_unaffected(
    service, redis_url: str, r: redis.Redis
) -> None:
    service(WORKER_POOLS="llm-chat=2", LLM_WORKER_PLUGINS="testplugins", JOB_MAX_CRASHES="3")
    client = client_for(redis_url)
    poison = chat(client, model="crash-me", correlation_id="poison")
    others = [chat(client, f"fine {n}") for n in range(10)]
    results = wait_all(client, [poison, *others], timeout=60)
    assert all(results[i]["success"] for i in others)
    failed = results[poison]
    assert failed["success"] is False and failed["errorType"] == "crashed" and failed["correlationId"] == "poison"
    (entry,) = [msgspec.json.decode(e) for e in r.lrange("llm-dead-letter", 0, -1)]
    assert entry["job"]["id"] == poison and entry["errorType"] == "crashed" and entry["attempts"] == 3
    assert [e["jobId"] for e in events(r, "llm.request.started")].count(poison) == 3
    assert_each_answered_once(r, [poison, *others])


def test_a_second_host_recovers_the_jobs_of_a_host_that_died(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given host A holding two slow jobs
    sim.config.latency_ms = 1500
    host_a = service(WORKER_ID="host-a", WORKER_POOLS="llm-chat=2", WORKER_HEARTBEAT_TIMEOUT="2000")
    client = client_for(redis_url)
    ids = [chat(client, "slow one"), chat(client, "slow two")]
    held = _busy_workers(host_a, r, 2)
    a_workers = {f"host-a:{pid}" for pid in held}
    assert a_workers <= _registered(r)  # A's workers are registered, each holding its job
    # When host A dies with all its processes, and host B runs
    host_a.kill_all()
    host_b = service(WORKER_ID="host-b", WORKER_POOLS="llm-chat=2", WORKER_HEARTBEAT_TIMEOUT="2000")
    # Then B recovers A's jobs once A's heartbeats expire, and answers them
    results = wait_all(client, ids, timeout=60)
    assert all(res["success"] and res["workerId"].startswith("host-b:") for res in results.values())
    assert_each_answered_once(r, ids)
    # and recovery removed A's workers from the registry and emptied their processing lists
    assert not a_workers & _registered(r)
    assert not any(r.llen(f"llm:processing:{worker}") for worker in a_workers)
    assert host_b.worker_pids(r)


def _registered(r: redis.Redis) -> set[str]:
    return {field.decode() for field in r.hkeys("llm:workers")}
