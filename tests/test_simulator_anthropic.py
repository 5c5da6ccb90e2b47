"""The simulator's Anthropic mode over real sockets: /v1/messages and its stream, headers, errors, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig, parse_fault

CLAUDE = "claude-sonnet-4-5"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"
HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(port=0, models=[CLAUDE, "llama3.2"])) as running:
        yield running


def messages(
    sim: Simulator, headers: dict[str, str] | None = None, text: str = PROMPT, **body: Any
) -> requests.Response:
    body.setdefault("max_tokens", 64)
    payload = {"model": CLAUDE, "messages": [{"role": "user", "content": text}], **body}
    return requests.post(
        sim.url + "/v1/messages", json=payload, headers=HEADERS if headers is None else headers, timeout=10
    )


def events(reply: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    """Each named Server-Sent Event: its name and its data, checking that the data names the same type."""
    raw = reply.content.decode()
    assert raw.endswith("\n\n"), raw[-80:]
    out = []
    for block in raw.split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        name, data = name_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name
        out.append((name, data))
    return out


def test_a_message_is_answered_whole_with_usage_and_anthropics_headers(sim: Simulator) -> None:
    reply = messages(sim, system="Answer briefly")
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("application/json")
    body = reply.json()
    assert body["id"].startswith("msg_") and (body["type"], body["role"], body["model"]) == (
        "message",
        "assistant",
        CLAUDE,
    )
    assert body["content"] == [{"type": "text", "text": REPLY}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("end_turn", None)
    assert body["usage"] == {
        "input_tokens": 5 + 2,  # the system prompt's words too
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 12,
    }
    assert reply.headers["request-id"].startswith("req_")
    assert reply.headers["anthropic-ratelimit-requests-limit"] == "4000"
    assert reply.headers["anthropic-ratelimit-requests-remaining"] == "3999"
    assert reply.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert sim.stats().requests == {"anthropic_messages": 1}


def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens(sim: Simulator) -> None:
    body = messages(sim, text="a b c d e", max_tokens=3).json()
    assert body["content"][0]["text"] == "a b c" and body["stop_reason"] == "max_tokens"


def test_a_stream_sends_anthropics_events_in_order(sim: Simulator) -> None:
    reply = messages(sim, stream=True)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["request-id"].startswith("req_")
    got = events(reply)
    names = [name for name, _ in got]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[3:15] == ["content_block_delta"] * 12
    assert names[15:] == ["content_block_stop", "message_delta", "message_stop"]
    start = got[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["usage"]["input_tokens"]) == ([], None, 5)
    assert got[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(data["delta"]["text"] for name, data in got if name == "content_block_delta") == REPLY
    assert got[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 12},
    }


def test_thinking_comes_first_in_a_thinking_block_with_its_signature(sim: Simulator) -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    whole = messages(sim, max_tokens=4096, thinking=thinking).json()
    assert (
        whole["content"][0]["type"] == "thinking" and whole["content"][0]["thinking"] == "Thinking within 2048 tokens."
    )
    assert whole["content"][0]["signature"] and whole["content"][1] == {"type": "text", "text": REPLY}
    assert whole["usage"]["output_tokens"] == 4 + 12
    streamed = events(messages(sim, max_tokens=4096, thinking=thinking, stream=True))
    deltas = [data["delta"] for name, data in streamed if name == "content_block_delta"]
    assert [d["type"] for d in deltas[:5]] == ["thinking_delta"] * 4 + ["signature_delta"]
    assert {d["type"] for d in deltas[5:]} == {"text_delta"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"messages": []}, "messages: at least one message is required"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role: Input should be 'user' or 'assistant'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "greater than or equal to 1024"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "`max_tokens` must be greater than"),
        (
            {"max_tokens": 4096, "temperature": 0.5, "thinking": {"type": "enabled", "budget_tokens": 1024}},
            "temperature",
        ),
        ({"max_tokens": 4096, "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "top_k"),
    ],
    ids=["no-max-tokens", "no-messages", "system-role", "small-budget", "budget-over-max", "temperature", "top-k"],
)
def test_what_anthropic_refuses_is_a_400_invalid_request_error(
    sim: Simulator, body: dict[str, Any], message: str
) -> None:
    payload = {"model": CLAUDE, "messages": [{"role": "user", "content": "x"}], "max_tokens": 64, **body}
    payload = {k: v for k, v in payload.items() if v is not None}
    reply = requests.post(sim.url + "/v1/messages", json=payload, headers=HEADERS, timeout=10)
    assert reply.status_code == 400
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert message in error["error"]["message"] and error["request_id"] == reply.headers["request-id"]


def test_a_missing_model_is_a_404_not_found_error(sim: Simulator) -> None:
    reply = messages(sim, model="claude-nothing")
    assert reply.status_code == 404
    assert reply.json()["error"] == {"type": "not_found_error", "message": "model: claude-nothing"}


@pytest.mark.parametrize(
    ("headers", "status", "kind", "message"),
    [
        ({"anthropic-version": "2023-06-01"}, 401, "authentication_error", "x-api-key header is required"),
        ({"x-api-key": "sk-ant-test"}, 400, "invalid_request_error", "anthropic-version: header is required"),
        ({**HEADERS, "x-api-key": "sk-ant-wrong"}, 401, "authentication_error", "invalid x-api-key"),
    ],
    ids=["no-key", "no-version", "wrong-key"],
)
def test_the_key_and_the_version_are_required(headers: dict[str, str], status: int, kind: str, message: str) -> None:
    with Simulator(SimulatorConfig(port=0, models=[CLAUDE], api_key="sk-ant-test")) as sim:
        reply = messages(sim, headers=headers)
        listing = requests.get(sim.url + "/v1/models", headers=headers, timeout=10)
    for answer in (reply, listing):
        assert (answer.status_code, answer.json()["error"]) == (status, {"type": kind, "message": message})


def test_v1_models_is_anthropics_listing_for_an_anthropic_client_and_openais_otherwise(sim: Simulator) -> None:
    anthropic = requests.get(sim.url + "/v1/models", headers=HEADERS, timeout=10).json()
    assert [(m["type"], m["id"]) for m in anthropic["data"]] == [("model", CLAUDE), ("model", "llama3.2")]
    assert (anthropic["has_more"], anthropic["first_id"], anthropic["last_id"]) == (False, CLAUDE, "llama3.2")
    openai = requests.get(sim.url + "/v1/models", timeout=10).json()
    assert openai["object"] == "list" and openai["data"][0]["id"] == f"{CLAUDE}:latest"
    assert sim.stats().requests == {"anthropic_models": 1, "openai_models": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_with_tools_gets_a_call_of_the_first_tool(sim: Simulator, stream: bool) -> None:
    tools = [{"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    reply = messages(sim, tools=tools, stream=stream)
    if not stream:
        body = reply.json()
        [call] = body["content"]
        assert (call["type"], call["name"], call["input"], body["stop_reason"]) == (
            "tool_use",
            "weather",
            {"city": "sim"},
            "tool_use",
        )
        return
    got = events(reply)
    assert got[1][1]["content_block"]["type"] == "tool_use" and got[1][1]["content_block"]["input"] == {}
    pieces = [data["delta"]["partial_json"] for name, data in got if name == "content_block_delta"]
    assert json.loads("".join(pieces)) == {"city": "sim"} and got[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_a_rate_limit_fault_answers_429_with_retry_after_for_the_next_n_requests(sim: Simulator) -> None:
    sim.set_faults([Fault(reason="rate_limit", retry_after=7, count=2)])
    first, second, third = (messages(sim) for _ in range(3))
    for reply in (first, second):
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "7"
        assert reply.json()["error"]["type"] == "rate_limit_error"
        assert reply.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert third.status_code == 200 and "Retry-After" not in third.headers


def test_an_overloaded_fault_is_529_overloaded_error(sim: Simulator) -> None:
    sim.set_faults([parse_fault("reason=overloaded,count=1")])
    reply = messages(sim)
    assert reply.status_code == 529
    assert reply.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_a_stream_error_fault_is_an_error_event_and_a_cut_leaves_out_message_stop(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", reason="overloaded", after_chunks=4, count=1)])
    got = events(messages(sim, stream=True))
    assert [name for name, _ in got][-2:] == ["content_block_delta", "error"]
    assert got[-1][1]["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    sim.set_faults([Fault(kind="cut", after_chunks=1000, count=1)])
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        messages(sim, stream=True).content  # noqa: B018 - the read is the point: the connection just closes


def test_llm_worker_simulate_serves_anthropic_as_a_process() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "llm_worker.cli", "simulate", "--port", "0", "--models", CLAUDE]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.startswith("llm-worker simulator listening on "), line
        url = line.split()[-1]
        payload = {"model": CLAUDE, "max_tokens": 64, "messages": [{"role": "user", "content": PROMPT}]}
        reply = requests.post(url + "/v1/messages", json=payload, headers=HEADERS, timeout=10)
        assert reply.json()["content"] == [{"type": "text", "text": REPLY}]
    finally:
        process.terminate()
        process.wait(10)
