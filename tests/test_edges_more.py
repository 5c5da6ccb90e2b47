"""More edges of the reliable queue: a worker reconciling its processing list, counters against Redis's stats."""

from __future__ import annotations

import os
import signal

import msgspec
import redis
from support import assert_each_answered_once, chat, client_for, eventually, held_by, nothing_held, wait_all
from test_http import scrape

from llm_worker.devtools.simulator import Simulator


def _holder(svc, r: redis.Redis, job_id: str) -> int | None:
    """The pid of this service's worker that holds ``job_id`` now, if any."""
    host = svc.env["WORKER_ID"]
    for pid in svc.worker_pids(r):
        if job_id in held_by(r, f"{host}:{pid}"):
            return pid
    return None


def _busy(svc, r: redis.Redis) -> tuple[int, str] | None:
    """A worker of this service holding a job now, with that job's id."""
    host = svc.env["WORKER_ID"]
    for pid in svc.worker_pids(r):
        held = held_by(r, f"{host}:{pid}")
        if held:
            return pid, held[0]
    return None


def _sum(samples: dict, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, pairs), v in samples.items() if n == name and set(labels.items()) <= set(pairs))


def test_after_its_connections_are_killed_a_worker_reconciles_its_list_dropping_the_answered_and_handing_back_the_rest(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    client = client_for(redis_url)
    # Given a job answered before (its payload kept as it was queued)
    answered = chat(client, "answered before")
    answered_raw = r.lindex("llm-chat", 0)
    assert msgspec.json.decode(answered_raw)["id"] == answered
    svc = service(WORKER_POOLS="llm-chat=1", WORKER_HEARTBEAT_TIMEOUT="600000")
    wait_all(client, [answered], timeout=30)
    eventually(lambda: nothing_held(r), what="the first job acked")
    # and the one worker busy with a slow job
    sim.config.latency_ms = 3000
    slow = chat(client, "slow one")
    pid = eventually(lambda: _holder(svc, r, slow), timeout=15, what="the slow job held")
    processing = f"llm:processing:{svc.env['WORKER_ID']}:{pid}"
    eventually(lambda: sim.stats().in_slots >= 1, timeout=15, what="the slow call in flight")
    # and in its processing list, besides the slow job: the answered payload again (an ack Redis lost) and a
    # job never answered (a take whose reply was lost)
    lost = chat(client, "take reply lost")
    assert r.lmove("llm-chat", processing, "RIGHT", "LEFT") is not None
    r.lpush(processing, answered_raw)
    assert set(held_by(r, processing.removeprefix("llm:processing:"))) == {slow, lost, answered}
    # When every client connection of the service is killed while the slow call runs
    killer = redis.Redis.from_url(redis_url, socket_timeout=10)
    assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
    sim.config.latency_ms = 0
    # Then the worker finishes its slow job, reconciles: the lost take is handed back and answered
    results = wait_all(client, [slow, lost], timeout=60)
    assert all(res["success"] for res in results.values())
    eventually(lambda: nothing_held(r), timeout=15, what="processing lists empty")
    log = svc.tail(400)
    assert "Redis connection replaced; reconciling our processing list" in log
    assert "handed back a job found in our processing list after Redis returned" in log
    # and each job is answered exactly once: the answered payload was dropped, not run again
    assert_each_answered_once(r, [answered, slow, lost])
    assert client.result(answered)["success"]
    assert svc.process.poll() is None


def test_metrics_counters_match_redis_stats_after_a_worker_is_sigkilled_mid_job(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given two chat workers busy with slow jobs, and heartbeats that outlive the test (only the supervisor's
    # reaping hands the killed worker's job back)
    sim.config.latency_ms = 1000
    svc = service(WORKER_POOLS="llm-chat=2", JOB_MAX_CRASHES="5", WORKER_HEARTBEAT_TIMEOUT="600000")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(8)]
    # When one busy worker is SIGKILLed mid-job (its call in the simulator's hands)
    eventually(lambda: sim.stats().in_slots >= 1, timeout=15, what="a call in flight")
    pid, job_id = eventually(lambda: _busy(svc, r), timeout=15, what="a busy worker")  # type: ignore[misc]
    os.kill(pid, signal.SIGKILL)
    # Then every job is answered once, the killed one on another worker
    results = wait_all(client, ids, timeout=60)
    assert all(res["success"] for res in results.values())
    assert results[job_id]["workerId"] != f"{svc.env['WORKER_ID']}:{pid}"
    eventually(lambda: nothing_held(r), timeout=15, what="processing lists empty")
    assert_each_answered_once(r, ids)
    # and once settled, /metrics agrees with Redis: completed jobs with the queue's stats hash, one reclaim
    stats = {k.decode(): int(v) for k, v in r.hgetall("llm:stats:llm-chat").items()}
    assert stats == {"completed": len(ids)}
    eventually(
        lambda: _sum(scrape(svc), "llm_worker_jobs_total", queue="llm-chat", outcome="completed") == len(ids),
        timeout=15,
        what="completed jobs on /metrics",
    )
    samples = scrape(svc)
    assert _sum(samples, "llm_worker_jobs_total", queue="llm-chat", outcome="failed") == 0
    assert _sum(samples, "llm_worker_jobs_reclaimed_total") == 1
    assert _sum(samples, "llm_worker_jobs_crash_dead_lettered_total") == 0
