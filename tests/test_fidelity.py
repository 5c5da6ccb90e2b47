"""The host against Ollama as it really behaves: loads, slots, residency, crashes, incomplete answers.

Each test names the point of Ollama's behaviour it stands on (server/sched.go,
server/routes.go, v0.33); the simulator imitates it (docs/simulator.md).
Services here turn their model manager every 200 ms and retry after 200 ms.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import urllib3
from support import chat, client_for, events, eventually, wait_all

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.host.shm import SharedState
from llm_worker.models.manager import ModelManager
from llm_worker.settings.config import load

SLOW_LOAD_MS = 4000
FAST = {
    "MODEL_MANAGER_INTERVAL": "200",
    "QUEUE_DELAY": "200",
    "MODEL_UNLOAD_TIMEOUT": "0",
    "WORKER_POOLS": "llm-chat=2,llm-embeddings=1",
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """Ollama with a model that takes 4 s to load, one that rambles on, and a broken one."""
    config = SimulatorConfig(
        port=0, models=["llama3.2", "slowpoke", "broken", "nomic-embed-text"], model_load_ms={"slowpoke": SLOW_LOAD_MS}
    )
    with Simulator(config) as simulator:
        yield simulator


def metrics_text(svc) -> str:  # type: ignore[no-untyped-def]
    return urllib3.request("GET", svc.url + "/metrics").data.decode()


def opened_breakers(r) -> list[dict]:  # type: ignore[no-untyped-def]
    return events(r, "llm.breaker.opened")


# ---- 1. a load belongs to the host ----------------------------------------------------


def test_a_slow_load_is_loaded_once_for_every_job_and_never_trips_the_breaker(
    service, sim: Simulator, redis_url: str, r
) -> None:
    # Given: a model that takes 4 s to load and a breaker that opens after two failures.
    svc = service(CIRCUIT_BREAKER_THRESHOLD="2", QUEUE_MAX_ATTEMPTS="8", **FAST)
    client = client_for(redis_url)
    # When: two jobs that may wait only 1.5 s each ask for it.
    short = [chat(client, model="slowpoke", timeout_ms=1500, max_retries=7) for _ in range(2)]
    # Then: /status and /metrics show the load while it runs, why it started and for how long.
    (loading,) = eventually(lambda: svc.get("/status")[1]["models"]["loading"], timeout=10, what="the load shown")
    assert loading["model"] == "slowpoke" and loading["why"] == "a job asked" and loading["seconds"] >= 0
    assert 'llm_worker_model_loading_seconds{model="slowpoke",reason="a job asked"}' in metrics_text(svc)
    results = wait_all(client, short, timeout=60)
    # Then: they waited for the host's one load (their attempts timed out waiting, and were tried
    # again), and answered once it was done; the load was never aborted nor counted as a failure.
    assert all(res["success"] for res in results.values()), results
    assert sim.stats().loads.get("slowpoke:latest") == 1
    assert not opened_breakers(r)
    began = [e for e in events(r, "llm.model.loading") if e["model"] == "slowpoke"]
    assert [e["reason"] for e in began] == ["a job asked"]
    (loaded,) = [e for e in events(r, "llm.model.loaded") if e["model"] == "slowpoke"]
    assert loaded["loadSeconds"] >= SLOW_LOAD_MS / 1000
    # And: later jobs with time to spare find it resident.
    later = [chat(client, model="slowpoke", timeout_ms=30000) for _ in range(4)]
    assert all(res["success"] for res in wait_all(client, later, timeout=30).values())
    assert sim.stats().loads.get("slowpoke:latest") == 1


def test_a_job_whose_model_is_missing_fails_as_a_model_error_without_waiting(
    service, sim: Simulator, redis_url: str
) -> None:
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


# ---- 4. a runner that crashes every time ---------------------------------------------------


def test_a_runner_that_crashes_every_time_opens_its_breaker_and_is_then_left_alone(
    service, sim: Simulator, redis_url: str, r
) -> None:
    # Given: a model whose runner dies on every call (Ollama v0.30+ wording), and a breaker of three.
    sim.set_faults(
        [
            Fault(
                status=500,
                message="llama-server process has terminated: exit status 2",
                model="broken",
                endpoints=("chat",),
            )
        ]
    )
    service(
        CIRCUIT_BREAKER_THRESHOLD="3",
        CIRCUIT_BREAKER_RESET_TIMEOUT="600000",
        CIRCUIT_BREAKER_MAX_RESET_TIMEOUT="600000",
        OLLAMA_MAX_RETRIES="0",
        **FAST,
    )
    client = client_for(redis_url)
    # When: thirty jobs ask for it.
    _ = [chat(client, f"q{n}", model="broken", max_retries=1) for n in range(30)]
    # Then: each crash was first taken for want of memory (idle models unloaded, tried again); the crash
    # that came back counted, and after three such jobs the breaker opened and the model was left alone.
    (opened,) = eventually(lambda: opened_breakers(r), timeout=30, what="the breaker opened")
    assert opened["model"] == "broken"
    dead = eventually(
        lambda: (lambda d: d if len(d) >= 3 else None)(events(r, "llm.request.dead_lettered")),
        timeout=30,
        what="three jobs dead-lettered",
    )
    assert all(e["errorType"] == "memory" and "terminated" in e["error"] for e in dead)
    time.sleep(1.0)  # what else would be called, is called now
    calls = sim.stats().requests["chat"]
    assert calls <= 3 * 2 + 2, calls  # two calls for each counted job, and two workers' calls in flight at most
    assert sim.stats().requests["chat"] == calls


# ---- 5. per-model slots ----------------------------------------------------------------------


def test_no_call_waits_inside_ollama_for_its_models_slot_while_another_model_goes_ahead(
    service, redis_url: str
) -> None:
    # Given: Ollama with one slot per model (its default OLLAMA_NUM_PARALLEL), answers taking 0.3 s.
    with Simulator(SimulatorConfig(port=0, models=["llama3.2", "qwen2.5"], latency_ms=300)) as ollama:
        service(OLLAMA_BASE_URL=ollama.url, **{**FAST, "WORKER_POOLS": "llm-chat=4"})
        client = client_for(redis_url)
        # When: four jobs for one model and two for another come at once, with room for ten calls on the host.
        ids = [chat(client, f"a{n}", model="llama3.2") for n in range(4)] + [
            chat(client, f"b{n}", model="qwen2.5") for n in range(2)
        ]
        results = wait_all(client, ids, timeout=30)
        stats = ollama.stats()
    # Then: every job answered, no request ever waited inside Ollama for a slot (the host held them),
    # and the second model's jobs did not queue behind the first's.
    assert all(res["success"] for res in results.values())
    assert stats.max_waiting == 0, stats
    done = {job: res["completedAt"] for job, res in results.items()}
    assert max(done[i] for i in ids[4:]) < max(done[i] for i in ids[:4])


# ---- 8. answers without their end ---------------------------------------------------------------


def test_an_answer_without_its_done_line_is_retried_then_answered_as_incomplete(
    service, sim: Simulator, redis_url: str, r
) -> None:
    # Given: Ollama ending every answer of llama3.2 without its done line (its repeated-token abort).
    sim.set_faults([Fault(kind="abort", model="llama3.2", after_chunks=3)])
    service(CIRCUIT_BREAKER_THRESHOLD="1", **FAST)
    client = client_for(redis_url)
    # When: a job with two attempts asks, once whole and once streamed.
    whole = chat(client, "tell me", model="llama3.2", max_retries=1)
    streamed = client.submit(
        "chat", {"messages": [{"role": "user", "content": "tell me"}], "stream": True}, model="llama3.2", max_retries=1
    )
    results = wait_all(client, [whole, streamed], timeout=30)
    # Then: never a silent success: tried again, and on its last attempt answered as the part it is.
    assert results[whole]["success"] and results[whole]["response"]["doneReason"] == "incomplete"
    assert results[whole]["retryCount"] == 1
    # A stream whose text is out cannot be taken back: answered at once, as incomplete.
    assert results[streamed]["success"] and results[streamed]["response"]["doneReason"] == "incomplete"
    assert results[streamed]["retryCount"] == 0
    assert results[streamed]["response"]["message"]["content"]
    # And the server answered: no breaker opened.
    assert not opened_breakers(r)


# ---- 9. thinking models ----------------------------------------------------------------------------


def test_a_thinking_models_reasoning_is_kept_apart_in_results_and_streams(service, redis_url: str, r) -> None:
    with Simulator(SimulatorConfig(port=0, models=["qwen3", "llama3.2"])) as ollama:
        service(OLLAMA_BASE_URL=ollama.url, **FAST)
        client = client_for(redis_url)
        chat_id = client.submit(
            "chat", {"messages": [{"role": "user", "content": "why"}], "think": "high", "stream": True}, model="qwen3"
        )
        generate_id = client.submit("generate", {"prompt": "why"}, model="qwen3")
        results = wait_all(client, [chat_id, generate_id], timeout=30)
    message = results[chat_id]["response"]["message"]
    assert message["thinking"] and message["content"] and message["thinking"] != message["content"]
    assert results[generate_id]["response"]["thinking"] and results[generate_id]["response"]["response"]
    chunks = [fields for _, fields in r.xrange(f"llm:stream:{chat_id}") if fields.get(b"event") == b"chunk"]
    thought = "".join(f[b"thinking"].decode() for f in chunks if b"thinking" in f)
    said = "".join(f[b"content"].decode() for f in chunks)
    assert thought == message["thinking"] and said == message["content"]


# ---- 7. a load option Ollama refuses stops start-up ----------------------------------------------


def test_a_load_option_ollama_refuses_stops_start_up_naming_the_setting(service, sim: Simulator) -> None:
    # An Ollama of another version insisting on another type than the settings checked (api/types.go FromMap).
    sim.set_faults([Fault(status=500, message='option "num_ctx" must be of type integer', endpoints=("load",))])
    svc = service(ready=False, MODEL_PRELOAD_LIST="llama3.2", MODEL_LOAD_OPTIONS="num_ctx=2048", **FAST)
    assert svc.wait(30) == 2
    assert "MODEL_LOAD_OPTIONS" in svc.tail(40) and "stopping" in svc.tail(40)
