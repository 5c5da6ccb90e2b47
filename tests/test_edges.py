"""Edges of the reliable queue no other test reaches: a stream cut by a dead worker, the fence, an orphaned pool."""

from __future__ import annotations

import os
import signal
import time

import psutil
import redis
from support import assert_each_answered_once, chat, client_for, eventually, held_by, nothing_held, wait_all

from llm_worker.devtools.simulator import Simulator


def _holder(svc, r: redis.Redis, job_id: str) -> int | None:
    """The pid of this service's worker that holds ``job_id`` now, if any."""
    host = svc.env["WORKER_ID"]
    for pid in svc.worker_pids(r):
        if job_id in held_by(r, f"{host}:{pid}"):
            return pid
    return None


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _chunks(r: redis.Redis, job_id: str) -> int:
    return sum(1 for _, fields in r.xrange(f"llm:stream:{job_id}") if fields.get(b"event") == b"chunk")


def test_a_streaming_job_whose_worker_is_sigkilled_mid_stream_is_reset_then_streamed_whole_and_answered_once(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given a slow stream: 40 tokens, 100 ms each, and heartbeats that outlive the test (the supervisor's own
    # reaping hands the job back)
    sim.config.token_ms = 100
    sim.config.reply_tokens = 40
    svc = service(WORKER_POOLS="llm-chat=2", JOB_MAX_CRASHES="5", WORKER_HEARTBEAT_TIMEOUT="600000")
    client = client_for(redis_url)
    job_id = client.submit(
        "chat", {"messages": [{"role": "user", "content": "tell me more"}], "stream": True}, model="llama3.2"
    )
    # When its worker has streamed a few chunks and is SIGKILLed
    eventually(lambda: _chunks(r, job_id) >= 3, timeout=30, what="three chunks streamed")
    pid = eventually(lambda: _holder(svc, r, job_id), timeout=15, what="the job held by a worker")
    assert _chunks(r, job_id) < 40  # still mid-stream: the kill cuts it short
    os.kill(pid, signal.SIGKILL)
    # Then the stream says reset, carries the whole text again and ends with done
    text = "".join(client.stream(job_id, timeout=60))
    result = wait_all(client, [job_id], timeout=30)[job_id]
    assert result["success"] and result["workerId"] != f"{svc.env['WORKER_ID']}:{pid}"
    assert "\f" in text
    assert text.split("\f")[-1] == result["response"]["message"]["content"]
    entries = [fields for _, fields in r.xrange(f"llm:stream:{job_id}")]
    events_seen = [fields[b"event"] for fields in entries]
    assert events_seen.count(b"reset") == 1 and events_seen.count(b"done") == 1
    assert entries[-1] == {b"event": b"done"}
    assert events_seen.index(b"reset") >= 3  # after the first run's chunks
    assert_each_answered_once(r, [job_id])
    assert nothing_held(r)


def test_a_host_frozen_past_its_heartbeat_loses_its_job_to_another_host_and_its_late_outcome_is_dropped(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given host A holding a slow job
    sim.config.latency_ms = 4000
    host_a = service(WORKER_POOLS="llm-chat=1", WORKER_HEARTBEAT_TIMEOUT="3000")
    client = client_for(redis_url)
    job_id = chat(client, "slow one")
    a_pid = eventually(lambda: _holder(host_a, r, job_id), timeout=15, what="the job held by host A")
    a_worker = f"{host_a.env['WORKER_ID']}:{a_pid}"
    # Frozen only once its call is in the simulator's slot: its slot is busy then, so when A runs again its
    # supervisor lets the worker finish (an idle slot's old heartbeat would get the worker killed instead)
    eventually(lambda: sim.stats().in_slots >= 1, timeout=15, what="host A's call in flight")
    # When A's whole process group is frozen past its heartbeat expiry, with host B running
    os.killpg(host_a.pid, signal.SIGSTOP)
    try:
        host_b = service(WORKER_POOLS="llm-chat=1", WORKER_HEARTBEAT_TIMEOUT="3000")
        # Then B recovers the job and answers it
        result = wait_all(client, [job_id], timeout=60)[job_id]
        assert result["success"] and result["workerId"].startswith(f"{host_b.env['WORKER_ID']}:")
        assert job_id not in held_by(r, a_worker)
    finally:
        os.killpg(host_a.pid, signal.SIGCONT)
    # And once A runs again, its worker's late outcome is dropped by the fence
    eventually(
        lambda: "job no longer ours; outcome dropped" in host_a.tail(200),
        timeout=30,
        what="host A's late outcome dropped",
    )
    assert client.result(job_id)["workerId"] == result["workerId"]  # B's answer stands
    assert_each_answered_once(r, [job_id])


def test_a_supervisor_sigkilled_alone_leaves_workers_that_exit_on_their_own_and_take_nothing(
    service, redis_url: str, r: redis.Redis
) -> None:
    # Given a running service
    svc = service(WORKER_POOLS="llm-chat=2,llm-embeddings=1")
    host = svc.env["WORKER_ID"]
    workers = svc.worker_pids(r)
    assert len(workers) == 3
    children = [p.pid for p in psutil.Process(svc.pid).children(recursive=True)]
    assert set(workers) <= set(children)
    try:
        # When only the supervisor is SIGKILLed
        os.kill(svc.pid, signal.SIGKILL)
        svc.wait(10)
        # Then its workers (and its other children) notice their parent is gone and exit
        for pid in children:
            eventually(lambda pid=pid: _dead(pid), timeout=30, what=f"child {pid} exited")
        # and jobs pushed now stay queued: no worker of that host takes them
        client = client_for(redis_url)
        ids = [chat(client, f"job {n}") for n in range(3)]
        time.sleep(3)  # three block timeouts: a worker still alive would have taken one by now
        assert r.llen("llm-chat") == len(ids)
        assert not any(held_by(r, f"{host}:{pid}") for pid in workers)
        assert nothing_held(r)
        assert all(client.result(job_id) is None for job_id in ids)
    finally:
        try:
            os.killpg(svc.pid, signal.SIGKILL)  # nothing of ours outlives the test, whatever failed
        except ProcessLookupError:
            pass
