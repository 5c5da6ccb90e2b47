"""Several inference servers on one host: one real service, two real simulators as its two Ollama endpoints.

Each simulator is ``llm-worker simulate`` in a process of its own, on a free
port; which requests each served is read from its own stats (``/_sim/stats``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from support import assert_each_answered_once, chat, client_for, eventually, wait_all
from test_http import scrape, value

MODELS = "alpha,beta"
ADMIN = {"ADMIN_TOKEN": "t0ken"}


class SimProcess:
    """``llm-worker simulate`` as a process: the Ollama of one endpoint."""

    def __init__(self, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_worker.cli", "simulate", "--port", str(port), "--models", MODELS]
            + ["--latency-ms", "20", "--token-ms", "2", "--load-ms", "100"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "llm-worker simulator listening on http://HOST:PORT"
        assert "listening on" in line, f"the simulator did not start: {line!r}"
        self.url = line.rsplit(" ", 1)[-1].strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=10))

    def stats(self) -> dict[str, Any]:
        return self.http.request("GET", self.url + "/_sim/stats").json()  # type: ignore[no-any-return]

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, its port refusing connections."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


@pytest.fixture
def simulators() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def start(port: int = 0) -> SimProcess:
        started.append(SimProcess(port))
        return started[-1]

    yield start
    for sim in started:
        sim.kill()


def asked(stats: dict[str, Any]) -> set[str]:
    """The models a simulator was asked about (calls, loads, /api/show), by name."""
    return set(stats["requests_by_model"])


def status(svc: Any) -> dict[str, Any]:
    return svc.get("/status")[1]


def endpoints(svc: Any) -> dict[str, dict[str, Any]]:
    return {e["endpoint"]: e for e in status(svc)["endpoints"] if e["provider"] == "ollama"}


def test_jobs_for_two_models_go_where_each_model_is_loaded(
    service: Any, redis_url: str, simulators: Callable[..., SimProcess]
) -> None:
    # Given: two Ollama servers, each keeping one model, and two chat workers.
    first, second = simulators(), simulators()
    svc = service(
        OLLAMA_BASE_URL=f"{first.url},{second.url}",
        MODEL_CACHE_SIZE="1",
        MODEL_MANAGER_INTERVAL="200",
        WORKER_POOLS="llm-chat=2",
    )
    client = client_for(redis_url)
    # When: a job for alpha, then one for beta (beta finds alpha on the first server, and room on the second),
    wait_all(client, [chat(client, model="alpha")], timeout=30)
    wait_all(client, [chat(client, model="beta")], timeout=30)
    # and then twenty more, the two models mixed, two at a time.
    ids = [chat(client, f"question {i}", model=("alpha", "beta")[i % 2]) for i in range(20)]
    results = wait_all(client, ids, timeout=60)
    # Then: every one answered, each server served one model, all of that model's jobs, and loaded it once.
    assert all(result["success"] for result in results.values())
    ones, twos = first.stats(), second.stats()
    assert asked(ones) == {"alpha:latest"} and asked(twos) == {"beta:latest"}
    assert ones["requests"]["chat"] == 11 and twos["requests"]["chat"] == 11
    assert ones["loads"] == {"alpha:latest": 1} and twos["loads"] == {"beta:latest": 1}
    # /status shows each endpoint with what it holds.
    shown = eventually(
        lambda: (lambda e: e if e["ollama@2"]["modelsLoaded"] else None)(endpoints(svc)), what="both surveyed"
    )
    assert shown["ollama@1"]["url"] == first.url and shown["ollama@1"]["modelsLoaded"] == ["alpha:latest"]  # type: ignore[index]
    assert shown["ollama@2"]["url"] == second.url and shown["ollama@2"]["modelsLoaded"] == ["beta:latest"]  # type: ignore[index]
    samples = scrape(svc)
    assert value(samples, "llm_worker_model_loads_total", model="alpha", endpoint=first.url) == 1
    assert value(samples, "llm_worker_model_loads_total", model="alpha", endpoint=second.url) == 0


def test_with_one_server_killed_the_other_serves_every_job_and_the_host_never_pauses(
    service: Any, redis_url: str, r: Any, simulators: Callable[..., SimProcess]
) -> None:
    # Given: two Ollama servers, alpha loaded on the first by a first job.
    first, second = simulators(), simulators()
    svc = service(
        OLLAMA_BASE_URL=f"{first.url},{second.url}",
        MODEL_MANAGER_INTERVAL="200",
        QUEUE_DELAY="100",
        WORKER_POOLS="llm-chat=2",
        **ADMIN,
    )
    client = client_for(redis_url)
    warm = chat(client, model="alpha")
    wait_all(client, [warm], timeout=30)
    assert first.stats()["requests"]["chat"] == 1
    # When: forty jobs for alpha come, and the first server dies while it serves them.
    ids = [chat(client, f"question {i}", model="alpha") for i in range(40)]
    eventually(lambda: first.stats()["requests"]["chat"] >= 4, what="the first serving the jobs")
    first.kill()
    # Then: the host never pauses and stays ready while the second serves the rest, no job lost.
    deadline = time.monotonic() + 60
    while r.exists(*[f"llm:result:{job}" for job in ids]) < len(ids):
        assert time.monotonic() < deadline, "the jobs were not all answered within 60 s"
        pool = status(svc)["pools"]["llm-chat"]
        assert not pool["paused"], pool
        assert svc.get("/health/ready")[0] == 200
        time.sleep(0.05)
    results = wait_all(client, ids, timeout=5)
    assert all(result["success"] for result in results.values())
    assert_each_answered_once(r, [warm, *ids])
    twos = second.stats()
    assert twos["requests"]["chat"] >= 20 and twos["loads"] == {"alpha:latest": 1}
    # Only the dead server is down, and only its breakers saw failures.
    shown = endpoints(svc)
    assert shown["ollama@1"]["reachable"] is False and shown["ollama@2"]["reachable"] is True
    breakers = urllib3.request("GET", svc.url + "/admin/breakers", headers={"Authorization": "Bearer t0ken"}).json()
    states = {row["key"]: row["state"] for row in breakers["breakers"]}
    assert states["ollama@2:alpha"] == "closed"
    assert all(key.startswith("ollama@1:") for key, state in states.items() if state != "closed")
    # /health/ollama: healthy, since one answers, and says which is down.
    code, health = eventually(
        lambda: (lambda got: got if got[1].get("down") else None)(svc.get("/health/ollama")), what="the down one named"
    )
    assert code == 200 and health["status"] == "healthy" and health["down"] == [first.url]
    assert {e["endpoint"]: e["status"] for e in health["endpoints"]} == {"ollama@1": "unhealthy", "ollama@2": "healthy"}
    samples = scrape(svc)
    assert value(samples, "llm_worker_provider_reachable", provider="ollama", endpoint=first.url) == 0
    assert value(samples, "llm_worker_provider_reachable", provider="ollama", endpoint=second.url) == 1
    # And when the first is back on its address, the host finds it again without a pause to probe it.
    simulators(first.port)
    eventually(lambda: endpoints(svc)["ollama@1"]["reachable"], timeout=15, what="the first reachable again")
