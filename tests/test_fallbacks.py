"""Breakers, fallback strategies, filters and sinks, through a running service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import redis
import urllib3
from support import assert_each_answered_once, chat, client_for, events, eventually, wait_all

from llm_worker.devtools.simulator import Fault, Simulator

TOKEN = {"ADMIN_TOKEN": "t0ken"}
AUTH = {"Authorization": "Bearer t0ken"}


def pull(sim: Simulator, model: str) -> None:
    """Give the simulator another model, as `ollama pull` would."""
    assert urllib3.request("POST", sim.url + "/api/pull", json={"model": model, "stream": False}).status == 200


def breakers(svc) -> list[dict]:  # type: ignore[no-untyped-def]
    return urllib3.request("GET", svc.url + "/admin/breakers", headers=AUTH).json()["breakers"]


def test_a_model_failing_every_call_trips_its_breaker_and_every_job_is_answered_by_the_fallback(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given llama3.2 failing every call, and mistral to fall back to
    pull(sim, "mistral")
    sim.set_faults([Fault(status=500, message="error reading llama-server response: unexpected EOF", model="llama3.2")])
    svc = service(
        WORKER_POOLS="llm-chat=2",
        FALLBACK_MODELS="mistral",
        CIRCUIT_BREAKER_THRESHOLD="3",
        CIRCUIT_BREAKER_RESET_TIMEOUT="600000",
        CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="600000",
        OLLAMA_MAX_RETRIES="0",
        **TOKEN,
    )
    client = client_for(redis_url)
    ids = [chat(client, f"question {n}", model="llama3.2") for n in range(12)]
    # Then every job is answered, by mistral, and says so
    results = wait_all(client, ids, timeout=60)
    assert all(res["success"] and res["model"] == "mistral" and res["fallbackUsed"] for res in results.values())
    assert all(res["requestedModel"] == "llama3.2" for res in results.values())
    # And llama3.2 was called only until its breaker opened, then spared
    # Two workers: a call may be in flight as the third failure opens the breaker.
    # Two requests more: the host's load of llama3.2 (/api/show for its kind, then /api/generate).
    assert 3 <= sim.stats().requests_by_model["llama3.2:latest"] - 2 <= 4
    (row,) = [b for b in breakers(svc) if b["key"] == "ollama:llama3.2"]
    assert row["state"] == "open" and row["openedTotal"] == 1
    opened = eventually(lambda: events(r, "llm.breaker.opened"), what="the breaker event")
    assert len(opened) == 1 and opened[0]["model"] == "llama3.2"  # one event per transition, from one process
    assert svc.tail(300).count("circuit breaker opened: ollama:llama3.2") == 1
    assert_each_answered_once(r, ids)


def test_with_every_breaker_open_jobs_wait_and_complete_once_the_provider_recovers(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given a provider that answers nothing but 503s, and no fallback model
    sim.set_faults([Fault(status=503, reason="busy")])
    service(
        WORKER_POOLS="llm-chat=2",
        CIRCUIT_BREAKER_THRESHOLD="2",
        CIRCUIT_BREAKER_RESET_TIMEOUT="1000",
        CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="2000",
        OLLAMA_MAX_RETRIES="0",
        QUEUE_DELAY="100",
        QUEUE_MAX_ATTEMPTS="3",
    )
    client = client_for(redis_url)
    ids = [chat(client, f"during the outage {n}") for n in range(8)]
    eventually(lambda: events(r, "llm.breaker.opened"), timeout=30, what="the breaker open")
    # The pool pauses: jobs wait in the queue (or parked, if taken before it paused)
    eventually(lambda: r.llen("llm-chat") + r.zcard("llm:delayed") >= 4, timeout=30, what="jobs waiting out the outage")
    # When the provider recovers
    sim.clear_faults()
    # Then every job completes, none dead-lettered for the outage
    results = wait_all(client, ids, timeout=60)
    assert all(res["success"] for res in results.values())
    assert r.llen("llm-dead-letter") == 0
    assert eventually(lambda: events(r, "llm.breaker.closed"), timeout=10, what="the breaker closed")
    assert_each_answered_once(r, ids)


def test_a_job_whose_probes_keep_failing_spends_attempts_after_two_free_probes(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given a model that fails every call, and a breaker that opens on the first failure
    sim.set_faults([Fault(status=503, reason="busy")])
    service(
        WORKER_POOLS="llm-chat=1",
        CIRCUIT_BREAKER_THRESHOLD="1",
        CIRCUIT_BREAKER_RESET_TIMEOUT="200",
        CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="400",
        OLLAMA_MAX_RETRIES="0",
        QUEUE_DELAY="50",
        QUEUE_MAX_ATTEMPTS="3",
    )
    client = client_for(redis_url)
    # When one job keeps being the half-open breaker's probe
    job = chat(client, "a probe that never succeeds")
    result = wait_all(client, [job], timeout=60)[job]
    # Then it is not probed for ever: two failed probes were free, then it spent its attempts
    assert not result["success"] and "gave up after 3 attempts" in result["error"]
    (entry,) = [msgspec.json.decode(raw) for raw in r.lrange("llm-dead-letter", 0, -1)]
    assert entry["job"]["probeFailures"] == 2 and entry["attempts"] == 3
    assert sim.stats().requests["chat"] == 5  # the first attempt, two free probes, two paid ones


def test_a_sink_that_raises_never_fails_a_job_and_is_logged_once_a_minute(service, redis_url: str) -> None:
    svc = service(WORKER_POOLS="llm-chat=1", LLM_WORKER_PLUGINS="testplugins", TESTPLUGINS_SINK_RAISES="1")
    client = client_for(redis_url)
    results = wait_all(client, [chat(client, f"n{n}") for n in range(10)])
    assert all(res["success"] for res in results.values())
    # Once a minute in each process whose sink raised: the worker, and the model manager (its load events).
    said = [line.split()[2] for line in svc.tail(400).splitlines() if "metric sink testplugins raised" in line]
    assert said and len(said) == len(set(said)), said


def test_a_filter_that_breaks_fails_the_job_with_an_error_naming_it(service, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1", LLM_WORKER_PLUGINS="testplugins", TESTPLUGINS_FILTER_RAISES="1")
    client = client_for(redis_url)
    (result,) = wait_all(client, [chat(client)]).values()
    assert not result["success"] and "request filter plugin 'testplugins' failed" in result["error"]
    assert "KeyError" in result["error"] and result["retryCount"] == 0


def test_a_timeout_is_tried_once_more_with_reduced_parameters(service, sim: Simulator, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1", OLLAMA_TIMEOUT="500")
    client = client_for(redis_url)
    wait_all(client, [chat(client, "load it")])
    assert sim.stats().loads["llama3.2:latest"] == 1
    sim.set_faults([Fault(kind="hang", count=1, model="llama3.2")])
    request = {"messages": [{"role": "user", "content": "long answer"}], "options": {"num_predict": 10}}
    (result,) = wait_all(
        client, [client.submit("chat", request, model="llama3.2", timeout_ms=20_000)], timeout=30
    ).values()
    assert result["success"] and result["fallbackUsed"] and result["retryCount"] == 1
    assert result["model"] == "llama3.2"
    # The reduced call really went out: half the tokens, and no reload (load-time options untouched).
    assert result["completionTokens"] == 5
    assert sim.stats().loads["llama3.2:latest"] == 1


def test_out_of_memory_unloads_idle_models_then_tries_again(service, sim: Simulator, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1,llm-embeddings=1")
    client = client_for(redis_url)
    wait_all(client, [client.submit("embeddings", {"input": "warm"}, model="nomic-embed-text")])
    assert "nomic-embed-text:latest" in sim.stats().loaded
    sim.set_faults([Fault(status=500, reason="oom", count=1, model="llama3.2")])
    (result,) = wait_all(client, [chat(client)]).values()
    assert result["success"] and result["fallbackUsed"]
    assert "nomic-embed-text:latest" not in sim.stats().loaded  # unloaded to make room


def test_blocked_patterns_refuse_a_prompt_naming_the_pattern_and_long_answers_are_cut(service, redis_url: str) -> None:
    service(
        WORKER_POOLS="llm-chat=1",
        ENABLE_CONTENT_FILTERING="true",
        BLOCKED_PATTERNS='["(?i)credit card", "ssn: \\\\d+"]',
        MAX_RESPONSE_LENGTH="10",
    )
    client = client_for(redis_url)
    refused, cut = wait_all(
        client, [chat(client, "my CREDIT CARD is 4111"), chat(client, "tell me a long story")]
    ).values()
    assert refused["errorType"] == "validation" and "'(?i)credit card'" in refused["error"]
    assert "4111" not in refused["error"]
    assert (
        cut["success"]
        and len(cut["response"]["message"]["content"]) == 10
        and cut["response"]["doneReason"] == "length"
    )


def test_disabled_plugins_do_not_run(service, redis_url: str) -> None:
    service(
        WORKER_POOLS="llm-chat=1",
        ENABLE_CONTENT_FILTERING="true",
        BLOCKED_PATTERNS="blocked",
        LLM_WORKER_DISABLE_PLUGINS="content",
    )
    client = client_for(redis_url)
    (result,) = wait_all(client, [chat(client, "blocked words")]).values()
    assert result["success"]


def test_the_audit_log_has_a_line_per_outcome_and_no_prompt_text(service, redis_url: str, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    service(WORKER_POOLS="llm-chat=2", AUDIT_LOG_PATH=str(audit))
    client = client_for(redis_url)
    ids = [chat(client, f"private words {n}") for n in range(6)] + [chat(client, model="no-such-model")]
    wait_all(client, ids)
    lines = eventually(
        lambda: (lambda ls: ls if len(ls) == 7 else None)(audit.read_text().splitlines() if audit.exists() else []),
        what="seven audit lines",
    )
    entries = [msgspec.json.decode(line) for line in lines]
    assert {e["jobId"] for e in entries} == set(ids)
    assert sum(e["success"] for e in entries) == 6 and {e["action"] for e in entries} == {"completed", "failed"}
    for e in entries:
        assert {
            "timestamp",
            "workerId",
            "userId",
            "model",
            "processingTime",
            "tokensUsed",
            "error",
            "memoryBytes",
            "cpuSeconds",
        } <= set(e) and e["memoryBytes"] > 0
    assert "private words" not in audit.read_text()


def test_operators_force_reset_and_list_breakers_by_token(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    pull(sim, "mistral")
    svc = service(WORKER_POOLS="llm-chat=1", FALLBACK_MODELS="mistral", **TOKEN)
    key = "ollama:llama3.2"
    assert urllib3.request("POST", svc.url + f"/admin/breakers/force-open?key={key}").status == 401
    forced = urllib3.request("POST", svc.url + f"/admin/breakers/force-open?key={key}", headers=AUTH)
    assert forced.status == 200 and forced.json()["state"] == "open" and forced.json()["forced"] == "open"
    client = client_for(redis_url)
    (result,) = wait_all(client, [chat(client)]).values()
    assert result["model"] == "mistral" and result["fallbackUsed"]  # the forced breaker is honoured
    # Forced state survives a worker's death: a new worker sees it.
    import os  # noqa: E401
    import signal

    (pid,) = svc.worker_pids(r)
    os.kill(pid, signal.SIGKILL)
    eventually(lambda: svc.worker_pids(r) and svc.worker_pids(r) != [pid], what="a new worker")
    (result,) = wait_all(client, [chat(client)]).values()
    assert result["model"] == "mistral"
    reset = urllib3.request("POST", svc.url + f"/admin/breakers/reset?key={key}", headers=AUTH)
    assert reset.json()["state"] == "closed" and reset.json()["forced"] is None
    (result,) = wait_all(client, [chat(client)]).values()
    assert result["model"] == "llama3.2" and not result["fallbackUsed"]
    assert any(b["key"] == key for b in breakers(svc))
    assert urllib3.request("POST", svc.url + "/admin/breakers/reset?key=ollama:nope", headers=AUTH).status == 404
    assert eventually(lambda: events(r, "llm.breaker.closed"), what="the reset as an event")


def test_a_misspelled_hook_stops_start_up_naming_it(tmp_path: Path, redis_url: str) -> None:
    tests = Path(__file__).parent
    env = {
        "PATH": "/usr/bin:/bin",
        "REDIS_URL": redis_url,
        "LLM_WORKER_PLUGINS": "testplugins_typo",
        "PYTHONPATH": str(tests),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "llm_worker_recrod" in proc.stderr and "Traceback" not in proc.stderr
