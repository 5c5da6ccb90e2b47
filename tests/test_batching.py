"""Embedding micro-batching: gathered jobs share one /api/embed call and still get one result each.

Every test runs the real service against the simulator. Jobs are queued before
the embeddings worker can take them (or while its provider is slow), so that
the worker finds them waiting and gathers them, as it would under load.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import msgspec
import redis
import urllib3
from support import assert_each_answered_once, client_for, eventually, wait_all

from llm_worker.devtools.simulator import Simulator, SimulatorConfig

POOLS = {"WORKER_POOLS": "llm-embeddings=1", "WORKER_BATCH_SIZE": "10", "BATCH_TIMEOUT": "200"}


def queue_all(r: redis.Redis, jobs: list[dict[str, Any]], queue: str = "llm-embeddings") -> list[str]:
    """Push every job in one transaction, so the worker finds them all waiting."""
    pipe = r.pipeline(transaction=True)
    for job in jobs:
        pipe.lpush(queue, msgspec.json.encode(job))
    pipe.execute()
    return [job["id"] for job in jobs]


def embed_job(n: int, text: str, model: str = "nomic-embed-text", **request: Any) -> dict[str, Any]:
    return {
        "id": f"e{n}-{os.urandom(3).hex()}",
        "type": "embeddings",
        "model": model,
        "userId": "u",
        "request": {"input": text, **request},
        "createdAt": "2026-11-23T00:00:00Z",
        "retryCount": 0,
        "priority": 0,
    }


def direct_embedding(sim: Simulator, text: str, model: str = "nomic-embed-text") -> list[float]:
    """What the simulator answers for one input on its own (its vectors are a function of model and text)."""
    resp = urllib3.request("POST", sim.url + "/api/embed", json={"model": model, "input": [text]})
    return resp.json()["embeddings"][0]


def test_waiting_jobs_share_one_call_and_each_gets_its_own_vectors(
    service, sim: Simulator, r: redis.Redis, redis_url: str
) -> None:
    texts = [f"text number {n} " + "word " * n for n in range(10)]
    ids = queue_all(r, [embed_job(n, t) for n, t in enumerate(texts)])
    service(**POOLS)
    results = wait_all(client_for(redis_url), ids)
    assert sim.stats().requests.get("embed") == 1 + 1  # the host's load of the model; ten jobs, one provider call
    for job_id, text in zip(ids, texts):
        res = results[job_id]
        assert res["success"] and res["response"]["embeddings"] == [direct_embedding(sim, text)]
    # The call's prompt tokens are shared out: they add up to what the simulator counted.
    assert sum(res["tokensUsed"] for res in results.values()) == sum(len(t.split()) for t in texts)
    assert_each_answered_once(r, ids)


def test_one_bad_input_fails_only_its_own_job(service, r: redis.Redis, redis_url: str) -> None:
    with Simulator(SimulatorConfig(num_ctx=50)) as sim:
        too_long = "word " * 80  # past the simulator's 50-token context, and truncate is off
        jobs = [embed_job(n, too_long if n == 4 else f"fine {n}", truncate=False) for n in range(10)]
        ids = queue_all(r, jobs)
        service(OLLAMA_BASE_URL=sim.url, **POOLS)
        results = wait_all(client_for(redis_url), ids)
        bad = results[ids[4]]
        assert not bad["success"] and bad["errorType"] == "validation" and "context length" in bad["error"]
        assert all(results[i]["success"] for n, i in enumerate(ids) if n != 4)
        # One shared call, refused whole; then each job on its own.
        assert sim.stats().requests.get("embed") == 1 + 1 + 10  # the load, the shared call, then each job
        assert results[ids[0]]["response"]["embeddings"] == [direct_embedding(sim, "fine 0")]
    assert r.llen("llm-dead-letter") == 1
    assert_each_answered_once(r, ids)


def test_jobs_of_other_models_options_and_types_are_not_mixed(service, r: redis.Redis, redis_url: str) -> None:
    with Simulator(SimulatorConfig(models=["llama3.2:latest", "nomic-embed-text:latest", "all-minilm:latest"])) as sim:
        jobs = (
            [embed_job(n, f"a {n}") for n in range(4)]
            + [embed_job(n, f"b {n}", model="all-minilm") for n in range(4)]
            + [embed_job(n, f"c {n}", truncate=False) for n in range(2)]
        )
        chat = {
            "id": "chat-in-the-embeddings-queue",
            "type": "chat",
            "model": "llama3.2",
            "userId": "u",
            "request": {"messages": [{"role": "user", "content": "hi"}]},
        }
        ids = queue_all(r, jobs + [chat])
        service(OLLAMA_BASE_URL=sim.url, **{**POOLS, "WORKER_BATCH_SIZE": "11"})
        results = wait_all(client_for(redis_url), ids)
        assert all(res["success"] for res in results.values())
        stats = sim.stats()
        # The host loaded each model once (an embedding model through an empty /api/embed), then:
        # one call of nomic-embed-text per set of options, one of all-minilm, and the chat.
        assert stats.loads == {"nomic-embed-text:latest": 1, "all-minilm:latest": 1, "llama3.2:latest": 1}
        assert stats.requests.get("embed") == 2 + 3 and stats.requests.get("chat") == 1


def test_with_batching_off_each_job_makes_its_own_call(service, sim: Simulator, r: redis.Redis, redis_url: str) -> None:
    ids = queue_all(r, [embed_job(n, f"t {n}") for n in range(6)])
    service(ENABLE_BATCH_PROCESSING="false", **POOLS)
    results = wait_all(client_for(redis_url), ids)
    assert all(res["success"] for res in results.values())
    assert sim.stats().requests.get("embed") == 1 + 6  # the host's load of the model, then each job


def test_a_lone_job_waits_at_most_batch_timeout_for_company(
    service, sim: Simulator, r: redis.Redis, redis_url: str
) -> None:
    service(**{**POOLS, "BATCH_TIMEOUT": "300"})
    client = client_for(redis_url)
    job_id = client.submit("embeddings", {"input": "alone"}, model="nomic-embed-text")
    result = wait_all(client, [job_id])[job_id]
    assert result["success"]
    pushed_late = client.submit("embeddings", {"input": "second"}, model="nomic-embed-text")
    assert wait_all(client, [pushed_late])[pushed_late]["success"]
    assert sim.stats().requests.get("embed") == 3  # the host's load of the model, then the two jobs' calls


def test_gathered_jobs_are_held_reliably_when_their_worker_is_sigkilled(
    service, sim: Simulator, r: redis.Redis, redis_url: str
) -> None:
    sim.config.embed_call_ms = 5000  # the shared call hangs long enough to kill the worker inside it
    ids = queue_all(r, [embed_job(n, f"held {n}") for n in range(10)])
    svc = service(**POOLS)
    (pid,) = svc.worker_pids(r)
    held = f"llm:processing:{svc.env['WORKER_ID']}:{pid}"
    eventually(lambda: r.llen(held) == 10, what="all ten gathered into the worker's processing list")
    eventually(lambda: sim.stats().in_slots == 1, what="the shared call in flight")
    sim.config.embed_call_ms = 0
    os.kill(pid, signal.SIGKILL)
    results = wait_all(client_for(redis_url), ids, timeout=30)
    assert all(res["success"] for res in results.values())
    assert_each_answered_once(r, ids)
