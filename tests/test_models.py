"""The model manager, with running services against the simulator: preload, unload, pull; and `llm-worker models`.

Every service here turns its model manager every 200 ms (MODEL_MANAGER_INTERVAL)
and, unless a test says otherwise, never unloads idle models (MODEL_UNLOAD_TIMEOUT=0)
nor for memory (the service fixture's MODEL_MEMORY_THRESHOLD=1).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import urllib3
from fake_pynvml import GiB, gpu
from support import chat, client_for, events, eventually, wait_all
from test_http import FAST, scrape, value

from llm_worker.devtools.localredis import free_port
from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.models.policy import Loaded, evictable, idle, over_cache
from llm_worker.models.pullprogress import PullProgress

MODELS = ["llama3.2", "qwen2.5", "mistral", "nomic-embed-text", "slowpoke"]
SLOW_LOAD = 2.5  # seconds slowpoke takes to load
MANAGED = {
    "MODEL_MANAGER_INTERVAL": "200",
    "WORKER_POOLS": "llm-chat=1,llm-embeddings=1",
    "MODEL_UNLOAD_TIMEOUT": "0",
    **FAST,
}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The simulator with more models, one slow to load, and pulls that take a moment (0.4 s, four steps)."""
    config = SimulatorConfig(port=0, models=MODELS, model_load_ms={"slowpoke": SLOW_LOAD * 1000}, pull_ms=400)
    with Simulator(config) as simulator:
        yield simulator


def loaded(sim: Simulator) -> set[str]:
    return {name.removesuffix(":latest") for name in sim.stats().loaded}


def model_events(r, kind: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return events(r, f"llm.model.{kind}")


# ---- preload and readiness -----------------------------------------------------------


def test_preloading_holds_readiness_until_the_models_are_loaded(service, sim: Simulator, r) -> None:
    # Given: a chat model that takes 2.5 s to load and an embedding model, both to preload, with load-time options.
    started = time.monotonic()
    svc = service(
        ready=False,
        MODEL_PRELOAD_LIST="slowpoke,nomic-embed-text",
        MODEL_LOAD_OPTIONS="num_ctx=2048",
        EMBEDDING_LOAD_OPTIONS="num_ctx=1024",
        **MANAGED,
    )
    # Then: the host says it is preloading, and is ready only once both are in /api/ps.
    reasons = set()
    while True:
        try:
            status, body = svc.get("/health/ready")
        except urllib3.exceptions.HTTPError:
            status, body = None, {}
        if status == 200:
            break
        reasons.add(body.get("reason"))
        assert time.monotonic() - started < 30, f"not ready: {reasons}"
        time.sleep(0.05)
    assert "preloading models" in reasons
    assert time.monotonic() - started >= SLOW_LOAD
    assert loaded(sim) == {"slowpoke", "nomic-embed-text"}
    ps = urllib3.request("GET", sim.url + "/api/ps").json()["models"]
    # The host's pinned load-time options, each kind of model its own.
    assert {m["name"]: m["context_length"] for m in ps} == {"slowpoke:latest": 2048, "nomic-embed-text:latest": 1024}
    # The embedding model is loaded through /api/embed (Ollama's generate refuses it), the other through /api/generate.
    requests = sim.stats().requests
    assert requests.get("embed") == 1 and requests.get("generate") == 1
    # And: each load is an event with its duration, a log line and a metric.
    loads = eventually(
        lambda: (lambda e: e if len(e) == 2 else None)(model_events(r, "loaded")), what="two load events"
    )
    slow = next(e for e in loads if e["model"] == "slowpoke")
    assert (
        slow["loadSeconds"] >= SLOW_LOAD
        and slow["reason"] == "preload"
        and slow["workerId"].startswith(svc.env["WORKER_ID"])
    )
    assert "model loaded: slowpoke in 2." in svc.tail(200)
    samples = eventually(
        lambda: (lambda s: s if ("llm_worker_model_loads_total", (("model", "slowpoke"),)) in s else None)(scrape(svc)),
        what="load metrics",
    )
    assert value(samples, "llm_worker_model_loads_total", model="slowpoke") == 1
    assert value(samples, "llm_worker_model_load_seconds", model="slowpoke") >= SLOW_LOAD
    assert value(samples, "llm_worker_model_unloads_total", model="slowpoke") == 0
    samples = eventually(
        lambda: (lambda s: s if value(s, "llm_worker_models_loaded") == 2 else None)(scrape(svc)),
        what="the manager's view of /api/ps",
    )
    sizes = {m["name"].removesuffix(":latest"): m["size_vram"] or m["size"] for m in ps}
    assert value(samples, "llm_worker_model_memory_bytes", model="slowpoke") == sizes["slowpoke"] > 0


def test_a_failed_preload_does_not_hold_readiness_and_is_tried_again(service, sim: Simulator) -> None:
    # Given: a model to preload that Ollama does not have (and no auto pull).
    svc = service(MODEL_PRELOAD_LIST="latecomer", **MANAGED)
    # Then: the host is ready all the same, and the log says why the preload failed.
    assert svc.get("/health/ready")[0] == 200
    assert "preloading latecomer failed" in svc.tail(100) and "not found" in svc.tail(100)
    # When: someone pulls it; then a later turn loads it.
    urllib3.request("POST", sim.url + "/api/pull", json={"model": "latecomer", "stream": False})
    eventually(lambda: "latecomer" in loaded(sim), timeout=15, what="the preload tried again")


def test_without_preloading_the_manager_is_ready_at_once_and_still_unloads(
    service, sim: Simulator, redis_url: str
) -> None:
    svc = service(
        MODEL_PRELOAD_ENABLED="false", MODEL_PRELOAD_LIST="slowpoke", **{**MANAGED, "MODEL_UNLOAD_TIMEOUT": "1000"}
    )
    assert svc.get("/health/ready")[0] == 200 and "slowpoke" not in loaded(sim)
    client = client_for(redis_url)
    wait_all(client, [chat(client, model="llama3.2")])
    eventually(lambda: not loaded(sim), timeout=10, what="the idle model unloaded")


# ---- unloading ------------------------------------------------------------------------


def test_a_model_no_job_used_for_the_unload_timeout_is_unloaded(service, sim: Simulator, redis_url: str, r) -> None:
    svc = service(**{**MANAGED, "MODEL_UNLOAD_TIMEOUT": "1000"})
    client = client_for(redis_url)
    wait_all(client, [chat(client, model="llama3.2")])
    assert "llama3.2" in loaded(sim)
    eventually(lambda: "llama3.2" not in loaded(sim), timeout=10, what="the idle model unloaded")
    (unloaded,) = eventually(lambda: model_events(r, "unloaded"), what="the unload event")
    # Not before MODEL_UNLOAD_TIMEOUT since its job's call ended, as the worker told the manager.
    assert unloaded["model"] == "llama3.2" and unloaded["reason"] == "idle" and unloaded["idleSeconds"] >= 1.0
    assert "model unloaded: llama3.2 (idle)" in svc.tail(100)
    samples = eventually(
        lambda: (lambda s: s if s.get(("llm_worker_model_unloads_total", (("model", "llama3.2"),))) else None)(
            scrape(svc)
        ),
        what="the unload counted",
    )
    # The job asked the host for it, and the manager loaded it (jobs never load: see loadboard.py).
    assert value(samples, "llm_worker_model_loads_total", model="llama3.2") == 1
    (asked,) = [e for e in model_events(r, "loaded") if e["model"] == "llama3.2"]
    assert asked["reason"] == "a job asked" and asked["loadSeconds"] is not None


def test_past_the_cache_size_the_least_recently_used_model_is_unloaded(
    service, sim: Simulator, redis_url: str, r
) -> None:
    service(MODEL_CACHE_SIZE="2", **MANAGED)
    client = client_for(redis_url)
    for model in ("llama3.2", "qwen2.5", "mistral"):
        wait_all(client, [chat(client, model=model)])
    eventually(lambda: loaded(sim) == {"qwen2.5", "mistral"}, timeout=10, what="the LRU model unloaded")
    (unloaded,) = eventually(lambda: model_events(r, "unloaded"), what="the unload event")
    assert unloaded["model"] == "llama3.2" and unloaded["reason"] == "cache size"


def test_under_memory_pressure_idle_models_go_least_recently_used_first_and_a_busy_one_stays(
    service, sim: Simulator, redis_url: str, r, tmp_path: Path
) -> None:
    # Given: GPUs with room to spare, read from a file the test can change while the service runs.
    scenario = tmp_path / "gpus.json"
    write_gpus(scenario, used_gib=10)
    svc = service(
        LLM_WORKER_NVML_MODULE="fake_pynvml",
        FAKE_NVML_SCENARIO_FILE=str(scenario),
        **{**MANAGED, "MODEL_MEMORY_THRESHOLD": "0.5", "WORKER_POOLS": "llm-chat=2"},
    )
    client = client_for(redis_url)
    # And: three models loaded, used last in the order qwen2.5, llama3.2, then mistral, which is busy.
    for model in ("llama3.2", "qwen2.5", "mistral", "llama3.2"):
        wait_all(client, [chat(client, model=model)])
    sim.set_faults([Fault(kind="hang", model="mistral", endpoints=("chat",), seconds=8)])
    busy = chat(client, model="mistral")
    # Its call is in flight (the host's call gate counts it), hanging at the provider.
    eventually(lambda: svc.get("/status")[1]["providerCalls"]["inFlight"] == 1, what="the busy job at the provider")
    assert loaded(sim) == {"llama3.2", "qwen2.5", "mistral"}
    # When: GPU memory passes the threshold (72 of 80 GiB: 90% > 50%).
    write_gpus(scenario, used_gib=72)
    # Then: the idle ones go, least recently used first; the busy one stays.
    eventually(lambda: loaded(sim) == {"mistral"}, timeout=10, what="idle models unloaded")
    unloads = eventually(
        lambda: (lambda e: e if len(e) == 2 else None)(model_events(r, "unloaded")), what="two unload events"
    )
    assert [(e["model"], e["reason"]) for e in unloads] == [("qwen2.5", "memory"), ("llama3.2", "memory")]
    assert unloads[0]["memoryRatio"] == 0.9
    time.sleep(0.6)  # three more turns: still there while its job runs
    assert loaded(sim) == {"mistral"}
    # And: once its job is done, it is idle, and goes too.
    wait_all(client, [busy], timeout=20)
    eventually(lambda: not loaded(sim), timeout=10, what="the last model unloaded")


def write_gpus(path: Path, used_gib: int) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(json.dumps({"gpus": [gpu(0, memory_used=used_gib * GiB, memory_total=80 * GiB)]}))
    os.replace(temporary, path)


# ---- pulling --------------------------------------------------------------------------


def test_auto_pull_fetches_missing_models_with_progress_in_the_log(service, sim: Simulator) -> None:
    # Given: a preloaded model and an allowed one that Ollama lacks, and one the registry does not have.
    svc = service(
        MODEL_AUTO_PULL="true",
        MODEL_PRELOAD_LIST="phi3",
        ALLOWED_MODELS="phi3,gemma2,ghost-missing,llama3.2",
        **MANAGED,
    )
    # Then: the preloaded one was pulled and loaded before the host was ready.
    assert "phi3" in loaded(sim) and sim.stats().pulls.get("phi3:latest") == 1
    # And: the other allowed ones are pulled after it, and a registry's refusal is logged, not fatal.
    eventually(lambda: sim.stats().pulls.get("gemma2:latest") == 1, what="gemma2 pulled after ready")
    eventually(
        lambda: (
            "pulling ghost-missing failed: pull ghost-missing: pull model manifest: file does not exist"
            in svc.tail(200)
        ),
        what="the refusal logged",
    )
    log = [line for line in svc.tail(300).splitlines() if "pulling phi3" in line]
    assert any("pulling phi3: pulling manifest" in line for line in log) and any(
        "pulling phi3: success" in line for line in log
    )
    percents = [line for line in log if "%" in line]
    assert [p.split(": ")[-1].split("%")[0] for p in percents] == [
        "0",
        "25",
        "50",
        "75",
        "100",
    ]  # a line per step, not per byte
    assert sim.stats().pulls.get("llama3.2:latest") is None  # it had that one
    assert svc.get("/health/ready")[0] == 200


def test_pull_progress_is_a_line_per_status_and_tenth() -> None:
    said: list[str] = []
    progress = PullProgress(lambda text, fields: said.append(text))
    progress({"status": "pulling manifest"})
    for done in range(0, 1001, 7):
        progress({"status": "pulling abc", "total": 1000, "completed": min(done, 1000)})
    progress({"status": "pulling abc", "total": 1000, "completed": 1000})
    progress({"status": "success"})
    assert said[0] == "pulling manifest" and said[-1] == "success"
    assert [int(s.split(": ")[1].split("%")[0]) // 10 for s in said[1:-1]] == list(range(11))  # one line per tenth


# ---- the manager's choices, and its process -------------------------------------------------


def test_the_policy_never_picks_a_busy_or_freshly_preloaded_model() -> None:
    def m(name: str, last_used: float, busy: bool = False, protected: bool = False) -> Loaded:
        return Loaded(name, name, 1, last_used, busy, protected)

    models = [m("new", 30), m("busy", 1, busy=True), m("old", 10), m("preloaded", 5, protected=True), m("mid", 20)]
    assert [x.name for x in evictable(models)] == ["old", "mid", "new"]
    assert [x.name for x in idle(models, now=35, unload_after=10)] == ["old", "mid"]
    assert idle(models, now=1000, unload_after=0) == []  # 0: never
    assert [x.name for x in over_cache(models, cache_size=3)] == ["old", "mid"]
    assert over_cache(models, cache_size=5) == []


def test_a_dead_model_manager_is_replaced_and_the_host_stays_ready(service, sim: Simulator, r) -> None:
    svc = service(LOG_FORMAT="json", MODEL_PRELOAD_LIST="llama3.2", **MANAGED)

    def managers() -> list[int]:
        return [json.loads(line)["pid"] for line in svc.tail(500).splitlines() if '"models ready"' in line]

    (first,) = managers()
    os.kill(first, signal.SIGKILL)
    second = eventually(lambda: managers()[1:], timeout=15, what="a new model manager")[0]
    assert second != first and svc.get("/health/ready")[0] == 200
    assert "models process died; starting another" in svc.tail(500)
    # The new one finds the preloaded model loaded: no second load, no second event.
    assert sim.stats().loads == {"llama3.2:latest": 1} and len(model_events(r, "loaded")) == 1


# ---- llm-worker models ---------------------------------------------------------------


def models_cli(sim_url: str, *args: str, tty: bool = False) -> tuple[int, str, str]:
    env = {**os.environ, "OLLAMA_BASE_URL": sim_url, "OLLAMA_CONNECT_TIMEOUT": "1000"}
    command = [sys.executable, "-m", "llm_worker.cli", "models", *args]
    if not tty:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        return done.returncode, done.stdout, done.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    out = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    code = proc.wait(30)
    assert proc.stderr is not None
    return code, out.decode(), proc.stderr.read().decode()


def test_models_cli_lists_loads_unloads_and_pulls(sim: Simulator) -> None:
    code, out, _ = models_cli(sim.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "LOADED", "MEMORY", "(VRAM)", "EXPIRES"]
    assert any(line.startswith("llama3.2:latest") and " 2.0 GB " in line and " no" in line for line in lines)
    assert lines[-1] == f"{len(MODELS)} available, 0 loaded"

    code, out, _ = models_cli(sim.url, "load", "llama3.2", "--keep-alive", "10m")
    assert code == 0 and out.startswith("loaded llama3.2 in ") and loaded(sim) == {"llama3.2"}
    code, out, _ = models_cli(sim.url, "list")
    row = re.split(r"\s{2,}", next(line for line in out.splitlines() if line.startswith("llama3.2:latest")))
    assert row[:4] == ["llama3.2:latest", "2.0 GB", "yes", "2.0 GB"] and re.fullmatch(r"in (9m \d+s|10m 0s)", row[4]), (
        row
    )
    code, out, _ = models_cli(sim.url, "unload", "llama3.2")
    assert code == 0 and out == "unloaded llama3.2\n" and loaded(sim) == set()
    for zero in ("0", "0s"):  # a load that may stay for no time unloads, and says so
        models_cli(sim.url, "load", "llama3.2")
        code, out, _ = models_cli(sim.url, "load", "llama3.2", "--keep-alive", zero)
        assert code == 0 and out == f"unloaded llama3.2 (--keep-alive {zero})\n" and loaded(sim) == set()

    code, out, _ = models_cli(sim.url, "pull", "phi3")  # not a terminal: plain lines
    assert code == 0 and "\r" not in out
    lines = out.splitlines()
    assert lines[0] == "pulling manifest" and lines[-2:] == ["success", "pulled phi3"]
    assert [line.split(": ")[1].split("%")[0] for line in lines if "%" in line] == ["0", "25", "50", "75", "100"]
    assert sim.stats().pulls == {"phi3:latest": 1}


def test_models_cli_pull_draws_a_bar_on_a_terminal(sim: Simulator) -> None:
    code, out, _ = models_cli(sim.url, "pull", "phi3", tty=True)
    assert code == 0
    assert "\r" in out and "[##############################] 100% (2019 of 2019 MB)" in out
    assert "pulled phi3" in out


def test_models_cli_says_what_went_wrong_in_one_line(sim: Simulator) -> None:
    code, out, err = models_cli(sim.url, "pull", "ghost-missing")
    assert code == 1 and err == "llm-worker: pull ghost-missing: pull model manifest: file does not exist\n"
    code, _, err = models_cli(sim.url, "load", "nosuch")
    assert code == 1 and err.count("\n") == 1 and "not found" in err
    code, _, err = models_cli(f"http://127.0.0.1:{free_port()}")
    assert code == 1 and err.startswith("llm-worker: cannot reach Ollama at http://127.0.0.1:") and err.count("\n") == 1
    code, _, err = models_cli(sim.url, "load")
    assert code == 2 and "say which model" in err
    assert msgspec.json.decode(urllib3.request("GET", sim.url + "/api/ps").data)["models"] == []
