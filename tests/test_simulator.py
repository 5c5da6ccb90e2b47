"""The Ollama simulator, over real sockets: shapes, load semantics, capacity, faults, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import pytest
import requests

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig, parse_fault

CHAT_MODEL = "llama3.2"
EMBED_MODEL = "nomic-embed-text"
OOM = "llama-server reported out-of-memory during startup: cudaMalloc failed: out of memory"
RUNNER = "llama-server process has terminated: exit status 2"
BUSY = "server busy, please try again.  maximum pending requests exceeded"


@contextmanager
def simulator(**settings: Any) -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(**settings)) as sim:
        yield sim


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator() as running:
        yield running


def post(sim: Simulator, path: str, timeout: float | tuple[float, float] = 10, **body: Any) -> requests.Response:
    # stream=True lets a test read a broken stream line by line; .json() still reads it all.
    return requests.post(sim.url + path, json=body, timeout=timeout, stream=True)


def chat(sim: Simulator, text: str = "Why is the sky blue?", model: str = CHAT_MODEL, **body: Any) -> requests.Response:
    body.setdefault("stream", False)
    return post(sim, "/api/chat", model=model, messages=[{"role": "user", "content": text}], **body)


def stream_lines(response: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in response.iter_lines() if raw]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---- endpoint shapes ------------------------------------------------------


def test_root_version_and_head(sim: Simulator) -> None:
    root = requests.get(sim.url + "/", timeout=10)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["Content-Type"].startswith("text/plain")
    assert requests.head(sim.url + "/", timeout=10).status_code == 200
    assert "version" in requests.get(sim.url + "/api/version", timeout=10).json()
    assert requests.get(sim.url + "/api/nothing", timeout=10).status_code == 404


def test_tags_lists_the_configured_models() -> None:
    with simulator(models=["llama3.2", "qwen2.5:7b"]) as sim:
        models = requests.get(sim.url + "/api/tags", timeout=10).json()["models"]
    assert [m["name"] for m in models] == ["llama3.2:latest", "qwen2.5:7b"]
    for model in models:
        assert {"name", "model", "modified_at", "size", "digest", "details"} <= model.keys()
        assert {"format", "family", "parameter_size", "quantization_level"} <= model["details"].keys()


def test_show_answers_details_or_404(sim: Simulator) -> None:
    shown = post(sim, "/api/show", model=EMBED_MODEL)
    assert shown.status_code == 200
    assert shown.json()["details"]["family"] and "capabilities" in shown.json()
    assert post(sim, "/api/show", name=CHAT_MODEL).status_code == 200  # the older spelling
    # ShowHandler names the model as Ollama shows it (DisplayShortest), tag included.
    assert post(sim, "/api/show", model="nope").json() == {"error": "model 'nope:latest' not found"}


def test_chat_answers_whole_and_deterministic(sim: Simulator) -> None:
    reply = chat(sim, "Why is the sky blue?")
    assert reply.status_code == 200 and reply.headers["Content-Length"]
    body = reply.json()
    assert body["model"] == CHAT_MODEL and body["done"] is True and body["done_reason"] == "stop"
    assert body["message"] == {"role": "assistant", "content": "Why is the sky blue? 6 7 8 9 10 11 12"}
    assert body["eval_count"] == len(body["message"]["content"].split()) == 12
    assert body["prompt_eval_count"] == 5
    for key in ("created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert key in body
    again = chat(sim, "Why is the sky blue?", options={"seed": 42, "temperature": 0}).json()
    assert again["message"] == body["message"]


def test_generate_answers_response_and_context(sim: Simulator) -> None:
    body = post(sim, "/api/generate", model=CHAT_MODEL, prompt="count with me", stream=False).json()
    assert body["response"] == "count with me 4 5 6 7 8 9 10 11 12"
    assert body["done"] is True and body["eval_count"] == 12 and body["prompt_eval_count"] == 3
    assert isinstance(body["context"], list)


def test_num_predict_bounds_the_reply(sim: Simulator) -> None:
    body = chat(sim, "a b c d e", options={"num_predict": 3}).json()
    assert body["message"]["content"] == "a b c"
    assert (body["eval_count"], body["done_reason"]) == (3, "length")


def test_streaming_is_the_default_and_ndjson(sim: Simulator) -> None:
    reply = requests.post(
        sim.url + "/api/chat",
        json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello"}]},
        stream=True,
        timeout=10,
    )
    assert reply.headers["Content-Type"] == "application/x-ndjson"
    assert reply.headers["Transfer-Encoding"] == "chunked"
    lines = stream_lines(reply)
    assert all(not line["done"] for line in lines[:-1]) and len(lines) == 13
    assert "".join(line["message"]["content"] for line in lines) == "hello 2 3 4 5 6 7 8 9 10 11 12"
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 12


def test_stream_lines_arrive_while_the_rest_is_produced() -> None:
    with simulator(token_ms=150, reply_tokens=8) as sim:
        reply = requests.post(
            sim.url + "/api/generate", json={"model": CHAT_MODEL, "prompt": "hi"}, stream=True, timeout=10
        )
        lines = reply.iter_lines()
        first = json.loads(next(lines))
        # Given the first line is in hand, the request is still holding its slot.
        assert first["done"] is False and first["response"] == "hi"
        assert sim.stats().in_slots == 1
        rest = [json.loads(raw) for raw in lines if raw]
    assert rest[-1]["done"] is True and len(rest) == 8


# ---- loading and unloading ------------------------------------------------


def running_models(sim: Simulator) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = requests.get(sim.url + "/api/ps", timeout=10).json()["models"]
    return models


def test_load_then_unload_with_keep_alive_zero(sim: Simulator) -> None:
    assert running_models(sim) == []
    loaded = post(sim, "/api/generate", model=CHAT_MODEL).json()
    assert (loaded["done"], loaded["done_reason"], loaded["response"]) == (True, "load", "")
    (entry,) = running_models(sim)
    assert entry["name"] == "llama3.2:latest" and entry["context_length"] == 4096
    assert {"model", "size", "digest", "details", "expires_at", "size_vram"} <= entry.keys()
    unloaded = post(sim, "/api/chat", model=CHAT_MODEL, messages=[], keep_alive="0s").json()
    assert unloaded["done_reason"] == "unload" and unloaded["message"]["content"] == ""
    assert running_models(sim) == []
    assert sim.stats().loads == {"llama3.2:latest": 1}
    assert sim.stats().unloads == {"llama3.2:latest": 1}


def test_keep_alive_zero_with_a_prompt_unloads_after_answering(sim: Simulator) -> None:
    assert chat(sim, keep_alive=0).status_code == 200
    assert running_models(sim) == []


def test_idle_model_expires_after_its_keep_alive(sim: Simulator) -> None:
    chat(sim, keep_alive=0.2)
    wait_for(lambda: running_models(sim) == [])


def test_slow_first_load_costs_once() -> None:
    with simulator(model_load_ms={CHAT_MODEL: 300}) as sim:
        first, second = chat(sim).json(), chat(sim).json()
        assert first["load_duration"] >= 300_000_000
        assert second["load_duration"] < 300_000_000
        assert sim.stats().loads == {"llama3.2:latest": 1}


def test_changed_load_options_reload_the_model(sim: Simulator) -> None:
    chat(sim, options={"num_ctx": 8192})
    chat(sim, options={"num_ctx": 8192, "temperature": 0.1})  # sampling options reload nothing
    assert sim.stats().loads == {"llama3.2:latest": 1}
    assert running_models(sim)[0]["context_length"] == 8192
    chat(sim, options={"num_ctx": 8192, "num_batch": 256})
    chat(sim)  # no num_ctx means Ollama's default, not the loaded 8192
    assert sim.stats().loads == {"llama3.2:latest": 3}
    assert running_models(sim)[0]["context_length"] == 4096


@pytest.mark.parametrize(
    ("style", "message"),
    [
        ("old", 'model "ghost" not found, try pulling it first'),
        ("new", "model 'ghost' not found"),
    ],
)
def test_unknown_model_is_404_in_either_style(style: str, message: str) -> None:
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
        ("/api/generate", {"prompt": "x"}),
        ("/api/embed", {"input": "x"}),
    ]
    with simulator(not_found_style=style) as sim:
        for path, body in bodies:
            reply = post(sim, path, model="ghost", **body)
            assert (reply.status_code, reply.json()) == (404, {"error": message})


def test_pull_streams_progress_then_the_model_is_there(sim: Simulator) -> None:
    lines = stream_lines(post(sim, "/api/pull", model="qwen2.5"))
    statuses = [line["status"] for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-3:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
    ]
    progress = [line for line in lines if "completed" in line]
    assert len(progress) >= 3 and progress[-1]["completed"] == progress[-1]["total"]
    assert progress[0]["digest"].startswith("sha256:")
    assert chat(sim, model="qwen2.5").status_code == 200
    assert post(sim, "/api/pull", model="llama3.2", stream=False).json() == {"status": "success"}


def test_pull_of_an_unknown_model_fails() -> None:
    error = {"error": "pull model manifest: file does not exist"}
    with simulator(registry=["qwen2.5"]) as sim:
        assert stream_lines(post(sim, "/api/pull", model="mistral"))[-1] == error
        whole = post(sim, "/api/pull", model="mistral", stream=False)
        assert (whole.status_code, whole.json()) == (500, error)
        assert post(sim, "/api/pull", model="qwen2.5", stream=False).status_code == 200
    with simulator() as sim:
        assert post(sim, "/api/pull", model="missing-model", stream=False).json() == error


# ---- embeddings -----------------------------------------------------------


def test_embed_is_deterministic_and_normalized(sim: Simulator) -> None:
    body = post(sim, "/api/embed", model=EMBED_MODEL, input=["one text", "another", "one text"]).json()
    first, other, again = body["embeddings"]
    assert len(first) == 16 and math.isclose(sum(v * v for v in first), 1.0)
    assert first == again and first != other
    assert body["prompt_eval_count"] == 5 and "total_duration" in body and "load_duration" in body
    single = post(sim, "/api/embed", model=EMBED_MODEL, input="one text").json()["embeddings"]
    legacy = post(sim, "/api/embeddings", model=EMBED_MODEL, prompt="one text").json()["embedding"]
    assert single == [first] and legacy == first


def test_embed_dimension_is_settable() -> None:
    with simulator(dims=64) as sim:
        assert len(post(sim, "/api/embed", model=EMBED_MODEL, input="x").json()["embeddings"][0]) == 64


def test_embed_costs_per_call_and_per_input() -> None:
    with simulator(embed_call_ms=100, embed_input_ms=50) as sim:
        started = time.monotonic()
        assert post(sim, "/api/embed", model=EMBED_MODEL, input=["a", "b", "c", "d"]).status_code == 200
        assert time.monotonic() - started >= 0.3
        assert sim.stats().busy_slot_seconds >= 0.3


# ---- bad requests ---------------------------------------------------------


def test_bad_bodies_are_400(sim: Simulator) -> None:
    malformed = requests.post(sim.url + "/api/chat", data=b"{not json", timeout=10)
    assert malformed.status_code == 400 and "error" in malformed.json()
    options = chat(sim, options={"num_ctx": "big"})  # Options.FromMap's error is a 500 in Ollama
    assert (options.status_code, options.json()) == (500, {"error": 'option "num_ctx" must be of type integer'})
    assert post(sim, "/api/chat", messages=[]).json() == {"error": "model is required"}
    assert post(sim, "/api/generate", model=CHAT_MODEL, keep_alive="soon").status_code == 400


# ---- capacity -------------------------------------------------------------


def test_one_slot_serializes_requests() -> None:
    with simulator(slots=1, latency_ms=200) as sim:
        first = threading.Thread(target=chat, args=(sim,))
        first.start()
        wait_for(lambda: sim.stats().in_slots == 1)
        # When a second request comes while the first holds the only slot, it waits its turn.
        second = chat(sim)
        first.join(30)
        stats = sim.stats()
    assert second.status_code == 200
    assert (stats.max_in_slots, stats.max_waiting, stats.in_slots) == (1, 1, 0)
    assert stats.busy_slot_seconds >= 0.4


def test_parallel_slots_overlap() -> None:
    with simulator(slots=2, latency_ms=1000) as sim:
        threads = [threading.Thread(target=chat, args=(sim,)) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: sim.stats().in_slots == 2)
        for thread in threads:
            thread.join(30)
        assert sim.stats().max_in_slots == 2


def test_max_loaded_evicts_the_idlest_model() -> None:
    with simulator(models=["small", "large"], max_loaded=1) as sim:
        chat(sim, model="small")
        chat(sim, model="large")
        assert [m["name"] for m in running_models(sim)] == ["large:latest"]
        assert sim.stats().unloads == {"small:latest": 1}


def test_full_queue_answers_503() -> None:
    # OLLAMA_MAX_QUEUE counts requests waiting for the scheduler: here one waits behind a load.
    with simulator(models=["slow", "fast"], model_load_ms={"slow": 60_000}, max_queue=1) as sim:
        loading = raw_request(sim, "slow")
        wait_for(lambda: sim.stats().loading == "slow:latest")
        queued = raw_request(sim, "fast")
        wait_for(lambda: sim.stats().pending == 1)
        third = chat(sim, model="fast")
        assert (third.status_code, third.json()) == (503, {"error": BUSY})
        assert sim.stats().rejected_busy == 1
        loading.close()  # the load is aborted; the queued request's own load follows
        queued.close()
        wait_for(lambda: sim.stats().pending == 0 and sim.stats().loading is None)


def raw_request(sim: Simulator, model: str) -> socket.socket:
    """Send a chat request on a socket of our own, to close it while the request waits."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "stream": False}).encode()
    conn = socket.create_connection(("127.0.0.1", sim.port), timeout=10)
    conn.sendall(
        b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return conn


# ---- faults ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "message"),
    [
        (Fault(reason="oom"), 500, OOM),
        (Fault(reason="runner"), 500, RUNNER),
        (Fault(status=500), 500, RUNNER),
        (Fault(reason="busy"), 503, BUSY),
        (Fault(status=400, message="invalid options: num_ctx"), 400, "invalid options: num_ctx"),
        (Fault(status=404), 404, "model 'llama3.2' not found"),
    ],
)
def test_status_faults_speak_ollama(sim: Simulator, fault: Fault, status: int, message: str) -> None:
    sim.set_faults([fault])
    reply = chat(sim)
    assert (reply.status_code, reply.json()) == (status, {"error": message})


def test_counted_fault_stops_after_n(sim: Simulator) -> None:
    sim.set_faults([Fault(reason="oom", count=2)])
    assert [chat(sim).status_code for _ in range(4)] == [500, 500, 200, 200]
    assert sim.stats().faults_fired == 2 and sim.stats().faults == []


def test_fault_for_one_model_spares_the_others(sim: Simulator) -> None:
    sim.set_faults([Fault(status=500, model="llama3.2:latest")])
    assert [chat(sim).status_code for _ in range(3)] == [500, 500, 500]
    assert post(sim, "/api/embed", model=EMBED_MODEL, input="x").status_code == 200
    sim.clear_faults()
    assert chat(sim).status_code == 200


def test_fault_with_zero_probability_never_fires(sim: Simulator) -> None:
    sim.set_faults([Fault(reason="oom", probability=0.0)])
    assert chat(sim).status_code == 200


def test_error_line_in_the_middle_of_a_stream(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=3)])
    reply = chat(sim, stream=True)
    lines = stream_lines(reply)
    assert reply.status_code == 200 and len(lines) == 4
    assert all(line["done"] is False for line in lines[:3])
    assert lines[3] == {"error": "an error was encountered while running the model: unexpected EOF"}
    sim.set_faults([Fault(kind="stream_error", message="boom")])
    whole = chat(sim)
    assert (whole.status_code, whole.json()) == (500, {"error": "boom"})


def test_cut_stream_ends_without_a_done_line(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=2, count=1)])
    reply = chat(sim, stream=True)
    seen: list[dict[str, Any]] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for raw in reply.iter_lines():
            seen.append(json.loads(raw))
    assert len(seen) == 2 and not any(line["done"] for line in seen)
    assert chat(sim).status_code == 200


def test_cut_fault_on_a_late_chunk_still_precedes_the_done_line(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=1000)])
    seen: list[dict[str, Any]] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for raw in chat(sim, stream=True).iter_lines():
            seen.append(json.loads(raw))
    assert len(seen) == 12 and not any(line["done"] for line in seen)


def test_cut_without_streaming_drops_the_connection(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", count=1)])
    with pytest.raises(requests.exceptions.ConnectionError):
        chat(sim)


def test_hang_blocks_only_its_own_request(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", count=1)])
    with pytest.raises(requests.exceptions.ReadTimeout):
        chat(sim, timeout=(5, 0.5))
    assert chat(sim).status_code == 200
    assert requests.get(sim.url + "/api/tags", timeout=10).status_code == 200
    started = time.monotonic()
    hung = threading.Thread(target=lambda: pytest.raises(requests.RequestException, chat, sim, timeout=30))
    sim.set_faults([Fault(kind="hang")])
    hung.start()
    wait_for(lambda: sim.stats().faults_fired == 2)
    sim.stop()  # with a request still held
    hung.join(10)
    assert time.monotonic() - started < 5 and not hung.is_alive()


def test_hang_for_some_seconds_then_answer(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", seconds=0.3, endpoints=("tags",))])
    started = time.monotonic()
    assert requests.get(sim.url + "/api/tags", timeout=10).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert chat(sim).status_code == 200  # the fault names tags only


def test_control_api_over_http(sim: Simulator) -> None:
    faults = {"faults": [{"kind": "status", "reason": "oom", "count": 2, "model": "llama3.2"}]}
    assert requests.post(sim.url + "/_sim/faults", json=faults, timeout=10).status_code == 200
    assert chat(sim).status_code == 500
    (listed,) = requests.get(sim.url + "/_sim/faults", timeout=10).json()["faults"]
    assert listed.items() >= {"kind": "status", "reason": "oom", "count": 1, "model": "llama3.2"}.items()
    stats = requests.get(sim.url + "/_sim/stats", timeout=10).json()
    assert stats["requests"]["chat"] == 1 and stats["requests_by_model"] == {"llama3.2:latest": 1}
    assert stats["faults_fired"] == 1 and stats["responses"] == {"500": 1}
    assert requests.delete(sim.url + "/_sim/faults", timeout=10).json() == {"faults": []}
    assert chat(sim).status_code == 200
    bad = requests.post(sim.url + "/_sim/faults", json={"faults": [{"kind": "explode"}]}, timeout=10)
    assert bad.status_code == 400
    reset = requests.post(sim.url + "/_sim/reset", timeout=10).json()
    assert reset["requests"] == {} and reset["loaded"] == [] and running_models(sim) == []


def test_parse_fault_reads_pairs_and_json() -> None:
    assert parse_fault("reason=oom,count=3,model=x") == Fault(reason="oom", count=3, model="x")
    assert parse_fault("kind=hang,endpoints=tags+ps,seconds=1.5") == Fault(
        kind="hang", endpoints=("tags", "ps"), seconds=1.5
    )
    assert parse_fault('{"kind": "cut", "after_chunks": 2}') == Fault(kind="cut", after_chunks=2)
    for bad in ("kind=explode", "count", "status=99", "endpoints=nowhere"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    assert isinstance(msgspec.ValidationError("x"), ValueError)


# ---- the command line -----------------------------------------------------


@contextmanager
def simulate_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    code = "import sys; from llm_worker.devtools.simulator import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("llm-worker simulator listening on http://"), first
        yield process, first.rsplit(" ", 1)[1].strip()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_cli_serves_until_sigterm_even_with_a_hung_request() -> None:
    with simulate_process(
        "--models", "tinyllama", "--latency-ms", "1", "--fault", "kind=hang,model=tinyllama,count=1"
    ) as (process, url):
        body = {"model": "tinyllama", "messages": [{"role": "user", "content": "x"}], "stream": False}
        hung = threading.Thread(
            target=lambda: pytest.raises(
                requests.RequestException, requests.post, url + "/api/chat", json=body, timeout=30
            )
        )
        hung.start()
        wait_for(lambda: requests.get(url + "/_sim/stats", timeout=10).json()["faults_fired"] == 1)
        assert (
            requests.post(url + "/api/chat", json=body, timeout=10).json()["message"]["content"]
            == "x 2 3 4 5 6 7 8 9 10 11 12"
        )
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert time.monotonic() - started < 3
        hung.join(10)


def test_cli_rejects_a_bad_fault() -> None:
    code = "import sys; from llm_worker.devtools.simulator import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "--port", "0", "--fault", "kind=explode"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "--fault" in done.stderr
