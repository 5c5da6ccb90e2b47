"""The host against Ollama as it really behaves: loads, slots, residency, crashes, incomplete answers.

Each test names the point of Ollama's behaviour it stands on (server/sched.go,
server/routes.go, v0.33); the simulator imitates it (docs/simulator.md).
Services here turn their model manager every 200 ms and retry after 200 ms.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_worker.config import load
from llm_worker.models import ModelManager
from llm_worker.shm import SharedState
from llm_worker.simulator import Simulator, SimulatorConfig
from support import chat, client_for, events, wait_all

SLOW_LOAD_MS = 4000
FAST = {"MODEL_MANAGER_INTERVAL": "200", "QUEUE_DELAY": "200", "MODEL_UNLOAD_TIMEOUT": "0",
        "WORKER_POOLS": "llm-chat=2,llm-embeddings=1"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """Ollama with a model that takes 4 s to load, one that rambles on, and a broken one."""
    config = SimulatorConfig(port=0, models=["llama3.2", "slowpoke", "broken", "nomic-embed-text"],
                             model_load_ms={"slowpoke": SLOW_LOAD_MS})
    with Simulator(config) as simulator:
        yield simulator


def opened_breakers(r) -> list[dict]:  # type: ignore[no-untyped-def]
    return events(r, "llm.breaker.opened")


# ---- 1. a load belongs to the host ----------------------------------------------------


def test_a_slow_load_is_loaded_once_for_every_job_and_never_trips_the_breaker(service, sim: Simulator, redis_url: str,
                                                                                r) -> None:
    # Given: a model that takes 4 s to load and a breaker that opens after two failures.
    service(CIRCUIT_BREAKER_THRESHOLD="2", QUEUE_MAX_ATTEMPTS="8", **FAST)
    client = client_for(redis_url)
    # When: two jobs that may wait only 1.5 s each ask for it.
    short = [chat(client, model="slowpoke", timeout_ms=1500, max_retries=7) for _ in range(2)]
    results = wait_all(client, short, timeout=60)
    # Then: they waited for the host's one load (their attempts timed out waiting, and were tried
    # again), and answered once it was done; the load was never aborted nor counted as a failure.
    assert all(res["success"] for res in results.values()), results
    assert sim.stats().loads.get("slowpoke:latest") == 1
    assert not opened_breakers(r)
    loading = [e for e in events(r, "llm.model.loading") if e["model"] == "slowpoke"]
    assert [e["reason"] for e in loading] == ["a job asked"]
    (loaded,) = [e for e in events(r, "llm.model.loaded") if e["model"] == "slowpoke"]
    assert loaded["loadSeconds"] >= SLOW_LOAD_MS / 1000
    # And: later jobs with time to spare find it resident.
    later = [chat(client, model="slowpoke", timeout_ms=30000) for _ in range(4)]
    assert all(res["success"] for res in wait_all(client, later, timeout=30).values())
    assert sim.stats().loads.get("slowpoke:latest") == 1


def test_a_job_whose_model_is_missing_fails_as_a_model_error_without_waiting(service, sim: Simulator,
                                                                           redis_url: str) -> None:
    service(**FAST)
    client = client_for(redis_url)
    (result,) = wait_all(client, [chat(client, model="nowhere", max_retries=0)], timeout=30).values()
    assert not result["success"] and result["errorType"] == "model"
    assert "nowhere" in result["error"]


# ---- 6. residency like Ollama's ---------------------------------------------------------


@pytest.mark.parametrize(("setting", "gpus", "expected"), [("0", 0, 3), ("0", 2, 6), ("5", 2, 5)])
def test_the_cache_size_defaults_to_what_ollama_keeps(setting: str, gpus: int, expected: int) -> None:
    # Ollama keeps 3 models per GPU (server/sched.go defaultModelsPerGPU), 3 without a GPU.
    settings = load({"MODEL_CACHE_SIZE": setting}).settings
    state = SharedState(1)
    state.readings.gpu_collector_up = int(gpus > 0)
    state.readings.gpu_count = gpus
    manager = ModelManager(settings, state, provider=None, plugins=None, worker_id="h:1")  # type: ignore[arg-type]
    assert manager.cache_size() == expected


# ---- 11. the timeout fallback works with the default settings -----------------------------


def test_a_too_slow_answer_becomes_a_shorter_one_within_the_jobs_time_by_default(service, redis_url: str) -> None:
    # Given: a model that writes 4,000 tokens at 1 ms each, unless told to stop sooner.
    config = SimulatorConfig(port=0, reply_tokens=4000, token_ms=1)
    with Simulator(config) as rambling:
        service(OLLAMA_BASE_URL=rambling.url, **FAST)
        client = client_for(redis_url)
        # When: a job that sets no num_predict may take 4.8 s (the whole answer takes 4 s and more).
        job = chat(client, model="llama3.2", timeout_ms=4800)
        (result,) = wait_all(client, [job], timeout=30).values()
    # Then: its first call gave up at three quarters of that (FALLBACK_TIMEOUT_RESERVE=0.25), and the
    # timeout fallback asked for 256 tokens, which came within the quarter kept back.
    assert result["success"], result
    assert result["fallbackUsed"] is True
    assert result["completionTokens"] == 256 and result["response"]["doneReason"] == "length"

