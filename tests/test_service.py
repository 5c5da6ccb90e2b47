"""End to end: a running service answers every job type, refuses bad input, retries with backoff."""

from __future__ import annotations

import time
from datetime import datetime

import msgspec
import pytest
import redis
from support import assert_each_answered_once, chat, client_for, events, eventually, nothing_held, wait_all

from llm_worker.devtools.simulator import Fault, Simulator


def test_every_job_type_is_answered_through_a_running_service(
    service, sim: Simulator, r: redis.Redis, redis_url: str
) -> None:
    service()
    client = client_for(redis_url)
    ids = {
        "chat": chat(client, "Why is the sky blue?", correlation_id="corr-1"),
        "generate": client.submit("generate", {"prompt": "Once upon a time", "system": "be brief"}, model="llama3.2"),
        "embeddings": client.submit("embeddings", {"input": ["one", "two", "three"]}, model="nomic-embed-text"),
        "legacy-embeddings": client.submit("embeddings", {"prompt": "one"}, model="nomic-embed-text"),
        "batch": client.submit(
            "batch",
            {
                "requests": [
                    {"type": "chat", "request": {"messages": [{"role": "user", "content": "a"}]}},
                    {"type": "generate", "model": "llama3.2", "request": {"prompt": "b"}},
                    {"type": "embeddings", "model": "nomic-embed-text", "request": {"input": "c"}},
                ]
            },
            model="llama3.2",
        ),
        "urgent": client.submit(
            "chat",
            {"messages": [{"role": "user", "content": "now"}]},
            model="llama3.2",
            queue="llm-priority",
            urgent=True,
        ),
    }
    results = wait_all(client, ids.values())
    for name, job_id in ids.items():
        result = results[job_id]
        assert result["success"], (name, result)
        assert result["jobId"] == job_id and result["workerId"].count(":") == 1
        assert result["completedAt"].endswith("Z") and result["processingTime"] >= 0
    chat_result = results[ids["chat"]]
    assert chat_result["response"]["message"]["content"].startswith("Why is the sky blue?")
    assert chat_result["response"]["doneReason"] == "stop"
    assert chat_result["correlationId"] == "corr-1" and chat_result["model"] == "llama3.2"
    assert chat_result["tokensUsed"] == chat_result["promptTokens"] + chat_result["completionTokens"] > 0
    assert results[ids["generate"]]["response"]["response"].startswith("Once upon a time")
    assert len(results[ids["embeddings"]]["response"]["embeddings"]) == 3
    assert len(results[ids["legacy-embeddings"]]["response"]["embeddings"]) == 1
    batch = results[ids["batch"]]["response"]["results"]
    assert [b["success"] for b in batch] == [True, True, True]
    assert [b["jobId"] for b in batch] == [f"{ids['batch']}:{i}" for i in range(3)]
    assert_each_answered_once(r, ids.values())
    assert nothing_held(r)


def test_a_streaming_job_sends_its_chunks_then_done_and_the_whole_text_in_the_result(
    service, redis_url: str, r: redis.Redis
) -> None:
    service()
    client = client_for(redis_url)
    job_id = client.submit(
        "chat", {"messages": [{"role": "user", "content": "tell me more"}], "stream": True}, model="llama3.2"
    )
    text = "".join(client.stream(job_id, timeout=20))
    result = client.wait(job_id, 5)
    assert result["success"] and result["response"]["message"]["content"] == text
    entries = r.xrange(f"llm:stream:{job_id}")
    assert [e[1][b"event"] for e in entries].count(b"done") == 1 and entries[-1][1] == {b"event": b"done"}
    assert 0 < r.ttl(f"llm:stream:{job_id}") <= 3600


def test_events_say_what_happened_without_prompt_or_completion_text(service, redis_url: str, r: redis.Redis) -> None:
    service()
    client = client_for(redis_url)
    secret = "my-secret-prompt-words"
    job_id = chat(client, secret)
    wait_all(client, [job_id])
    # The event follows the result by a moment: it is written after the outcome.
    kinds = eventually(
        lambda: (lambda k: k if len(k) == 2 else None)([e["type"] for e in events(r) if e.get("jobId") == job_id]),
        what="both events",
    )
    assert kinds == ["llm.request.started", "llm.request.completed"]
    for _, fields in r.xrange("llm:events"):
        assert b"secret" not in fields[b"data"]
    for entry in events(r):  # model events (the host's load of llama3.2) belong to no job
        assert {"workerId", "timestamp"} <= set(entry)
        assert "jobId" in entry or entry["type"].startswith("llm.model.")


def test_malformed_and_oversized_payloads_are_dead_lettered_and_workers_unharmed(
    service, redis_url: str, r: redis.Redis
) -> None:
    svc = service(WORKER_POOLS="llm-chat=1", MAX_JOB_BYTES="4096")
    pids = svc.worker_pids(r)
    client = client_for(redis_url)
    bad_role = msgspec.json.encode(
        {
            "id": "bad-role",
            "type": "chat",
            "userId": "u",
            "model": "llama3.2",
            "request": {"messages": [{"role": "wizard", "content": "x"}]},
        }
    )
    huge = (
        b'{"id": "too-big", "type": "chat", "request": {"messages": [{"role": "user", "content": "'
        + b"x" * 8000
        + b'"}]}}'
    )
    for payload in [b"not json at all", b"[1, 2, 3]", b'{"no": "id"}', b"\xff\xfe binary", bad_role, huge]:
        r.lpush("llm-chat", payload)
    good = chat(client)
    assert wait_all(client, [good])[good]["success"]
    eventually(lambda: r.llen("llm-dead-letter") == 6, what="six dead letters")
    entries = [msgspec.json.decode(e) for e in r.lrange("llm-dead-letter", 0, -1)]
    reasons = {(e.get("job") or {}).get("id") or e.get("raw", "")[:8]: e["error"] for e in entries}
    assert "not JSON" in reasons["not json"] and "not JSON" in reasons["\ufffd\ufffd binar"]
    assert "not a job object" in reasons["[1, 2, 3"] and "not a job" in reasons['{"no": "']
    assert "role" in reasons["bad-role"] and "$.request.messages[0].role" in reasons["bad-role"]
    assert "MAX_JOB_BYTES" in reasons['{"id": "']
    assert all(e["errorType"] == "validation" and e["queue"] == "llm-chat" for e in entries)
    # Producers waiting on jobs with an id always wake, with the reason.
    for job_id in ("bad-role", "too-big"):
        result = client.wait(job_id, 5)
        assert result["success"] is False and result["errorType"] == "validation"
    assert svc.worker_pids(r) == pids  # no worker died
    assert nothing_held(r)


def test_a_retryable_failure_is_retried_with_growing_delays_then_answered(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    service(WORKER_POOLS="llm-chat=1", QUEUE_DELAY="200", QUEUE_MAX_ATTEMPTS="4", OLLAMA_MAX_RETRIES="0")
    sim.set_faults(
        [Fault(kind="status", status=500, message="error reading llama-server response: unexpected EOF", count=2)]
    )
    client = client_for(redis_url)
    job_id = chat(client)
    result = wait_all(client, [job_id], timeout=20)[job_id]
    assert result["success"] and result["retryCount"] == 2
    retried = events(r, "llm.request.retried")
    assert [e["retryCount"] for e in retried] == [1, 2]
    # Equal jitter: each delay lies between half and all of 200 ms doubled per retry.
    assert 100 <= retried[0]["delayMs"] <= 200 and 200 <= retried[1]["delayMs"] <= 400
    assert all(e["errorType"] == "provider" for e in retried)
    assert_each_answered_once(r, [job_id])


def test_a_retry_that_would_cross_max_job_bytes_is_answered_not_lost(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # The retry count we add would push the payload over the limit, and its id is
    # not its first key: retried, the next take would dead-letter it with no result.
    service(WORKER_POOLS="llm-chat=1", MAX_JOB_BYTES="4096", QUEUE_DELAY="50", OLLAMA_MAX_RETRIES="0")
    sim.set_faults(
        [Fault(kind="status", status=500, message="error reading llama-server response: unexpected EOF", count=1)]
    )
    body = {
        "type": "chat",
        "userId": "u",
        "model": "llama3.2",
        "request": {"messages": [{"role": "user", "content": ""}]},
        "id": "near-limit",
    }
    body["request"]["messages"][0]["content"] = "x" * (4096 - 4 - len(msgspec.json.encode(body)))
    raw = msgspec.json.encode(body)
    assert 4090 <= len(raw) <= 4096
    r.lpush("llm-chat", raw)
    result = client_for(redis_url).wait("near-limit", 20)
    assert result is not None and result["success"] is False and result["errorType"] == "provider"
    assert "not retried" in result["error"] and "MAX_JOB_BYTES (4096)" in result["error"]
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry["job"]["id"] == "near-limit" and entry["errorType"] == "provider"
    assert nothing_held(r)


def test_a_job_out_of_attempts_is_dead_lettered_with_its_failure_result(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    service(WORKER_POOLS="llm-chat=1", QUEUE_DELAY="50", QUEUE_MAX_ATTEMPTS="2", OLLAMA_MAX_RETRIES="0")
    sim.set_faults([Fault(kind="status", status=500, reason="oom")])
    client = client_for(redis_url)
    job_id = chat(client, correlation_id="c-9")
    result = wait_all(client, [job_id], timeout=20)[job_id]
    assert not result["success"] and result["errorType"] == "memory" and result["retryCount"] == 1
    assert "gave up after 2 attempts" in result["error"] and result["correlationId"] == "c-9"
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry["job"]["id"] == job_id and entry["attempts"] == 2 and entry["errorType"] == "memory"
    assert_each_answered_once(r, [job_id])


def test_a_failure_that_retrying_cannot_fix_is_dead_lettered_at_once(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    service(WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    job_id = chat(client, model="no-such-model")
    result = wait_all(client, [job_id])[job_id]
    assert result["errorType"] == "model" and "not found" in result["error"] and result["retryCount"] == 0
    assert events(r, "llm.request.retried") == []


def test_a_streaming_job_cut_mid_stream_ends_its_stream_with_an_error(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    service(WORKER_POOLS="llm-chat=1")
    sim.set_faults([Fault(kind="stream_error", after_chunks=3)])
    client = client_for(redis_url)
    job_id = client.submit(
        "chat", {"messages": [{"role": "user", "content": "go on"}], "stream": True}, model="llama3.2"
    )
    result = wait_all(client, [job_id])[job_id]
    assert not result["success"] and result["retryCount"] == 0  # text already shown is not taken back
    kinds = [e[1][b"event"] for e in r.xrange(f"llm:stream:{job_id}")]
    assert kinds[:3] == [b"chunk"] * 3 and kinds[-1] == b"error" and b"done" not in kinds


def test_a_job_submitted_with_a_delay_runs_once_it_is_due(service, redis_url: str, r) -> None:  # type: ignore[no-untyped-def]
    # Given: a running host, and a job scheduled 1.5 s out (docs/protocol.md, "Queues").
    service(WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    submitted = time.time()
    job = client.submit("chat", {"messages": [{"role": "user", "content": "later"}]}, model="llama3.2", delay_ms=1500)
    # Then: it waits in the delayed set, not in the queue, and runs once due.
    assert r.zcard("llm:delayed") == 1 and r.llen("llm-chat") == 0
    (result,) = wait_all(client, [job], timeout=30).values()
    assert result["success"]
    started = datetime.fromisoformat(result["startedAt"].replace("Z", "+00:00")).timestamp()
    assert started - submitted >= 1.5
    with pytest.raises(ValueError):
        client.submit("chat", {"messages": []}, delay_ms=-1)
