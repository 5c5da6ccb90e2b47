"""The response cache: deterministic requests answered once, then from Redis."""

from __future__ import annotations

import redis
from support import client_for, eventually, wait_all
from test_http import FAST, scrape, value

from llm_worker.devtools.simulator import Simulator


def ask(client, text: str, **options: object) -> str:  # type: ignore[no-untyped-def]
    return client.submit(
        "chat", {"messages": [{"role": "user", "content": text}], "options": options}, model="llama3.2"
    )


def test_a_deterministic_request_is_answered_from_the_cache_the_second_time(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    svc = service(WORKER_POOLS="llm-chat=1,llm-embeddings=1", **FAST)
    client = client_for(redis_url)
    first = wait_all(client, [ask(client, "same words", temperature=0)])
    second = wait_all(client, [ask(client, "same words", temperature=0)])
    (a,), (b,) = first.values(), second.values()
    assert not a["cacheHit"] and b["cacheHit"] and a["response"] == b["response"] and b["model"] == "llama3.2"
    assert sim.stats().requests["chat"] == 1
    seeded = wait_all(client, [ask(client, "same words", temperature=0.8, seed=7) for _ in range(2)])
    assert [res["cacheHit"] for res in seeded.values()] == [False, True]
    random = wait_all(client, [ask(client, "same words", temperature=0.8) for _ in range(2)])
    assert not any(res["cacheHit"] for res in random.values())
    other = wait_all(client, [ask(client, "other words", temperature=0)])
    assert not next(iter(other.values()))["cacheHit"]
    # One after the other: two submitted together are gathered into one call, both misses.
    embeds = [
        wait_all(client, [client.submit("embeddings", {"input": ["x"]}, model="nomic-embed-text")]) for _ in range(2)
    ]
    assert [next(iter(res.values()))["cacheHit"] for res in embeds] == [False, True]
    assert 0 < r.ttl(next(iter(r.scan_iter("llm:cache:*")))) <= 3600
    samples = eventually(
        lambda: (lambda s: s if value(s, "llm_worker_cache_hits_total", queue="llm-chat") == 2 else None)(scrape(svc)),
        what="the hits counted",
    )
    assert value(samples, "llm_worker_cache_misses_total", queue="llm-chat") == 3
    assert value(samples, "llm_worker_cache_hits_total", queue="llm-embeddings") == 1


def test_response_cache_ttl_zero_turns_it_off(service, sim: Simulator, redis_url: str, r: redis.Redis) -> None:
    service(WORKER_POOLS="llm-chat=1", RESPONSE_CACHE_TTL="0")
    client = client_for(redis_url)
    results = wait_all(client, [ask(client, "same", temperature=0) for _ in range(2)])
    assert not any(res["cacheHit"] for res in results.values())
    assert sim.stats().requests["chat"] == 2 and not list(r.scan_iter("llm:cache:*"))
