"""The simulator's OpenAI-compatible /v1, over real sockets: shapes, SSE, shared engine, errors, faults, the key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from test_simulator import OOM, raw_request

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig, parse_fault
from llm_worker.devtools.simulator.cli import build_parser, config_from_args

CHAT_MODEL = "llama3.2"
EMBED_MODEL = "nomic-embed-text"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"
EOF_ERROR = "an error was encountered while running the model: unexpected EOF"


@contextmanager
def simulator(**settings: Any) -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(**settings)) as sim:
        yield sim


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with simulator() as running:
        yield running


def completions(
    sim: Simulator,
    text: str = PROMPT,
    model: str = CHAT_MODEL,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
    **body: Any,
) -> requests.Response:
    body.setdefault("stream", False)
    return requests.post(
        sim.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}], **body},
        headers=headers,
        timeout=timeout,
        stream=True,
    )


def events(reply: requests.Response) -> list[Any]:
    """The data of each Server-Sent Event, decoded ("[DONE]" stays text), checking the framing."""
    raw = reply.content.decode()
    assert raw.endswith("\n\n"), raw[-80:]
    out = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def openai_error(message: str, type: str = "api_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


# ---- shapes --------------------------------------------------------------------------


def test_models_lists_every_model_as_openai_does() -> None:
    with simulator(models=["llama3.2", "qwen2.5:7b", "hf.co/someone/tiny:Q4"]) as sim:
        reply = requests.get(sim.url + "/v1/models", timeout=10)
        head = requests.head(sim.url + "/v1/models", timeout=10)
    assert reply.status_code == 200 and head.status_code == 200
    body = reply.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        ("llama3.2:latest", "model", "library"),
        ("qwen2.5:7b", "model", "library"),
        ("hf.co/someone/tiny:Q4", "model", "someone"),
    ]
    assert all(isinstance(m["created"], int) and m["created"] > 1_600_000_000 for m in body["data"])


def test_chat_completion_whole_says_what_api_chat_says_with_usage(sim: Simulator) -> None:
    reply = completions(
        sim,
        seed=7,
        temperature=0.2,
        top_p=0.9,
        stop=["\n"],
        frequency_penalty=0.5,
        presence_penalty=0.1,
        response_format={"type": "json_object"},
    )
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL and isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    ollama = requests.post(
        sim.url + "/api/chat",
        json={"model": CHAT_MODEL, "stream": False, "messages": [{"role": "user", "content": PROMPT}]},
        timeout=10,
    ).json()
    assert ollama["message"]["content"] == REPLY


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_plays_num_predict(sim: Simulator, limit: str) -> None:
    body = completions(sim, "a b c d e", **{limit: 3}).json()
    assert body["choices"][0]["message"]["content"] == "a b c"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_content_parts_and_every_role_count_as_prompt(sim: Simulator) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one two"}, {"type": "image_url", "image_url": {"url": "data:,"}}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    reply = requests.post(
        sim.url + "/v1/chat/completions", json={"model": CHAT_MODEL, "messages": messages}, timeout=10
    )
    body = reply.json()
    assert body["choices"][0]["message"]["content"].startswith("one two 3 ")  # the last user message is echoed
    assert body["usage"]["prompt_tokens"] == 5


def test_streamed_chat_completion_is_server_sent_events_ending_in_done(sim: Simulator) -> None:
    reply = completions(sim, stream=True)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "text/event-stream" and reply.headers["Transfer-Encoding"] == "chunked"
    got = events(reply)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert len(chunks) == 13  # one per token, then the one with finish_reason; no usage unless asked
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(
        c["choices"][0]["finish_reason"] is None and c["choices"][0]["delta"]["role"] == "assistant"
        for c in chunks[:-1]
    )
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == REPLY
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": "stop",
    }
    assert all("usage" not in c for c in chunks)


def test_stream_options_include_usage_adds_a_usage_chunk_before_done(sim: Simulator) -> None:
    got = events(completions(sim, "a b c", stream=True, max_tokens=2, stream_options={"include_usage": True}))
    assert [c["choices"][0]["delta"]["content"] for c in got[:2]] == ["a", " b"]
    assert got[2]["choices"][0]["finish_reason"] == "length"
    assert got[3]["choices"] == [] and got[3]["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    assert got[4:] == ["[DONE]"]


def test_embeddings_are_api_embeds_vectors_in_input_order(sim: Simulator) -> None:
    inputs = ["one", "two words", "one"]
    reply = requests.post(sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": inputs}, timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["object"] == "list" and body["model"] == EMBED_MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    ollama = requests.post(sim.url + "/api/embed", json={"model": EMBED_MODEL, "input": inputs}, timeout=10).json()
    assert [d["embedding"] for d in body["data"]] == ollama["embeddings"]
    single = requests.post(
        sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "two words"}, timeout=10
    ).json()
    assert [d["embedding"] for d in single["data"]] == [ollama["embeddings"][1]]


# ---- thinking ---------------------------------------------------------------------------


def test_reasoning_effort_makes_the_answer_reason_first_as_ollamas_v1_sends_it(sim: Simulator) -> None:
    whole = completions(sim, reasoning_effort="low").json()
    assert whole["choices"][0]["message"] == {
        "role": "assistant",
        "content": REPLY,
        "reasoning": "Thinking at low effort.",
    }
    assert whole["usage"]["completion_tokens"] == 12 + 4  # thoughts are generated tokens
    got = events(completions(sim, stream=True, reasoning_effort="high"))
    deltas = [c["choices"][0]["delta"] for c in got[:-1]]
    assert "".join(d.get("reasoning", "") for d in deltas[:4]) == "Thinking at high effort."
    assert all(d["content"] == "" for d in deltas[:4]) and "".join(d["content"] for d in deltas) == REPLY
    assert "reasoning" not in completions(sim, reasoning_effort="none").json()["choices"][0]["message"]


def test_an_unknown_reasoning_effort_is_refused(sim: Simulator) -> None:
    reply = completions(sim, reasoning_effort="max")
    assert reply.status_code == 400 and "invalid reasoning value: 'max'" in reply.json()["error"]["message"]


# ---- llama-cpp-python's ways, by model name (tests/test_llamacpp.py meets the real server) ----------


@pytest.fixture
def llamacpp_sim() -> Iterator[Simulator]:
    with simulator(models=["llamacpp-tiny", "nopool-embed"], reply_tokens=400, token_ms=5, num_ctx=64) as running:
        yield running


def test_a_llamacpp_model_streams_as_llama_cpp_python_does_without_usage(llamacpp_sim: Simulator) -> None:
    # As llama-cpp-python 0.3.36 streamed: the role alone, a piece each, an empty delta with the reason, [DONE].
    got = events(
        completions(
            llamacpp_sim, model="llamacpp-tiny", stream=True, max_tokens=2, stream_options={"include_usage": True}
        )
    )
    assert [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in got[:-1]] == [
        ({"role": "assistant"}, None),
        ({"content": "Why"}, None),
        ({"content": " is"}, None),
        ({}, "length"),
    ]
    assert got[-1] == "[DONE]" and all("usage" not in c for c in got[:-1])  # stream_options is not read


@pytest.mark.parametrize("newer", ["chat", "models"])
def test_a_newer_request_stops_a_llamacpp_stream_with_done_and_no_finish_reason(
    llamacpp_sim: Simulator, newer: str
) -> None:
    reply = completions(llamacpp_sim, model="llamacpp-tiny", stream=True)
    lines = reply.iter_lines()
    first = next(line for line in lines if line)
    assert json.loads(first[len(b"data: ") :])["choices"][0]["delta"] == {"role": "assistant"}
    # 400 pieces of 5 ms to go: a chat, or a listing of the models (a health probe), arrives meanwhile.
    if newer == "chat":
        answer = completions(llamacpp_sim, model="llamacpp-tiny", text="newer", max_tokens=1)
        assert answer.json()["choices"][0]["message"]["content"] == "newer"
    else:
        assert requests.get(llamacpp_sim.url + "/v1/models", timeout=10).status_code == 200
    rest = [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]" for line in lines if line]
    assert rest[-1] == "[DONE]" and len(rest) < 400
    assert all(c["choices"][0]["finish_reason"] is None for c in rest[:-1])


def test_a_prompt_over_a_llamacpp_context_is_400_whole_and_an_empty_stream_streamed(llamacpp_sim: Simulator) -> None:
    long = " ".join(["blue"] * 64)
    whole = completions(llamacpp_sim, long, model="llamacpp-tiny", max_tokens=8)
    assert whole.status_code == 400 and whole.json()["error"]["message"] == (
        "This model's maximum context length is 64 tokens. However, you requested 72 tokens (64 in the messages,"
        " 8 in the completion). Please reduce the length of the messages or completion."
    )
    streamed = completions(llamacpp_sim, long, model="llamacpp-tiny", stream=True)
    assert streamed.status_code == 200 and streamed.content == b""
    assert completions(llamacpp_sim, " ".join(["blue"] * 63), model="llamacpp-tiny").status_code == 200


def test_a_nopool_model_answers_a_vector_per_token_of_each_input(llamacpp_sim: Simulator) -> None:
    # As llama.cpp answers for a model without a pooling type: a list of lists per input.
    body = requests.post(
        llamacpp_sim.url + "/v1/embeddings",
        json={"model": "nopool-embed", "input": ["one two three", "four"]},
        timeout=10,
    ).json()
    assert [(d["index"], len(d["embedding"]), len(d["embedding"][0])) for d in body["data"]] == [(0, 3, 16), (1, 1, 16)]


# ---- one engine for both APIs ---------------------------------------------------------


def test_both_apis_share_the_loaded_model_and_the_per_endpoint_stats(sim: Simulator) -> None:
    completions(sim)
    requests.post(
        sim.url + "/api/chat",
        json={"model": CHAT_MODEL, "stream": False, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    completions(sim, stream=True).content  # noqa: B018 - read to the end
    requests.post(sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=10)
    requests.get(sim.url + "/v1/models", timeout=10)
    stats = sim.stats()
    assert stats.loads == {"llama3.2:latest": 1, "nomic-embed-text:latest": 1}  # the /v1 request reused /api's instance
    assert stats.requests == {"openai_chat": 2, "chat": 1, "openai_embeddings": 1, "openai_models": 1}
    assert stats.requests_by_model == {"llama3.2:latest": 3, "nomic-embed-text:latest": 1}


def test_one_slot_serializes_requests_of_both_apis() -> None:
    with simulator(slots=1, latency_ms=300) as sim:
        first = threading.Thread(
            target=lambda: requests.post(
                sim.url + "/api/chat",
                json={"model": CHAT_MODEL, "stream": False, "messages": [{"role": "user", "content": "x"}]},
                timeout=30,
            )
        )
        first.start()
        wait_for(lambda: sim.stats().in_slots == 1)
        second = completions(sim)  # waits its turn behind the /api request
        first.join(30)
        stats = sim.stats()
    assert second.status_code == 200
    assert (stats.max_in_slots, stats.max_waiting) == (1, 1)


def test_a_full_queue_answers_503_in_openais_shape() -> None:
    # OLLAMA_MAX_QUEUE counts requests waiting for the scheduler (server/sched.go getRunner): with
    # none allowed, a request for a model that is not loaded, while another loads, is refused.
    with simulator(models=["slow", CHAT_MODEL], model_load_ms={"slow": 60_000}, max_queue=0) as sim:
        loading = raw_request(sim, "slow")
        wait_for(lambda: sim.stats().loading == "slow:latest")
        reply = completions(sim)
        loading.close()  # the load is aborted with its client
        wait_for(lambda: sim.stats().loading is None)
    assert reply.status_code == 503
    assert reply.json() == openai_error("server busy, please try again.  maximum pending requests exceeded")


# ---- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style, message", [("old", 'model "nope" not found, try pulling it first'), ("new", "model 'nope' not found")]
)
def test_a_missing_model_is_404_api_error_as_ollamas_v1_answers(style: str, message: str) -> None:
    with simulator(not_found_style=style) as sim:
        chat_reply = completions(sim, model="nope", stream=True)
        embed_reply = requests.post(sim.url + "/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=10)
    for reply in (chat_reply, embed_reply):
        assert reply.status_code == 404 and reply.headers["Content-Type"].startswith("application/json")
        assert reply.json() == openai_error(message)


@pytest.mark.parametrize(
    "path, body, message",
    [
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [], "stream": False},
            "[] is too short - 'messages'",
        ),
        ("/v1/chat/completions", {"model": "", "messages": [{"role": "user", "content": "x"}]}, "model is required"),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "Expected `float | null`, got `str` - at `$.temperature`",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
            "Invalid enum value 'yaml' - at `$.response_format.type`",
        ),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": []}, "invalid input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": [1, 2]}, "Expected `str`, got `int` - at `$.input[0]`"),
    ],
)
def test_bad_bodies_are_400_invalid_request_errors(
    sim: Simulator, path: str, body: dict[str, Any], message: str
) -> None:
    reply = requests.post(sim.url + path, json=body, timeout=10)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    assert error["message"] == message


def test_an_unknown_v1_path_is_go_routers_404(sim: Simulator) -> None:
    reply = requests.post(sim.url + "/v1/completions", json={}, timeout=10)
    assert (reply.status_code, reply.text) == (404, "404 page not found")


# ---- faults ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        (
            Fault(reason="rate_limit"),
            429,
            openai_error("Rate limit reached for requests. Please try again in 1s.", "requests", "rate_limit_exceeded"),
        ),
        (Fault(status=429, message="slow down"), 429, openai_error("slow down", "requests", "rate_limit_exceeded")),
        (Fault(reason="oom"), 500, openai_error(OOM)),
        (Fault(reason="busy"), 503, openai_error("server busy, please try again.  maximum pending requests exceeded")),
        (Fault(status=400, message="bad"), 400, openai_error("bad", "invalid_request_error")),
        (Fault(status=404), 404, openai_error("model 'llama3.2' not found")),
        (Fault(status=401), 401, openai_error("unauthorized", "invalid_request_error", "invalid_api_key")),
    ],
)
def test_status_faults_speak_openai_on_v1(sim: Simulator, fault: Fault, status: int, error: dict[str, Any]) -> None:
    sim.set_faults([fault])
    reply = completions(sim)
    assert (reply.status_code, reply.json()) == (status, error)


def test_a_fault_naming_no_endpoints_hits_the_inference_routes_of_both_apis(sim: Simulator) -> None:
    sim.set_faults([Fault(status=500, message="down")])
    assert completions(sim).status_code == 500
    assert (
        requests.post(sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=10).status_code
        == 500
    )
    ask = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": False}
    assert requests.post(sim.url + "/api/chat", json=ask, timeout=10).status_code == 500
    # A request with nothing to answer only loads the model: hit only by a fault that names "load".
    assert (
        requests.post(sim.url + "/api/chat", json={"model": CHAT_MODEL, "messages": []}, timeout=10).status_code == 200
    )
    assert requests.get(sim.url + "/v1/models", timeout=10).status_code == 200  # listing is not inference


def test_a_fault_for_openai_endpoints_spares_ollamas(sim: Simulator) -> None:
    sim.set_faults([Fault(reason="rate_limit", endpoints=("openai_chat", "openai_models"))])
    assert completions(sim).status_code == 429
    assert requests.get(sim.url + "/v1/models", timeout=10).status_code == 429
    assert (
        requests.post(sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=10).status_code
        == 200
    )
    ollama = requests.post(
        sim.url + "/api/chat",
        json={"model": CHAT_MODEL, "stream": False, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert ollama.status_code == 200


def test_a_counted_rate_limit_clears(sim: Simulator) -> None:
    sim.set_faults([Fault(reason="rate_limit", count=2)])
    assert [completions(sim).status_code for _ in range(3)] == [429, 429, 200]


def test_an_error_event_in_the_middle_of_a_stream_and_no_done(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=3)])
    got = events(completions(sim, stream=True))
    assert [c["choices"][0]["delta"]["content"] for c in got[:3]] == ["Why", " is", " the"]
    assert got[3:] == [openai_error(EOF_ERROR)]  # the stream ends there: no [DONE]
    sim.set_faults([Fault(kind="stream_error", message="boom")])
    whole = completions(sim)
    assert (whole.status_code, whole.json()) == (500, openai_error("boom"))


def test_a_cut_stream_closes_without_done(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=2, count=1)])
    seen: list[bytes] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for raw in completions(sim, stream=True).iter_lines():
            seen.append(raw)
    assert [line for line in seen if line] == [line for line in seen if line.startswith(b"data: {")]
    assert len([line for line in seen if line]) == 2
    assert completions(sim).status_code == 200


def test_a_cut_on_a_late_chunk_still_precedes_done(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=1000)])
    seen: list[bytes] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for raw in completions(sim, stream=True, stream_options={"include_usage": True}).iter_lines():
            seen.append(raw)
    data = [line for line in seen if line]
    assert len(data) == 14 and b"[DONE]" not in data[-1]  # twelve tokens, the finish, the usage


def test_a_hang_holds_a_v1_request(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", count=1, endpoints=("openai_embeddings",))])
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(sim.url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, timeout=(5, 0.5))
    assert completions(sim).status_code == 200


def test_faults_name_the_openai_endpoints() -> None:
    assert parse_fault("reason=rate_limit,endpoints=openai_chat+openai_embeddings") == Fault(
        reason="rate_limit", endpoints=("openai_chat", "openai_embeddings")
    )
    with pytest.raises(ValueError, match="openai_models"):
        parse_fault("endpoints=openai_completions")


# ---- the key ------------------------------------------------------------------------


def test_with_an_api_key_v1_requests_need_the_bearer_and_ollamas_api_does_not() -> None:
    with simulator(api_key="sk-test") as sim:
        unauthorized = openai_error("Incorrect API key provided", "invalid_request_error", "invalid_api_key")
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            reply = completions(sim, headers=headers)
            assert (reply.status_code, reply.json()) == (401, unauthorized)
        listing = requests.get(sim.url + "/v1/models", timeout=10)
        assert (listing.status_code, listing.json()) == (401, unauthorized)
        good = {"Authorization": "Bearer sk-test"}
        assert completions(sim, headers=good).status_code == 200
        assert requests.get(sim.url + "/v1/models", headers=good, timeout=10).status_code == 200
        assert requests.get(sim.url + "/api/tags", timeout=10).status_code == 200
        assert sim.stats().requests["openai_chat"] == 4  # refused requests count too
        assert sim.stats().responses == {401: 4, 200: 3}


def test_the_command_line_takes_an_api_key() -> None:
    assert config_from_args(build_parser().parse_args(["--api-key", "sk-1"])).api_key == "sk-1"
    assert config_from_args(build_parser().parse_args([])).api_key == ""
