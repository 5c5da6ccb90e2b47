"""The Anthropic provider against the simulator's /v1/messages, over real sockets: answers, streams, errors."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from typing import Any

import msgspec
import pytest
import redis
from support import client_for, events, wait_all

from llm_worker import exitcodes
from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.host.breaker import counts
from llm_worker.plugin import (
    INCOMPLETE,
    ChatRequest,
    Completion,
    Deadline,
    ErrorKind,
    GenerateRequest,
    Incomplete,
    PluginManager,
    ProviderError,
    RateLimited,
    SettingError,
    Settings,
    load_section,
)
from llm_worker.plugin.manager import Found
from llm_worker.plugins import anthropic as plugin
from llm_worker.plugins import anthropic_shapes as shapes
from llm_worker.plugins.anthropic import AnthropicProvider, AnthropicSettings

CLAUDE = "claude-sonnet-4-5"
MODEL = "anthropic:" + CLAUDE
KEY = "sk-ant-secret-4f1c"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"  # the simulator echoes the prompt, then counts to 12 tokens
THOUGHT = "Thinking within 4096 tokens."  # the simulator's reasoning at think: true (a 4096-token budget)
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"properties": {"city": {}}}}}

ProviderFactory = Callable[..., AnthropicProvider]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The simulator with a Claude model beside Ollama's defaults (the service fixture uses this one too)."""
    with Simulator(SimulatorConfig(port=0, models=[CLAUDE, "llama3.2", "nomic-embed-text"])) as simulator:
        yield simulator


@pytest.fixture
def provider_for() -> Iterator[ProviderFactory]:
    """Build providers from the plugin's own settings, as its hook does; every one is closed afterwards."""
    made: list[AnthropicProvider] = []

    def make(url: str, **env: str) -> AnthropicProvider:
        provider = AnthropicProvider(
            load_section(AnthropicSettings, {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": url, **env})
        )
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def anthropic(sim: Simulator, provider_for: ProviderFactory) -> AnthropicProvider:
    return provider_for(sim.url)


def call(
    provider: AnthropicProvider,
    endpoint: str = "chat",
    *,
    chunks: list[str] | None = None,
    thoughts: list[str] | None = None,
    model: str = MODEL,
    text: str = PROMPT,
    deadline: float = 30.0,
    **fields: Any,
) -> Completion:
    """Run a chat or generate call; it streams into ``chunks`` (and ``thoughts``) when a list is given."""
    on_chunk = None
    if chunks is not None:

        def on_chunk(piece: str, thinking: str = "") -> None:
            if thinking:
                (thoughts if thoughts is not None else chunks).append(thinking)
            if piece:
                chunks.append(piece)

    if endpoint == "chat":
        request = msgspec.convert({"messages": [{"role": "user", "content": text}], **fields}, ChatRequest)
        return provider.chat(model, request, Deadline(deadline), on_chunk)
    request = msgspec.convert({"prompt": text, **fields}, GenerateRequest)
    return provider.generate(model, request, Deadline(deadline), on_chunk)


def raised(run: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run()
    return caught.value


def requests_to(sim: Simulator) -> int:
    return sim.stats().requests.get("anthropic_messages", 0)


# ---- answers ------------------------------------------------------------------------


@pytest.mark.parametrize("model", [MODEL, CLAUDE], ids=["prefixed", "claude-name"])
def test_chat_answers_whole_with_text_reason_message_and_usage(
    anthropic: AnthropicProvider, sim: Simulator, model: str
) -> None:
    done = call(anthropic, model=model)
    assert done.text == REPLY and done.model == CLAUDE  # the name Anthropic was asked for
    assert done.done_reason == "stop"  # end_turn
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.prompt_tokens, done.completion_tokens) == (5, 12)
    assert sim.stats().requests_by_model == {f"{CLAUDE}:latest": 1}


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_generate_sends_the_system_prompt_as_system_and_the_prompt_as_one_user_message(
    anthropic: AnthropicProvider, streaming: bool
) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(anthropic, "generate", chunks=chunks, system="Answer in two words")
    assert done.text == REPLY and done.message is None
    assert done.prompt_tokens == 5 + 4  # the system's words are counted as input, so it reached `system`
    if streaming:
        assert "".join(chunks or []) == REPLY


def test_chat_streams_every_piece_in_order_and_reuses_the_connection(anthropic: AnthropicProvider) -> None:
    chunks: list[str] = []
    done = call(anthropic, chunks=chunks)
    assert len(chunks) == 12 and chunks[:2] == ["Why", " is"] and chunks[-1] == " 12"
    assert "".join(chunks) == done.text == REPLY
    assert (done.done_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 5, 12)
    assert call(anthropic).text == REPLY and len(anthropic.http._open) == 1  # message_stop, read to its end


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_thinking_is_kept_apart_from_the_text(anthropic: AnthropicProvider, streaming: bool) -> None:
    chunks: list[str] | None = [] if streaming else None
    thoughts: list[str] = []
    # With thinking on, Anthropic refuses temperature, top_k and a top_p under 0.95: the provider drops them.
    done = call(anthropic, chunks=chunks, thoughts=thoughts, think=True, options={"temperature": 0.2, "top_k": 5})
    assert done.text == REPLY and done.thinking == THOUGHT
    assert done.message == {"role": "assistant", "content": REPLY, "thinking": THOUGHT}
    assert done.completion_tokens == 4 + 12
    if streaming:
        assert "".join(thoughts) == THOUGHT and "".join(chunks or []) == REPLY


def test_num_predict_is_max_tokens_and_a_cut_answer_is_length(anthropic: AnthropicProvider) -> None:
    done = call(anthropic, text="a b c d e", options={"num_predict": 3})
    assert done.text == "a b c" and done.done_reason == "length"  # max_tokens


def test_options_translate_to_anthropics_names_and_thinking_comes_on_top_of_max_tokens() -> None:
    request = msgspec.convert(
        {
            "messages": [{"role": "user", "content": "x"}],
            "format": "json",
            "options": {"num_predict": 64, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop": ["END"], "seed": 1},
        },
        ChatRequest,
    )
    body = shapes.request_body(CLAUDE, request, "be brief", [], True, 4096)
    assert body == {
        "model": CLAUDE,
        "max_tokens": 64,
        "messages": [],
        "system": "be brief",
        "stream": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "stop_sequences": ["END"],
    }  # seed and format have no counterpart
    thinking = msgspec.convert(
        {"prompt": "x", "think": "high", "options": {"top_p": 0.97, "num_predict": -1}}, GenerateRequest
    )
    body = shapes.request_body(CLAUDE, thinking, "", [], False, 1000)
    assert body == {
        "model": CLAUDE,
        "max_tokens": 1000 + 16384,  # ANTHROPIC_MAX_TOKENS for the answer (-1: no limit), the budget on top
        "messages": [],
        "thinking": {"type": "enabled", "budget_tokens": 16384},
        "top_p": 0.97,
    }
    unthinking = msgspec.convert({"prompt": "x", "think": False}, GenerateRequest)
    assert "thinking" not in shapes.request_body(CLAUDE, unthinking, "", [], False, 1000)


def test_messages_translate_with_system_images_tool_calls_and_tool_results() -> None:
    request = msgspec.convert(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "system", "content": "be kind"},
                {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo=", "data:image/gif;base64,R0lG"]},
                {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                        {"id": "given", "function": {"name": "time", "arguments": "{}"}},
                    ],
                },
                {"role": "tool", "content": "12:00", "tool_name": "time"},
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ]
        },
        ChatRequest,
    )
    system, messages = shapes.messages(request.messages)
    assert system == "be brief\n\nbe kind"
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"}},
                {"type": "text", "text": "what is this?"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_3_0", "name": "weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "given", "name": "time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "given", "content": "12:00"},
                {"type": "tool_result", "tool_use_id": "toolu_3_0", "content": "sunny"},
            ],
        },
    ]
    assert shapes.tool(WEATHER) == {"name": "weather", "input_schema": {"properties": {"city": {}}}}
    orphan = msgspec.convert({"messages": [{"role": "tool", "content": "sunny"}]}, ChatRequest)
    assert raised(lambda: shapes.messages(orphan.messages)).kind is ErrorKind.VALIDATION


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_tool_calls_come_back_as_ollama_writes_them_and_their_results_are_answered(
    anthropic: AnthropicProvider, streaming: bool
) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(anthropic, chunks=chunks, text="Weather in Paris?", tools=[WEATHER])
    assert done.done_reason == "stop" and done.text == ""  # tool_use
    [made] = done.message["tool_calls"]
    assert made["function"] == {"name": "weather", "arguments": {"city": "sim"}} and made["id"].startswith("toolu_")
    # Given the call and its result in the conversation, the model answers in words.
    follow_up = msgspec.convert(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [made]},
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ],
            "tools": [WEATHER],
        },
        ChatRequest,
    )
    answer = anthropic.chat(MODEL, follow_up, Deadline(30), None)
    assert answer.text.startswith("sunny") and answer.done_reason == "stop"  # it echoes the tool's result


def test_embeddings_are_a_model_error_without_a_request(anthropic: AnthropicProvider, sim: Simulator) -> None:
    error = raised(lambda: anthropic.embed(MODEL, ["x"], Deadline(5)))
    assert error.kind is ErrorKind.MODEL and not error.retryable and not counts(error)
    assert "no embeddings" in error.message and sim.stats().requests == {}


def test_models_are_listed_under_the_job_names_that_reach_them(anthropic: AnthropicProvider) -> None:
    names = [m.name for m in anthropic.models()]
    assert names == [MODEL, "anthropic:llama3.2", "anthropic:nomic-embed-text"]


def test_health_says_ok_when_the_api_lists_models_and_never_raises(
    anthropic: AnthropicProvider, sim: Simulator, provider_for: ProviderFactory
) -> None:
    assert anthropic.health(5).ok and anthropic.health(5).url == sim.url
    with socket.socket() as holder:  # a port that refuses connections
        holder.bind(("127.0.0.1", 0))
        closed = provider_for(f"http://127.0.0.1:{holder.getsockname()[1]}").health(5)
    assert not closed.ok and "refused" in (closed.error_details or "").lower()
    with Simulator(SimulatorConfig(port=0, api_key="sk-ant-right")) as keyed:
        refused = provider_for(keyed.url).health(5)
    assert not refused.ok and "401 authentication_error: invalid x-api-key" in (refused.error_details or "")


# ---- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kind", "status", "retryable"),
    [
        (Fault(status=400, message="messages: roles must alternate"), ErrorKind.VALIDATION, 400, False),
        (Fault(status=403, message="Your API key does not have permission"), ErrorKind.PROVIDER, 403, False),
        (Fault(status=402, message="Your credit balance is too low"), ErrorKind.PROVIDER, 402, False),
        (Fault(reason="not_found"), ErrorKind.MODEL, 404, False),
        (
            Fault(status=413, message="Request exceeds the maximum allowed number of bytes"),
            ErrorKind.VALIDATION,
            413,
            False,
        ),
        (Fault(status=500, message="Internal server error"), ErrorKind.PROVIDER, 500, True),
        (Fault(reason="overloaded"), ErrorKind.PROVIDER, 529, True),
    ],
    ids=[
        "400-invalid-request",
        "403-permission",
        "402-billing",
        "404-not-found",
        "413-too-large",
        "500-api",
        "529-overloaded",
    ],
)
def test_each_error_type_has_its_kind(
    anthropic: AnthropicProvider, sim: Simulator, fault: Fault, kind: ErrorKind, status: int, retryable: bool
) -> None:
    sim.set_faults([fault])
    for chunks in (None, []):
        error = raised(lambda: call(anthropic, chunks=chunks))  # noqa: B023 - called at once
        assert (error.kind, error.status, error.retryable) == (kind, status, retryable)
        assert error.message.startswith(f"POST /v1/messages: {status} ") and "(request-id req_" in error.message
    assert requests_to(sim) == 2  # nothing retried within the call: the job's retries decide


def test_an_overloaded_anthropic_is_counted_by_the_breaker_and_is_no_rate_limit(
    anthropic: AnthropicProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(reason="overloaded", count=1)])
    error = raised(lambda: call(anthropic))
    assert not isinstance(error, RateLimited) and counts(error)
    assert error.message.startswith("POST /v1/messages: 529 overloaded_error: Overloaded")
    assert call(anthropic).text == REPLY  # once Anthropic has capacity again


def test_a_wrong_key_is_a_provider_error_that_is_never_retried(provider_for: ProviderFactory) -> None:
    with Simulator(SimulatorConfig(port=0, models=[CLAUDE], api_key="sk-ant-right")) as sim:
        error = raised(lambda: call(provider_for(sim.url)))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.PROVIDER, 401, False)
    assert "authentication_error: invalid x-api-key" in error.message and KEY not in error.message


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_rate_limit_is_rate_limited_with_the_retry_after_it_asked_for(
    anthropic: AnthropicProvider, sim: Simulator, streaming: bool
) -> None:
    sim.set_faults([Fault(reason="rate_limit", retry_after=7, count=1)])
    error = raised(lambda: call(anthropic, chunks=[] if streaming else None))
    assert isinstance(error, RateLimited) and error.retry_after == 7.0
    assert (error.kind, error.status, error.retryable, counts(error)) == (ErrorKind.RATE_LIMIT, 429, True, False)
    assert "429 rate_limit_error" in error.message
    assert requests_to(sim) == 1  # not retried within the call: the job waits as it was told
    assert call(anthropic).text == REPLY


def test_a_retry_after_given_as_an_http_date_is_read_as_seconds_from_now(
    anthropic: AnthropicProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(reason="rate_limit", retry_after=formatdate(time.time() + 30, usegmt=True), count=1)])
    error = raised(lambda: call(anthropic))
    assert isinstance(error, RateLimited) and error.retry_after is not None and 25 <= error.retry_after <= 30


def test_a_rate_limit_without_retry_after_waits_for_the_exhausted_limit_to_reset(
    anthropic: AnthropicProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(reason="rate_limit", count=1)])  # the simulator resets its limits a minute ahead
    error = raised(lambda: call(anthropic))
    assert isinstance(error, RateLimited) and error.retry_after is not None and 55 <= error.retry_after <= 60


def test_a_spend_limit_is_not_a_wait_but_a_refusal() -> None:
    spent = shapes.ErrorBody(type="rate_limit_error", message="spend limit", details={"error_code": shapes.SPEND_LIMIT})
    error = shapes.error_for(429, spent, "POST /v1/messages", {"retry-after": "5"})
    assert not isinstance(error, RateLimited) and (error.kind, error.retryable) == (ErrorKind.PROVIDER, False)


def test_an_error_event_mid_stream_raises_after_the_chunks_already_delivered(
    anthropic: AnthropicProvider, sim: Simulator
) -> None:
    # message_start, content_block_start, ping, then two text deltas: the fifth event is the error.
    sim.set_faults([Fault(kind="stream_error", reason="overloaded", after_chunks=5, count=1)])
    chunks: list[str] = []
    error = raised(lambda: call(anthropic, chunks=chunks))
    assert chunks == ["Why", " is"]
    assert (error.kind, error.status, counts(error)) == (ErrorKind.PROVIDER, None, True)
    assert error.message == "POST /v1/messages: stream error overloaded_error: Overloaded"
    assert call(anthropic, chunks=[]).text == REPLY  # the broken stream's connection is not reused half-read


@pytest.mark.parametrize("after_chunks", [4, 1000], ids=["early", "before-message-stop"])
def test_a_stream_cut_before_message_stop_is_incomplete_with_what_arrived(
    anthropic: AnthropicProvider, sim: Simulator, after_chunks: int
) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=after_chunks, count=1)])
    chunks: list[str] = []
    with pytest.raises(Incomplete) as caught:
        call(anthropic, chunks=chunks)
    partial = caught.value.partial
    assert partial.done_reason == INCOMPLETE and partial.text == "".join(chunks)
    assert chunks == ["Why"] if after_chunks == 4 else (len(chunks) == 12 and "".join(chunks) == REPLY)
    assert not counts(caught.value) and PROMPT not in caught.value.message


def test_no_answer_by_the_deadline_is_a_timeout(anthropic: AnthropicProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", seconds=5, count=1)])
    started = time.monotonic()
    error = raised(lambda: call(anthropic, deadline=0.5))
    assert error.kind is ErrorKind.TIMEOUT and time.monotonic() - started < 3


def test_a_refused_connection_is_a_network_error_that_says_the_api_is_unreachable(
    provider_for: ProviderFactory,
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        error = raised(lambda: call(provider_for(f"http://127.0.0.1:{holder.getsockname()[1]}")))
    assert error.kind is ErrorKind.NETWORK and error.unreachable


def test_the_key_and_the_prompt_never_reach_an_error_or_the_log(
    provider_for: ProviderFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_prompt = "my-private-question-91"
    with Simulator(SimulatorConfig(port=0, models=[CLAUDE], api_key="sk-ant-other")) as sim:
        errors = [raised(lambda: call(provider_for(sim.url), text=secret_prompt))]
        sim.set_faults([Fault(kind="cut", after_chunks=5)])
        right = provider_for(sim.url, ANTHROPIC_API_KEY="sk-ant-other")
        errors.append(raised(lambda: call(right, chunks=[], text=secret_prompt)))
        for fault in (Fault(reason="overloaded"), Fault(reason="rate_limit"), Fault(status=400, message="bad")):
            sim.set_faults([fault])
            errors.append(raised(lambda: call(right, text=secret_prompt)))
    for error in errors:
        for secret in (KEY, "sk-ant-other", secret_prompt):
            assert secret not in error.message and secret not in repr(error)
    assert KEY not in caplog.text and "sk-ant-other" not in caplog.text and secret_prompt not in caplog.text


# ---- the plugin and its settings ------------------------------------------------------


def test_the_plugin_offers_a_provider_only_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert plugin.llm_worker_providers(Settings()) == []
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    [made] = plugin.llm_worker_providers(Settings())
    assert made.name == "anthropic" and made.url == "https://api.anthropic.com"
    assert made.http._headers["x-api-key"] == KEY and made.http._headers["anthropic-version"] == "2023-06-01"
    made.close()


def test_prefixed_and_claude_models_are_served_and_the_rest_left_to_ollama(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    # Registered as the service does: built-ins first, then third parties, which are asked first.
    manager = PluginManager(disabled=set()).load([*_builtins(), Found("anthropic", plugin, "test")])
    providers = manager.providers(Settings())
    assert [p.name for p in providers][:1] == ["anthropic"]  # asked before the built-in catch-all

    def first_serving(model: str) -> str:  # as the worker's executor picks
        return next(p.name for p in providers if p.serves(model))

    assert [first_serving(m) for m in (MODEL, CLAUDE, "llama3.2", "anthropic:")] == [
        "anthropic",
        "anthropic",
        "ollama",
        "ollama",
    ]
    assert manager.settings_sections() == [("anthropic", AnthropicSettings)]
    for made in providers:
        made.close()


@pytest.mark.parametrize(
    ("env", "value", "allowed"),
    [
        ("ANTHROPIC_BASE_URL", "api.anthropic.com", "text matching `^https?://"),
        ("ANTHROPIC_VERSION", "latest", "text matching `^\\d{4}-\\d{2}-\\d{2}$`"),
        ("ANTHROPIC_MAX_TOKENS", "0", "an integer from 1 to 1000000"),
        ("ANTHROPIC_TIMEOUT", "soon", "an integer from 100 to 86400000"),
        ("ANTHROPIC_MODEL_PREFIX", "an thropic:", "text matching"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable_the_value_and_what_is_allowed(
    env: str, value: str, allowed: str
) -> None:
    with pytest.raises(SettingError) as caught:
        load_section(AnthropicSettings, {env: value})
    assert (caught.value.source, caught.value.value) == (env, value) and allowed in caught.value.allowed


def test_a_bad_setting_stops_start_up_with_exit_code_2_and_check_config_masks_the_key(tmp_path: Any) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "HOME": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:1/0",  # a run that wrongly starts fails fast
        "ANTHROPIC_API_KEY": KEY,
    }
    command = [sys.executable, "-m", "llm_worker.cli"]
    run = subprocess.run(
        [*command, "run"], env={**env, "ANTHROPIC_TIMEOUT": "soon"}, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == exitcodes.USAGE and run.stdout == ""
    assert run.stderr.startswith("llm-worker: bad setting: ANTHROPIC_TIMEOUT='soon': expected an integer from 100")
    check = subprocess.run([*command, "check-config"], env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == exitcodes.OK, check.stderr
    lines = {line.split()[0]: line for line in check.stdout.splitlines()}
    assert lines["ANTHROPIC_API_KEY"].split()[:2] == ["ANTHROPIC_API_KEY", "***"]
    assert lines["ANTHROPIC_MAX_TOKENS"].split()[:3] == ["ANTHROPIC_MAX_TOKENS", "4096", "(default;"]
    assert KEY not in check.stdout + check.stderr


# ---- end to end ----------------------------------------------------------------------


def test_a_running_service_answers_anthropic_jobs_whole_and_streamed(
    service: Callable[..., Any], sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    svc = service(ANTHROPIC_BASE_URL=sim.url, ANTHROPIC_API_KEY=KEY, WORKER_POOLS="llm-chat=2")
    client = client_for(redis_url)
    # Given a chat, a generate and a streamed chat for Claude, and a chat for Ollama's model...
    chat = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}]}, model=MODEL)
    generate = client.submit("generate", {"prompt": PROMPT, "system": "be brief"}, model=CLAUDE)
    streamed = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}], "stream": True}, model=MODEL)
    local = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}]}, model="llama3.2")
    # ...when they run, then each is answered by the provider that serves it, the stream in order.
    assert "".join(client.stream(streamed, timeout=30)) == REPLY
    results = wait_all(client, [chat, generate, streamed, local])
    assert all(result["success"] for result in results.values()), results
    assert results[chat]["response"]["message"]["content"] == REPLY
    assert results[generate]["response"]["response"] == REPLY
    assert (results[chat]["promptTokens"], results[chat]["completionTokens"]) == (5, 12)
    requests = sim.stats().requests
    assert (requests.get("anthropic_messages"), requests.get("chat")) == (3, 1)
    assert KEY not in svc.tail(10_000)


def _builtins() -> list[Found]:
    from llm_worker.plugins import ollama

    return [Found("ollama", ollama, "test")]


def test_a_429_with_retry_after_delays_the_job_by_that_much_without_spending_an_attempt(
    service: Callable[..., Any], sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given: Anthropic answers the next request 429 with Retry-After: 2, in its own error shape.
    service(ANTHROPIC_BASE_URL=sim.url, ANTHROPIC_API_KEY=KEY, WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    sim.set_faults([Fault(reason="rate_limit", retry_after=2, count=1)])
    # When: a chat for Claude comes.
    pushed = time.time()
    job = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}]}, model=MODEL, max_retries=0)
    (result,) = wait_all(client, [job], timeout=30).values()
    answered = time.time()
    # Then: it is answered, on its only attempt, at least the 2 s the provider asked for after it was refused.
    assert result["success"] and result["retryCount"] == 0, result
    assert answered - pushed >= 2.0
    retried = [e for e in events(r, "llm.request.retried") if e["jobId"] == job]
    # delayMs is counted from the delay's scheduling, a moment after the 429 arrived: within a few ms of 2000.
    assert [(e["errorType"], e["delayMs"] >= 1950) for e in retried] == [("rate_limit", True)]
    assert sim.stats().responses.get(429) == 1
    # And: the breaker counted nothing (a rate limit is not a failure of the provider).
    assert not events(r, "llm.breaker.opened")
