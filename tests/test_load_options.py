"""Load-time options are the host's, not the job's: Ollama never reloads a model because two jobs disagreed."""

from __future__ import annotations

import time
from datetime import datetime

import urllib3
from support import client_for, wait_all

from llm_worker.devtools.simulator import Simulator


def loaded_context(sim: Simulator) -> dict[str, int]:
    models = urllib3.request("GET", sim.url + "/api/ps").json()["models"]
    return {m["name"]: m["context_length"] for m in models}


def test_jobs_with_different_load_options_never_reload_a_model(service, sim: Simulator, redis_url: str) -> None:
    service(
        WORKER_POOLS="llm-chat=2,llm-embeddings=1",
        MODEL_LOAD_OPTIONS="num_ctx=8192,num_batch=256",
        EMBEDDING_LOAD_OPTIONS="num_ctx=2048,num_batch=2048",
    )
    client = client_for(redis_url)
    ids = []
    for n, options in enumerate(
        [
            None,
            {"num_ctx": 1024},
            {"num_ctx": 32768, "temperature": 0.5},
            {"num_batch": 8},
            {"num_ctx": 2048, "num_gpu": 1, "num_predict": 3},
        ]
    ):
        request = {"messages": [{"role": "user", "content": f"q{n}"}], **({"options": options} if options else {})}
        ids.append(client.submit("chat", request, model="llama3.2"))
        ids.append(
            client.submit(
                "embeddings", {"input": f"t{n}", **({"options": options} if options else {})}, model="nomic-embed-text"
            )
        )
    results = wait_all(client, ids)
    assert all(res["success"] for res in results.values())
    stats = sim.stats()
    assert stats.loads == {"llama3.2:latest": 1, "nomic-embed-text:latest": 1}  # one load each, then never again
    # Each kind of model with its own: Ollama cuts an embedding input to num_batch tokens.
    assert loaded_context(sim) == {"llama3.2:latest": 8192, "nomic-embed-text:latest": 2048}
    # Options that are not load-time still reach the model: num_predict cut that answer short.
    assert [res["completionTokens"] for res in results.values() if res.get("completionTokens") == 3]


def test_without_model_load_options_jobs_still_cannot_change_them(service, sim: Simulator, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    ids = [
        client.submit(
            "chat", {"messages": [{"role": "user", "content": "x"}], "options": {"num_ctx": ctx}}, model="llama3.2"
        )
        for ctx in (512, 4096, 16384)
    ]
    assert all(res["success"] for res in wait_all(client, ids).values())
    assert sim.stats().loads == {"llama3.2:latest": 1}
    assert loaded_context(sim) == {"llama3.2:latest": sim.config.num_ctx}  # Ollama's default, for every job


def test_a_jobs_keep_alive_cannot_unload_a_model_the_host_keeps(service, sim: Simulator, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1,llm-embeddings=1", MODEL_UNLOAD_TIMEOUT="600000")
    client = client_for(redis_url)
    ids = [
        client.submit("chat", {"messages": [{"role": "user", "content": "x"}], "keepAlive": 0}, model="llama3.2"),
        client.submit("embeddings", {"input": "x", "keepAlive": "0s"}, model="nomic-embed-text"),
    ]
    assert all(res["success"] for res in wait_all(client, ids).values())
    assert sim.stats().unloads == {}
    models = urllib3.request("GET", sim.url + "/api/ps").json()["models"]
    assert {m["name"] for m in models} == {"llama3.2:latest", "nomic-embed-text:latest"}
    # Ollama keeps them a little longer than the manager would (600 s + a minute): its expiry is only a safety net.
    for model in models:
        left = datetime.fromisoformat(model["expires_at"]).timestamp() - time.time()
        assert 600 < left <= 661, model
