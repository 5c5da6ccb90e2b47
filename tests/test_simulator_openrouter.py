"""The simulator's OpenRouter mode over real sockets; and the rate-limit fault in every mode's own shape."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest
import requests

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig, parse_fault

REMOTE = "openai/gpt-4o-mini"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"
BEARER = {"Authorization": "Bearer sk-or-test"}
KEEPALIVE = ": OPENROUTER PROCESSING"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(port=0, models=[REMOTE, "llama3.2"])) as running:
        yield running


def completions(
    sim: Simulator, text: str = PROMPT, headers: dict[str, str] | None = None, **body: Any
) -> requests.Response:
    payload = {"model": REMOTE, "messages": [{"role": "user", "content": text}], **body}
    return requests.post(
        sim.url + "/api/v1/chat/completions", json=payload, headers=BEARER if headers is None else headers, timeout=10
    )


def lines(reply: requests.Response) -> list[Any]:
    """Each SSE block: a comment as its text, "[DONE]" as it is, else the data decoded."""
    raw = reply.content.decode()
    assert raw.endswith("\n\n"), raw[-80:]
    out: list[Any] = []
    for block in raw.split("\n\n")[:-1]:
        assert "\n" not in block, block
        if block.startswith(":"):
            out.append(block)
        else:
            data = block.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_completion_is_answered_whole_with_usage_and_its_cost(sim: Simulator) -> None:
    reply = completions(sim)
    assert reply.status_code == 200
    body = reply.json()
    assert body["id"].startswith("gen-") and (body["object"], body["model"], body["provider"]) == (
        "chat.completion",
        REMOTE,
        "Simulator",
    )
    [choice] = body["choices"]
    assert choice["message"]["content"] == REPLY and choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (5, 12, 17)
    assert usage["cost"] == pytest.approx(5 * 0.000001 + 12 * 0.000002)
    assert sim.stats().requests == {"openrouter_chat": 1}


def test_a_stream_opens_with_a_keep_alive_comment_and_ends_with_usage_and_done(sim: Simulator) -> None:
    got = lines(completions(sim, stream=True))
    assert got[0] == KEEPALIVE and got[-1] == "[DONE]"
    chunks = got[1:-2]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] == 12  # always: no option needed


def test_keep_alive_comments_come_while_the_model_has_not_begun() -> None:
    with Simulator(SimulatorConfig(port=0, models=[REMOTE], latency_ms=2200)) as slow:
        got = lines(completions(slow, stream=True))
    assert got[:3] == [KEEPALIVE] * 3 and got[3] != KEEPALIVE  # at 0, 1 and 2 s


def test_reasoning_comes_first_and_exclude_hides_it(sim: Simulator) -> None:
    whole = completions(sim, reasoning={"effort": "high"}).json()
    assert whole["choices"][0]["message"]["reasoning"] == "Thinking at high effort."
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    got = lines(completions(sim, stream=True, reasoning={"enabled": True}))
    assert "".join(c["choices"][0]["delta"]["reasoning"] or "" for c in got[1:-2]) == "Thinking at medium effort."
    hidden = completions(sim, reasoning={"effort": "low", "exclude": True}).json()
    assert hidden["choices"][0]["message"]["reasoning"] is None and hidden["usage"]["completion_tokens"] == 16


def test_models_are_listed_with_their_prices(sim: Simulator) -> None:
    body = requests.get(sim.url + "/api/v1/models", timeout=10).json()
    assert [m["id"] for m in body["data"]] == [REMOTE, "llama3.2"]
    assert body["data"][0]["pricing"] == {"prompt": "0.000001", "completion": "0.000002"}
    assert body["data"][0]["context_length"] == 4096


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "No auth credentials found"), ({"Authorization": "Bearer sk-or-wrong"}, "User not found.")],
    ids=["no-key", "wrong-key"],
)
def test_a_request_needs_the_key(headers: dict[str, str], message: str) -> None:
    with Simulator(SimulatorConfig(port=0, models=[REMOTE], api_key="sk-or-test")) as sim:
        reply = completions(sim, headers=headers)
    assert (reply.status_code, reply.json()) == (401, {"error": {"code": 401, "message": message}})


def test_an_unknown_model_is_a_400_in_openrouters_words(sim: Simulator) -> None:
    reply = completions(sim, model="nobody/nothing")
    assert (reply.status_code, reply.json()) == (
        400,
        {"error": {"code": 400, "message": "nobody/nothing is not a valid model ID"}},
    )


def test_an_error_mid_stream_is_a_chunk_with_finish_reason_error_and_no_done(sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=3, count=1)])
    got = lines(completions(sim, stream=True))
    assert got[0] == KEEPALIVE and len(got) == 4 and "[DONE]" not in got
    error = got[-1]
    assert error["error"]["code"] == 502 and error["error"]["metadata"]["error_type"] == "provider_unavailable"
    assert error["choices"][0]["finish_reason"] == "error"


@pytest.mark.parametrize(
    ("path", "body", "headers", "shape"),
    [
        ("/api/chat", {"model": "llama3.2", "stream": False}, {}, "ollama"),
        ("/v1/chat/completions", {"model": "llama3.2"}, {}, "openai"),
        (
            "/v1/messages",
            {"model": "llama3.2", "max_tokens": 8},
            {"x-api-key": "k", "anthropic-version": "2023-06-01"},
            "anthropic",
        ),
        ("/api/v1/chat/completions", {"model": REMOTE}, BEARER, "openrouter"),
    ],
    ids=["ollama", "openai", "anthropic", "openrouter"],
)
def test_a_rate_limit_fault_speaks_each_apis_shape_with_its_retry_after(
    sim: Simulator, path: str, body: dict[str, Any], headers: dict[str, str], shape: str
) -> None:
    sim.set_faults([parse_fault("reason=rate_limit,retry_after=30,count=2")])
    payload = {**body, "messages": [{"role": "user", "content": PROMPT}]}
    replies = [requests.post(sim.url + path, json=payload, headers=headers, timeout=10) for _ in range(3)]
    for reply in replies[:2]:
        assert reply.status_code == 429 and reply.headers["Retry-After"] == "30"
        error = reply.json()
        if shape == "ollama":
            assert set(error) == {"error"} and isinstance(error["error"], str)
        elif shape == "openai":
            assert error["error"]["type"] == "requests" and error["error"]["code"] == "rate_limit_exceeded"
        elif shape == "anthropic":
            assert error["type"] == "error" and error["error"]["type"] == "rate_limit_error"
        else:
            assert error["error"]["code"] == 429 and error["error"]["message"].startswith("Rate limit exceeded")
    assert replies[2].status_code == 200  # the next N requests only


def test_a_retry_after_may_be_an_http_date_and_an_overloaded_fault_is_529_everywhere(sim: Simulator) -> None:
    when = formatdate(time.time() + 60, usegmt=True)
    sim.set_faults([Fault(reason="rate_limit", retry_after=when, count=1)])
    assert completions(sim).headers["Retry-After"] == when
    sim.set_faults([Fault(reason="overloaded", count=1)])
    reply = completions(sim)
    assert (reply.status_code, reply.json()["error"]["code"], reply.json()["error"]["message"]) == (
        529,
        529,
        "Overloaded",
    )
    assert reply.json()["error"]["metadata"] == {"provider_name": "Simulator"}  # a 5xx names the upstream
    with pytest.raises(ValueError, match="retry_after must not be negative"):
        Fault(reason="rate_limit", retry_after=-1)
