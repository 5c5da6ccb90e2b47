"""Model affinity across hosts, end to end: real services, each with its own simulator, one Redis."""

from __future__ import annotations

import time
from datetime import datetime

import msgspec
import redis
from support import assert_each_answered_once, chat, client_for, events, eventually, wait_all

from llm_worker.devtools.simulator import Simulator, SimulatorConfig
from llm_worker.models.fleet import VIEW_TTL
from llm_worker.queue.client import Client
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import Parking

KEYS = Keys("llm:", "llm-dead-letter")
# One worker pool, models managed by the host, a quick manager.
HOST = {"WORKER_POOLS": "llm-chat=3", "MODEL_MANAGER_INTERVAL": "500", "MODEL_CACHE_SIZE": "1"}


def simulator(*models: str) -> Simulator:
    return Simulator(SimulatorConfig(port=0, models=list(models), max_loaded=1, num_parallel=2, latency_ms=5.0))


def holdings(r: redis.Redis) -> dict[str, set[str]]:
    hosts = [h.decode() for h in r.smembers(KEYS.fleet)]
    out = {}
    for host in hosts:
        blob = r.get(KEYS.holdings(host))
        if blob is not None:
            out[host] = set(msgspec.json.decode(blob)["models"])
    return out


def parked_by_a_host_gone(r: redis.Redis, client: Client, model: str, n: int) -> list[str]:
    """Submit ``n`` jobs and park them as a host's worker would (taken, then parked); their ids."""
    ids = [chat(client, model=model) for _ in range(n)]
    parking = Parking(r, KEYS, "gone")
    for _ in ids:
        raw = r.lmove("llm-chat", KEYS.processing("gone:1"), "RIGHT", "LEFT")
        assert parking.park("gone:1", raw, "llm-chat", model)
    assert r.llen("llm-chat") == 0
    return ids


def test_jobs_go_to_the_host_that_holds_their_model(service, redis_url: str, r) -> None:  # type: ignore[no-untyped-def]
    # Given: two hosts, each with its own Ollama that keeps one model, one holding m-a and the other m-b.
    with simulator("m-a", "m-b") as sim_a, simulator("m-a", "m-b") as sim_b:
        a = service(WORKER_ID="host-a", OLLAMA_BASE_URL=sim_a.url, MODEL_PRELOAD_LIST="m-a", **HOST)
        service(WORKER_ID="host-b", OLLAMA_BASE_URL=sim_b.url, MODEL_PRELOAD_LIST="m-b", **HOST)
        eventually(
            lambda: holdings(r) == {"host-a": {"m-a"}, "host-b": {"m-b"}}, timeout=15, what="both hosts published"
        )
        # A worker reuses its view of the other hosts for VIEW_TTL: one read just before the other host's first
        # publication would not know it yet (it would load m-b itself, for that moment).
        time.sleep(2 * VIEW_TTL)
        # When: 40 jobs alternate between the two models.
        client = client_for(redis_url)
        ids = [chat(client, model=("m-a", "m-b")[i % 2]) for i in range(40)]
        results = wait_all(client, ids, timeout=60)
        # Then: every job was answered once, by the host holding its model, and no model was loaded again.
        assert all(res["success"] for res in results.values())
        assert_each_answered_once(r, ids)
        stats_a, stats_b = sim_a.stats(), sim_b.stats()
        assert set(stats_a.requests_by_model) <= {"m-a", "m-a:latest"}, stats_a.requests_by_model
        assert set(stats_b.requests_by_model) <= {"m-b", "m-b:latest"}, stats_b.requests_by_model
        assert sum(stats_a.loads.values()) == 1 and sum(stats_b.loads.values()) == 1
        # And: /status shows the fleet as published, and no job is left parked.
        status = a.get("/status")[1]["affinity"]
        assert status["enabled"] is True
        assert eventually(lambda: set(a.get("/status")[1]["affinity"]["hosts"]) == {"host-a", "host-b"}, timeout=10)
        assert not any(r.scan_iter(match="llm:parked:*"))


def test_a_parked_job_waits_no_longer_than_the_bound_then_any_host_takes_it(  # type: ignore[no-untyped-def]
    service, redis_url: str, r
) -> None:
    # Given: a host holding m-a, and another host that says it holds m-b but takes no jobs.
    r.sadd(KEYS.fleet, "ghost")
    ghost = {"host": "ghost", "hostname": "x", "at": "now", "cacheSize": 1, "models": {}, "queues": ["llm-chat"]}
    ghost["models"] = {"m-b": {"state": "loaded", "slots": 2, "busy": 0}}
    r.set(KEYS.holdings("ghost"), msgspec.json.encode(ghost), px=120_000)
    with simulator("m-a", "m-b") as sim:
        svc = service(
            WORKER_ID="host-a",
            OLLAMA_BASE_URL=sim.url,
            MODEL_PRELOAD_LIST="m-a",
            MODEL_AFFINITY_MAX_WAIT="1500",
            HOST_SAMPLE_INTERVAL="200",
            **HOST,
        )
        client = client_for(redis_url)
        # When: a job for m-b comes.
        pushed = time.time()
        job = chat(client, model="m-b")
        # Then: it is parked for the host that holds m-b (and /status counts it) ...
        eventually(lambda: svc.get("/status")[1]["queues"]["llm-chat"]["parked"] == 1, timeout=10, what="parked")
        assert svc.get("/status")[1]["affinity"]["parked"] == {"llm-chat": {"m-b": 1}}
        # ... until MODEL_AFFINITY_MAX_WAIT, when this host takes it and loads m-b.
        (result,) = wait_all(client, [job], timeout=30).values()
        assert result["success"]
        took = datetime.fromisoformat(result["startedAt"].replace("Z", "+00:00")).timestamp() - pushed
        assert took >= 1.5, took
        assert sim.stats().requests_by_model.get("m-b", 0) + sim.stats().requests_by_model.get("m-b:latest", 0) >= 1


def test_with_affinity_off_jobs_an_earlier_run_parked_are_served(  # type: ignore[no-untyped-def]
    service, redis_url: str, r
) -> None:
    # Given: jobs an earlier run parked (taken by a worker, then parked for another host).
    client = client_for(redis_url)
    ids = parked_by_a_host_gone(r, client, "llama3.2", 3)
    # When: a host starts with MODEL_AFFINITY=false.
    svc = service(MODEL_AFFINITY="false", WORKER_POOLS="llm-chat=2")
    # Then: it moves them back to their queue and serves them, and says so.
    results = wait_all(client, ids, timeout=30)
    assert all(res["success"] for res in results.values())
    assert "MODEL_AFFINITY is off: moved 3 parked job(s) back to llm-chat" in svc.tail(200)
    assert not any(r.scan_iter(match="llm:parked:*"))


def test_parked_jobs_no_host_holds_are_loaded_for_by_demand(  # type: ignore[no-untyped-def]
    service, redis_url: str, r
) -> None:
    # Given: jobs for m-c parked (their host went away), which no host holds.
    client = client_for(redis_url)
    ids = parked_by_a_host_gone(r, client, "m-c", 4)
    with simulator("m-a", "m-c") as sim:
        # When: a host with room for it runs.
        service(WORKER_ID="host-a", OLLAMA_BASE_URL=sim.url, **{**HOST, "MODEL_CACHE_SIZE": "2"})
        # Then: it loads m-c once, for all of them, and answers them.
        results = wait_all(client, ids, timeout=30)
        assert all(res["success"] for res in results.values())
        assert sim.stats().loads.get("m-c:latest", 0) + sim.stats().loads.get("m-c", 0) == 1


def test_a_load_on_a_full_host_drains_a_busy_model_instead_of_waiting_for_it_to_idle_out(  # type: ignore[no-untyped-def]
    service, redis_url: str, r
) -> None:
    # Given: a host whose Ollama keeps two models, both loaded and busy (every call takes 2 s). Ollama evicts a
    # busy model only once its calls stop, and a call that uses it meanwhile renews its keep_alive: asked to
    # load a third model now, it would wait until one of them idled out (MODEL_UNLOAD_TIMEOUT, 5 minutes).
    config = SimulatorConfig(port=0, models=["m-a", "m-b", "m-c"], max_loaded=2, num_parallel=2, latency_ms=2000.0)
    with Simulator(config) as sim:
        svc = service(
            WORKER_ID="host-a",
            OLLAMA_BASE_URL=sim.url,
            MODEL_PRELOAD_LIST="m-a,m-b",
            WORKER_POOLS="llm-chat=4",
            MODEL_CACHE_SIZE="2",
            MODEL_AFFINITY_MAX_WAIT="500",
        )
        client = client_for(redis_url)
        busy = [chat(client, model="m-a"), chat(client, model="m-b")]
        eventually(lambda: sim.stats().in_slots == 2, timeout=10, what="both models busy")
        # When: a job for a third model comes, then one more for each of the two.
        third = chat(client, model="m-c")
        eventually(lambda: "drains to make room for m-c" in svc.tail(200), timeout=15, what="a model drained")
        after = [chat(client, model="m-a"), chat(client, model="m-b")]
        # Then: the drained model takes no new job, goes once its call ends, and the third loads at once;
        # every job is answered once, long before a model could idle out.
        results = wait_all(client, [*busy, third, *after], timeout=60)
        assert all(res["success"] for res in results.values())
        assert_each_answered_once(r, [*busy, third, *after])
        assert sim.stats().loads.get("m-c:latest", 0) + sim.stats().loads.get("m-c", 0) == 1


def test_no_job_is_parked_for_a_host_that_does_not_serve_its_queue(service, redis_url: str, r) -> None:  # type: ignore[no-untyped-def]
    # Given: another host holding m-b, whose workers take only llm-batch jobs.
    r.sadd(KEYS.fleet, "batcher")
    other = {"host": "batcher", "hostname": "x", "at": "now", "cacheSize": 1, "queues": ["llm-batch"]}
    other["models"] = {"m-b": {"state": "loaded", "slots": 2, "busy": 0}}
    r.set(KEYS.holdings("batcher"), msgspec.json.encode(other), px=120_000)
    with simulator("m-a", "m-b") as sim:
        service(WORKER_ID="host-a", OLLAMA_BASE_URL=sim.url, **{**HOST, "MODEL_AFFINITY_MAX_WAIT": "60000"})
        client = client_for(redis_url)
        # When: a chat job for m-b comes.
        job = chat(client, model="m-b")
        # Then: this host runs it at once (well inside the bound), instead of parking it for a host that
        # would never take it.
        (result,) = wait_all(client, [job], timeout=30).values()
        assert result["success"]
        assert not events(r, "llm.request.parked")
