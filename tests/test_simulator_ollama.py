"""The simulator behaves as Ollama v0.33 does, point by point (docs/simulator.md has the table and the citations).

Each test drives a running simulator over real HTTP. A request that must stay
in flight (holding a slot, a load, a place in the queue) is sent on a socket
of the test's own, and ends when the test closes it: the simulator, as Ollama,
drops work whose client left. No test times anything: they wait for the
simulator's stats to say what happened.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pytest
import requests

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.devtools.simulator.cli import build_parser, config_from_args

CHAT_MODEL = "llama3.2"
EMBED_MODEL = "nomic-embed-text"
THINKER = "qwen3"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
FOREVER_MS = 600_000  # a load or latency no test waits out: its client leaves first


@contextmanager
def simulator(**settings: Any) -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(**settings)) as sim:
        yield sim


def post(sim: Simulator, path: str, headers: dict[str, str] | None = None, **body: Any) -> requests.Response:
    return requests.post(sim.url + path, json=body, headers=headers, timeout=30, stream=True)


def chat(sim: Simulator, text: str = "Why is the sky blue?", model: str = CHAT_MODEL, **body: Any) -> requests.Response:
    body.setdefault("stream", False)
    return post(sim, "/api/chat", model=model, messages=[{"role": "user", "content": text}], **body)


def load(sim: Simulator, model: str, **body: Any) -> requests.Response:
    """Ask Ollama to load a model: a generate request with no prompt, which takes no slot."""
    return post(sim, "/api/generate", model=model, **body)


def lines(response: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in response.iter_lines() if raw]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def held(sim: Simulator, model: str, path: str = "/api/chat") -> socket.socket:
    """Send a request on a socket of our own and leave it in flight; closing the socket ends it."""
    body = {"model": model, "stream": False}
    body.update({"messages": [{"role": "user", "content": "x"}]} if path == "/api/chat" else {})
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", sim.port), timeout=30)
    conn.sendall(
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data)
    )
    return conn


def in_background(call: Callable[[], requests.Response]) -> tuple[threading.Thread, list[requests.Response]]:
    answers: list[requests.Response] = []
    thread = threading.Thread(target=lambda: answers.append(call()), daemon=True)
    thread.start()
    return thread, answers


def loaded(sim: Simulator) -> set[str]:
    return set(sim.stats().loaded)


# ---- slots: OLLAMA_NUM_PARALLEL per loaded model (server/sched.go, llm/llama_server.go) ----------


def test_each_model_has_its_own_slots_and_waiters_have_no_limit() -> None:
    with simulator(models=[CHAT_MODEL, "qwen2.5"], latency_ms=FOREVER_MS, max_queue=0) as sim:
        assert load(sim, CHAT_MODEL).status_code == load(sim, "qwen2.5").status_code == 200
        first = held(sim, CHAT_MODEL)
        wait_for(lambda: sim.stats().in_slots == 1)
        other = held(sim, "qwen2.5")  # another model: its own slot, at once
        wait_for(lambda: sim.stats().in_slots == 2)
        waiters = [held(sim, CHAT_MODEL), held(sim, CHAT_MODEL)]  # max_queue 0 does not bound these
        wait_for(lambda: sim.stats().waiting == 2)
        first.close()  # its slot goes to the first waiter
        wait_for(lambda: (sim.stats().in_slots, sim.stats().waiting) == (2, 1))
        for conn in [other, *waiters]:
            conn.close()
        wait_for(lambda: (sim.stats().in_slots, sim.stats().waiting) == (0, 0))
        assert sim.stats().rejected_busy == 0 and sim.stats().max_waiting == 2


def test_embedding_models_and_some_families_get_one_slot() -> None:
    with simulator(models=[CHAT_MODEL, EMBED_MODEL, "qwen3-vl"], num_parallel=4) as sim:
        assert chat(sim).status_code == 200
        assert post(sim, "/api/embed", model=EMBED_MODEL, input="x").status_code == 200
        assert chat(sim, model="qwen3-vl", think=False).status_code == 200
        assert sim.stats().parallel == {"llama3.2:latest": 4, "nomic-embed-text:latest": 1, "qwen3-vl:latest": 1}
        assert sim.stats().slots == 4


def test_slots_is_the_older_name_of_num_parallel() -> None:
    assert SimulatorConfig().num_parallel == 1  # envconfig: OLLAMA_NUM_PARALLEL defaults to 1
    assert SimulatorConfig(slots=3).num_parallel == 3
    assert config_from_args(build_parser().parse_args(["--slots", "2"])).num_parallel == 2
    assert config_from_args(build_parser().parse_args(["--num-parallel", "5"])).num_parallel == 5


# ---- the scheduler's queue: OLLAMA_MAX_QUEUE (server/sched.go getRunner) -----------------------


def test_503_only_when_the_requests_waiting_for_the_scheduler_overflow_max_queue() -> None:
    with simulator(models=["slow", "fast", "ready"], model_load_ms={"slow": FOREVER_MS}, max_queue=2) as sim:
        assert load(sim, "ready").status_code == 200
        loading = held(sim, "slow")
        wait_for(lambda: sim.stats().loading == "slow:latest")
        queued = [held(sim, "fast"), held(sim, "fast")]
        wait_for(lambda: sim.stats().pending == 2)
        refused = chat(sim, model="fast")
        assert (refused.status_code, refused.json()) == (503, {"error": BUSY})
        assert chat(sim, model="ready").status_code == 200  # a loaded model never queues
        for conn in [loading, *queued]:
            conn.close()
        wait_for(lambda: sim.stats().pending == 0 and sim.stats().loading is None)
        assert sim.stats().rejected_busy == 1


# ---- loads: shared, and aborted with their client (server/sched.go, llm WaitUntilRunning) --------


def test_one_load_serves_every_request_that_waits_for_it() -> None:
    with simulator(model_load_ms={CHAT_MODEL: 300}, num_parallel=4) as sim:
        calls = [in_background(lambda: chat(sim)) for _ in range(4)]
        for thread, _ in calls:
            thread.join(30)
        assert [answers[0].status_code for _, answers in calls] == [200] * 4
        assert sim.stats().loads == {"llama3.2:latest": 1}


def test_a_load_aborts_when_its_client_leaves_and_the_next_waiter_loads_anew() -> None:
    with simulator(model_load_ms={CHAT_MODEL: FOREVER_MS}) as sim:
        first = held(sim, CHAT_MODEL)
        wait_for(lambda: sim.stats().loading == "llama3.2:latest")
        second = held(sim, CHAT_MODEL)
        wait_for(lambda: sim.stats().pending == 1)
        first.close()
        wait_for(
            lambda: (
                sim.stats().aborted_loads == {"llama3.2:latest": 1}
                and sim.stats().loading == "llama3.2:latest"
                and sim.stats().pending == 0
            )
        )
        second.close()
        wait_for(lambda: sim.stats().aborted_loads == {"llama3.2:latest": 2} and sim.stats().loading is None)
        assert sim.stats().loads == {} and sim.stats().loaded == []


def test_a_queued_request_whose_client_left_is_skipped() -> None:
    with simulator(models=["slow", "fast"], model_load_ms={"slow": FOREVER_MS}) as sim:
        loading = held(sim, "slow")
        wait_for(lambda: sim.stats().loading == "slow:latest")
        queued = held(sim, "fast")
        wait_for(lambda: sim.stats().pending == 1)
        queued.close()
        wait_for(lambda: sim.stats().pending == 0)  # its client is gone; its place is still taken
        loading.close()
        wait_for(lambda: sim.stats().loading is None and sim.stats().pending == 0)
        assert sim.stats().aborted_loads == {"slow:latest": 1} and sim.stats().loads == {}


# ---- residency: OLLAMA_MAX_LOADED_MODELS and the eviction order (server/sched.go) --------------


@pytest.mark.parametrize(("gpus", "kept"), [(1, 3), (0, 3), (2, 4)])
def test_three_models_per_gpu_stay_loaded_by_default(gpus: int, kept: int) -> None:
    with simulator(models=["a", "b", "c", "d"], gpus=gpus) as sim:
        for model in ("a", "b", "c", "d"):
            assert load(sim, model).status_code == 200
        assert len(loaded(sim)) == kept and sum(sim.stats().unloads.values()) == 4 - kept


def test_eviction_takes_the_shortest_keep_alive_not_the_least_recently_used() -> None:
    with simulator(models=["a", "b", "c"], max_loaded=2) as sim:
        load(sim, "a", keep_alive="1m")
        load(sim, "b", keep_alive="10m")
        load(sim, "a")  # used last, and it keeps its own 1m: no keep_alive sent
        load(sim, "c")
        assert loaded(sim) == {"b:latest", "c:latest"} and sim.stats().unloads == {"a:latest": 1}


def test_equal_keep_alives_evict_in_the_order_of_the_model_files_paths() -> None:
    def digest(model: str) -> str:
        return hashlib.sha256(f"{model}:latest".encode()).hexdigest()

    first, second = sorted(("x", "y"), key=digest)  # Ollama's blob path ends in sha256-<digest>
    with simulator(models=["x", "y", "z"], max_loaded=2) as sim:
        load(sim, second)
        load(sim, first)  # the most recently used, yet the first in path order
        load(sim, "z")
        assert sim.stats().unloads == {f"{first}:latest": 1}


def test_with_every_model_busy_the_scheduler_waits_instead_of_overcommitting() -> None:
    with simulator(models=["a", "b"], max_loaded=1, latency_ms=FOREVER_MS) as sim:
        busy = held(sim, "a")
        wait_for(lambda: sim.stats().in_slots == 1)
        thread, answers = in_background(lambda: load(sim, "b"))
        wait_for(lambda: sim.stats().unloading == ["a:latest"])  # a goes once its request ends
        assert sim.stats().loaded == ["a:latest"]
        busy.close()
        thread.join(30)
        assert answers[0].json()["done_reason"] == "load"
        assert sim.stats().loaded == ["b:latest"] and sim.stats().unloads == {"a:latest": 1}


def test_a_request_without_keep_alive_keeps_the_instances_own(sim: Simulator) -> None:
    chat(sim, keep_alive="1h")
    chat(sim)
    (model,) = requests.get(sim.url + "/api/ps", timeout=10).json()["models"]
    assert datetime.fromisoformat(model["expires_at"].replace("Z", "+00:00")).timestamp() > time.time() + 1800


def test_a_keep_alive_string_must_be_a_go_duration(sim: Simulator) -> None:
    refused = chat(sim, keep_alive="300")  # api.Duration: time.ParseDuration, no unit no go
    assert (refused.status_code, refused.json()) == (400, {"error": 'time: missing unit in duration "300"'})
    assert chat(sim, keep_alive=300).status_code == chat(sim, keep_alive="5m").status_code == 200


def test_a_negative_num_gpu_never_reloads(sim: Simulator) -> None:
    chat(sim, options={"num_gpu": 20})
    chat(sim)  # num_gpu left out: Ollama's -1, "decide", which matches any instance
    assert sim.stats().loads == {"llama3.2:latest": 1}
    chat(sim, options={"num_gpu": 10})
    assert sim.stats().loads == {"llama3.2:latest": 2}


def test_ps_lists_the_longest_lived_first() -> None:
    with simulator(models=["a", "b"]) as sim:
        load(sim, "a", keep_alive="1m")
        load(sim, "b", keep_alive="1h")
        names = [m["name"] for m in requests.get(sim.url + "/api/ps", timeout=10).json()["models"]]
        assert names == ["b:latest", "a:latest"]


def test_delete_leaves_a_loaded_instance_until_it_expires(sim: Simulator) -> None:
    chat(sim)
    assert requests.delete(sim.url + "/api/delete", json={"model": CHAT_MODEL}, timeout=10).status_code == 200
    assert CHAT_MODEL + ":latest" in loaded(sim)
    assert chat(sim).status_code == 404


# ---- runtime errors of the embedding call are 400 (server/routes.go EmbedHandler) --------------


@pytest.mark.parametrize(
    ("version", "reason", "endpoint", "status"),
    [
        ("0.33.0", "crash", "embed", 400),
        ("0.33.0", "run_oom", "embed", 400),
        ("0.33.0", "crash", "embeddings", 500),
        ("0.33.0", "crash", "chat", 500),
        ("0.33.0", "oom", "embed", 500),  # the load failed: handleScheduleError
        ("0.13.2", "crash", "embed", 500),  # before v0.13.3
    ],
)
def test_an_error_of_the_embedding_call_is_400_on_api_embed(
    version: str, reason: str, endpoint: str, status: int
) -> None:
    bodies: dict[str, tuple[str, dict[str, Any]]] = {
        "embed": ("/api/embed", {"model": EMBED_MODEL, "input": "x"}),
        "embeddings": ("/api/embeddings", {"model": EMBED_MODEL, "prompt": "x"}),
        "chat": ("/api/chat", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}]}),
    }
    path, body = bodies[endpoint]
    with simulator(ollama_version=version, faults=[Fault(reason=reason)]) as sim:  # type: ignore[arg-type]
        reply = post(sim, path, stream=False, **body)
        assert reply.status_code == status
        assert reply.json()["error"].startswith(("llama-server ", "llama runner "))


def test_an_out_of_memory_error_of_a_call_expires_every_loaded_model(sim: Simulator) -> None:
    assert chat(sim).status_code == 200 and post(sim, "/api/embed", model=EMBED_MODEL, input="x").status_code == 200
    sim.set_faults([Fault(reason="run_oom", endpoints=("embed",), count=1)])
    reply = post(sim, "/api/embed", model=EMBED_MODEL, input="x")
    assert (reply.status_code, reply.json()) == (
        400,
        {"error": "llama-server process no longer running: exit status 2 CUDA error: out of memory"},
    )
    assert loaded(sim) == set()  # expireRunnersForRuntimeOOM


# ---- wording by version (versions.py) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "reason", "message"),
    [
        ("0.33.0", "runner", "llama-server process has terminated: exit status 2"),
        ("0.33.0", "oom", "llama-server reported out-of-memory during startup: cudaMalloc failed: out of memory"),
        (
            "0.33.0",
            "crash",
            "llama-server process no longer running: exit status 2 "
            "CUDA error: an illegal memory access was encountered",
        ),
        ("0.30.0", "runner", "llama-server process has terminated: exit status 2"),
        ("0.24.0", "runner", "llama runner process has terminated: exit status 2"),
        ("0.24.0", "oom", "model requires more system memory (12.3 GiB) than is available (4.0 GiB)"),
        (
            "0.24.0",
            "crash",
            "llama runner process no longer running: 2 CUDA error: an illegal memory access was encountered",
        ),
    ],
)
def test_crash_and_memory_errors_speak_the_versions_words(version: str, reason: str, message: str) -> None:
    with simulator(ollama_version=version, faults=[Fault(reason=reason)]) as sim:  # type: ignore[arg-type]
        reply = chat(sim)
        assert (reply.status_code, reply.json()) == (500, {"error": message})


def test_a_stream_broken_by_the_runner_names_its_last_error_and_expires_the_models(sim: Simulator) -> None:
    load(sim, EMBED_MODEL)
    sim.set_faults([Fault(kind="stream_error", reason="oom", after_chunks=2)])
    got = lines(chat(sim, stream=True))
    assert got[-1] == {"error": "an error was encountered while running the model: CUDA error: out of memory"}
    wait_for(lambda: loaded(sim) == set())  # the streaming model too, once its stream is over


NEW, OLD = "model 'ghost' not found", 'model "ghost" not found, try pulling it first'


@pytest.mark.parametrize(
    ("version", "path", "message"),
    [
        ("0.33.0", "/api/chat", NEW),
        ("0.33.0", "/api/generate", NEW),
        ("0.33.0", "/api/embed", OLD),
        ("0.33.0", "/api/embeddings", OLD),
        ("0.11.0", "/api/chat", OLD),
        ("0.11.0", "/api/generate", NEW),
        ("0.5.1", "/api/generate", OLD),
    ],
)
def test_a_missing_model_is_worded_per_endpoint_and_version(version: str, path: str, message: str) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "prompt": "x", "input": "x"}
    with simulator(ollama_version=version) as sim:
        reply = post(sim, path, model="ghost", **body)
        assert (reply.status_code, reply.json()) == (404, {"error": message})


def test_an_empty_model_name_is_answered_as_each_handler_does(sim: Simulator) -> None:
    assert post(sim, "/api/generate", model="", prompt="x").json() == {"error": "model '' not found"}
    assert post(sim, "/api/chat", model="", messages=[]).json() == {"error": "model is required"}


def test_version_is_the_imitated_ollamas() -> None:
    with simulator(ollama_version="0.24.0") as sim:
        assert requests.get(sim.url + "/api/version", timeout=10).json() == {"version": "0.24.0"}
    assert config_from_args(build_parser().parse_args(["--ollama-version", "0.30.1"])).ollama_version == "0.30.1"
    with pytest.raises(ValueError):
        SimulatorConfig(ollama_version="latest")


# ---- thinking (server/routes.go ChatHandler, GenerateHandler; api/types.go ThinkValue) -----------


def test_a_thinking_model_thinks_by_default_and_streams_its_reasoning_first() -> None:
    with simulator(models=[THINKER]) as sim:
        got = lines(chat(sim, "a b c", model=THINKER, stream=True))
    thoughts = [line["message"] for line in got if line["message"].get("thinking")]
    assert [m["content"] for m in thoughts] == ["", "", "", ""]
    assert "".join(m["thinking"] for m in thoughts) == "Thinking at medium effort."
    assert got[:4] == [line for line in got if "thinking" in line["message"]]  # before any content
    assert "".join(line["message"]["content"] for line in got) == "a b c 4 5 6 7 8 9 10 11 12"
    assert got[-1]["done"] is True and got[-1]["eval_count"] == 4 + 12


@pytest.mark.parametrize(
    ("model", "think", "thinking"),
    [
        (THINKER, False, None),
        (THINKER, True, "Thinking at medium effort."),
        (THINKER, "low", "Thinking at low effort."),
        (THINKER, "max", "Thinking at max effort."),
        ("gpt-oss", "max", "Thinking at high effort."),
        (CHAT_MODEL, False, None),
    ],
)
def test_think_takes_a_bool_or_a_level(model: str, think: bool | str, thinking: str | None) -> None:
    with simulator(models=[THINKER, "gpt-oss", CHAT_MODEL]) as sim:
        whole = chat(sim, model=model, think=think).json()
        generated = post(sim, "/api/generate", model=model, prompt="x", think=think, stream=False).json()
    assert whole["message"].get("thinking") == thinking and generated.get("thinking") == thinking


@pytest.mark.parametrize("think", [True, "high"])
def test_a_model_that_cannot_think_refuses_to(sim: Simulator, think: bool | str) -> None:
    for reply in (chat(sim, think=think), post(sim, "/api/generate", model=CHAT_MODEL, prompt="x", think=think)):
        assert (reply.status_code, reply.json()) == (400, {"error": '"llama3.2" does not support thinking'})


@pytest.mark.parametrize(
    ("think", "message"),
    [
        ("extreme", 'invalid think value: "extreme" (must be "high", "medium", "low", "max", true, or false)'),
        (1, 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'),
    ],
)
def test_a_bad_think_value_is_400(sim: Simulator, think: Any, message: str) -> None:
    reply = chat(sim, think=think)
    assert (reply.status_code, reply.json()) == (400, {"error": message})


def test_num_predict_counts_the_reasoning_too() -> None:
    with simulator(models=[THINKER]) as sim:
        body = chat(sim, model=THINKER, options={"num_predict": 2}).json()
    assert body["message"] == {"role": "assistant", "content": "", "thinking": "Thinking at"}
    assert (body["eval_count"], body["done_reason"]) == (2, "length")


def test_show_lists_capabilities() -> None:
    with simulator(models=[CHAT_MODEL, EMBED_MODEL, THINKER, "deepseek-r1:7b"]) as sim:
        shown = {
            m: post(sim, "/api/show", model=m).json()["capabilities"]
            for m in (CHAT_MODEL, EMBED_MODEL, THINKER, "deepseek-r1:7b")
        }
    assert shown == {
        CHAT_MODEL: ["completion"],
        EMBED_MODEL: ["embedding"],
        THINKER: ["completion", "thinking"],
        "deepseek-r1:7b": ["completion", "thinking"],
    }


def test_an_embedding_model_cannot_chat_or_generate(sim: Simulator) -> None:
    assert chat(sim, model=EMBED_MODEL).json() == {"error": '"nomic-embed-text" does not support chat'}
    generated = post(sim, "/api/generate", model=EMBED_MODEL, prompt="x")
    assert (generated.status_code, generated.json()) == (400, {"error": '"nomic-embed-text" does not support generate'})


# ---- options of the wrong type: 500 (api/types.go Options.FromMap, routes.go handleScheduleError) --


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
        ({"num_ctx": "big"}, 'option "num_ctx" must be of type integer'),
        ({"num_thread": True}, 'option "num_thread" must be of type integer'),
        ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
        ({"stop": "end"}, 'option "stop" must be of type array'),
        ({"stop": [1]}, 'option "stop" must be of an array of strings'),
    ],
)
def test_an_option_of_the_wrong_type_is_500(sim: Simulator, options: dict[str, Any], message: str) -> None:
    for reply in (chat(sim, options=options), post(sim, "/api/embed", model=EMBED_MODEL, input="x", options=options)):
        assert (reply.status_code, reply.json()) == (500, {"error": message})
    assert sim.stats().loads == {}  # refused before the scheduler


def test_unknown_options_are_ignored_and_numbers_truncated(sim: Simulator) -> None:
    assert chat(sim, options={"num_ctx": 8192.9, "low_vram": True, "mirostat": "x"}).status_code == 200
    assert requests.get(sim.url + "/api/ps", timeout=10).json()["models"][0]["context_length"] == 8192


# ---- the Host check (server/routes.go allowedHostsMiddleware) -------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:11434", 200),
        ("localhost", 200),
        ("LOCALHOST:80", 200),
        ("[::1]:11434", 200),
        ("box.local", 200),
        ("ollama.internal:11434", 200),
        ("app.localhost", 200),
        ("10.1.2.3", 200),
        ("172.16.0.9:1", 200),
        ("192.168.1.1", 200),
        ("0.0.0.0", 200),
        (socket.gethostname(), 200),
        ("", 200),
        ("evil.example", 403),
        ("evil.example:11434", 403),
        ("8.8.8.8", 403),
        ("[::1]", 403),
        ("172.32.0.1", 403),
    ],
)
def test_a_loopback_listener_serves_only_local_host_names(sim: Simulator, host: str, status: int) -> None:
    reply = requests.get(sim.url + "/api/tags", headers={"Host": host}, timeout=10)
    assert reply.status_code == status
    if status == 403:
        assert reply.content == b"" and "Content-Type" not in reply.headers


def test_the_control_api_and_other_listeners_skip_the_host_check() -> None:
    with simulator(host="0.0.0.0") as sim:
        url = f"http://127.0.0.1:{sim.port}"
        assert requests.get(url + "/api/tags", headers={"Host": "evil.example"}, timeout=10).status_code == 200
    with simulator() as sim:
        assert requests.get(sim.url + "/_sim/stats", headers={"Host": "evil.example"}, timeout=10).status_code == 200


def test_a_known_path_asked_with_another_method_is_405(sim: Simulator) -> None:
    wrong = requests.get(sim.url + "/api/chat", timeout=10)
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")
    assert wrong.headers["Content-Type"] == "text/plain"
    assert requests.get(sim.url + "/api/nothing", timeout=10).text == "404 page not found"


# ---- answers that end without their done line (llm/llama_server.go Completion, routes.go) --------


def test_an_aborted_stream_just_ends(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="abort", after_chunks=3)])
    reply = chat(sim, stream=True)
    got = lines(reply)  # the chunked stream ends cleanly: no exception, no error line
    assert reply.status_code == 200 and len(got) == 3
    assert not any(line["done"] or "error" in line for line in got)


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        ("/api/chat", {"messages": [{"role": "user", "content": "a b c d"}]}, "a b c"),
        ("/api/generate", {"prompt": "a b c d"}, "a b c"),
    ],
)
def test_an_aborted_whole_answer_is_200_with_done_false(
    sim: Simulator, path: str, body: dict[str, Any], text: str
) -> None:
    sim.set_faults([Fault(kind="abort", after_chunks=3)])
    reply = post(sim, path, model=CHAT_MODEL, stream=False, **body).json()
    assert reply["done"] is False and (reply.get("response") or reply.get("message", {}).get("content")) == text
    assert not {"done_reason", "eval_count", "total_duration", "context"} & reply.keys()


def test_an_answer_aborted_before_its_first_piece(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="abort")])
    assert chat(sim).json() == {
        "model": "",
        "created_at": "0001-01-01T00:00:00Z",
        "message": {"role": "", "content": ""},
        "done": False,
    }  # Go's zero value
    assert post(sim, "/api/generate", model=CHAT_MODEL, prompt="x", stream=False).json() == {
        "model": "",
        "created_at": "0001-01-01T00:00:00Z",
        "response": "",
        "done": False,
    }
    streamed = chat(sim, stream=True)
    assert streamed.status_code == 200 and lines(streamed) == []


def test_an_abort_counts_the_reasoning_pieces() -> None:
    with simulator(models=[THINKER], faults=[Fault(kind="abort", after_chunks=5)]) as sim:
        body = chat(sim, "a b", model=THINKER).json()
    assert body["message"] == {"role": "assistant", "content": "a", "thinking": "Thinking at medium effort."}


def test_abort_hits_chat_and_generate_only(sim: Simulator) -> None:
    with pytest.raises(ValueError):
        Fault(kind="abort", endpoints=("embed",))
    sim.set_faults([Fault(kind="abort")])
    assert post(sim, "/api/embed", model=EMBED_MODEL, input="x").json()["embeddings"]


def test_an_error_before_the_first_line_is_a_whole_500(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error")])
    reply = chat(sim, stream=True)
    assert reply.status_code == 500 and reply.headers["Content-Type"].startswith("application/json")
    assert reply.json() == {"error": "an error was encountered while running the model: unexpected EOF"}
