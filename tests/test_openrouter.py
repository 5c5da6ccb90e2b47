"""The OpenRouter provider against the simulator's /api/v1, over real sockets: answers, streams, errors."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
from support import client_for, wait_all

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
    ProviderError,
    RateLimited,
    SettingError,
    Settings,
    load_section,
)
from llm_worker.plugins import openrouter as plugin
from llm_worker.plugins.openrouter import OpenRouterProvider, OpenRouterSettings, error_for

REMOTE = "openai/gpt-4o-mini"
MODEL = "openrouter:" + REMOTE
KEY = "sk-or-secret-77d2"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"  # the simulator echoes the prompt, then counts to 12 tokens

ProviderFactory = Callable[..., OpenRouterProvider]


@pytest.fixture
def sim() -> Iterator[Simulator]:
    """The simulator with an OpenRouter model beside Ollama's defaults (the service fixture uses this one too)."""
    with Simulator(SimulatorConfig(port=0, models=[REMOTE, "llama3.2", "nomic-embed-text"])) as simulator:
        yield simulator


@pytest.fixture
def provider_for() -> Iterator[ProviderFactory]:
    """Build providers from the plugin's own settings, as its hook does; every one is closed afterwards."""
    made: list[OpenRouterProvider] = []

    def make(url: str, **env: str) -> OpenRouterProvider:
        settings = load_section(OpenRouterSettings, {"OPENROUTER_API_KEY": KEY, "OPENROUTER_BASE_URL": url, **env})
        made.append(OpenRouterProvider(settings))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def openrouter(sim: Simulator, provider_for: ProviderFactory) -> OpenRouterProvider:
    return provider_for(sim.url + "/api/v1")


def call(
    provider: OpenRouterProvider,
    endpoint: str = "chat",
    *,
    chunks: list[str] | None = None,
    thoughts: list[str] | None = None,
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
        return provider.chat(MODEL, request, Deadline(deadline), on_chunk)
    request = msgspec.convert({"prompt": text, **fields}, GenerateRequest)
    return provider.generate(MODEL, request, Deadline(deadline), on_chunk)


def raised(run: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run()
    return caught.value


def requests_to(sim: Simulator) -> int:
    return sim.stats().requests.get("openrouter_chat", 0)


# ---- answers ------------------------------------------------------------------------


def test_chat_answers_whole_with_text_reason_message_and_usage(openrouter: OpenRouterProvider, sim: Simulator) -> None:
    done = call(openrouter)
    assert done.text == REPLY and done.model == REMOTE and done.done_reason == "stop"
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.prompt_tokens, done.completion_tokens) == (5, 12)
    assert sim.stats().requests_by_model == {f"{REMOTE}:latest": 1}


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_generate_is_a_chat_of_the_system_and_the_prompt(openrouter: OpenRouterProvider, streaming: bool) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(openrouter, "generate", chunks=chunks, system="Answer in two words")
    assert done.text == REPLY and done.message is None and done.prompt_tokens == 5 + 4
    if streaming:
        assert "".join(chunks or []) == REPLY


def test_chat_streams_every_piece_in_order_past_the_keep_alive_comments(openrouter: OpenRouterProvider) -> None:
    chunks: list[str] = []
    done = call(openrouter, chunks=chunks)  # the stream begins with ": OPENROUTER PROCESSING"
    assert len(chunks) == 12 and chunks[:2] == ["Why", " is"] and "".join(chunks) == done.text == REPLY
    assert (done.done_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 5, 12)  # the usage chunk's
    assert call(openrouter).text == REPLY and len(openrouter.http._open) == 1  # [DONE] read: the connection kept


def test_keep_alive_comments_hold_a_slow_start_within_openrouter_timeout(provider_for: ProviderFactory) -> None:
    # The model takes 2.5 s to begin; OPENROUTER_TIMEOUT is 1.5 s; comments come every second.
    with Simulator(SimulatorConfig(port=0, models=[REMOTE], latency_ms=2500)) as slow:
        provider = provider_for(slow.url + "/api/v1", OPENROUTER_TIMEOUT="1500")
        assert call(provider, chunks=[]).text == REPLY
        # A whole answer has no comments to hold it: past 1.5 s without a byte it is a timeout.
        assert raised(lambda: call(provider)).kind is ErrorKind.TIMEOUT


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_reasoning_is_the_completions_thinking_apart_from_the_text(
    openrouter: OpenRouterProvider, streaming: bool
) -> None:
    chunks: list[str] | None = [] if streaming else None
    thoughts: list[str] = []
    done = call(openrouter, chunks=chunks, thoughts=thoughts, think="low")
    assert done.text == REPLY and done.thinking == "Thinking at low effort."
    assert done.message == {"role": "assistant", "content": REPLY, "thinking": "Thinking at low effort."}
    if streaming:
        assert "".join(thoughts) == "Thinking at low effort." and "".join(chunks or []) == REPLY


def test_options_translate_to_openrouters_parameters(openrouter: OpenRouterProvider) -> None:
    request = msgspec.convert(
        {
            "messages": [{"role": "user", "content": "x"}],
            "format": "json",
            "think": True,
            "options": {
                "num_predict": 64,
                "temperature": 0,
                "top_k": 5,
                "min_p": 0.1,
                "stop": ["END"],
                "seed": 1,
                "repeat_penalty": 1.1,
                "num_ctx": 8192,
            },
        },
        ChatRequest,
    )
    assert openrouter._body(MODEL, request, True) == {
        "model": REMOTE,
        "stream": True,
        "max_tokens": 64,
        "temperature": 0.0,
        "top_k": 5,
        "min_p": 0.1,
        "stop": ["END"],
        "seed": 1,
        "repetition_penalty": 1.1,
        "reasoning": {"enabled": True},
        "response_format": {"type": "json_object"},
    }  # num_ctx has no counterpart
    levels = msgspec.convert({"prompt": "x", "think": "max", "options": {"num_predict": -1}}, GenerateRequest)
    assert openrouter._body(MODEL, levels, False) == {"model": REMOTE, "stream": False, "reasoning": {"effort": "high"}}
    # Asked through the API, the answer is cut at max_tokens.
    assert call(openrouter, text="a b c d e", options={"num_predict": 3}).done_reason == "length"


def test_the_key_and_attribution_headers_are_sent(sim: Simulator, provider_for: ProviderFactory) -> None:
    provider = provider_for(sim.url + "/api/v1", OPENROUTER_REFERER="https://example.org", OPENROUTER_TITLE="Acme")
    assert call(provider).text == REPLY
    headers = provider.http._headers
    assert (headers["Authorization"], headers["HTTP-Referer"], headers["X-Title"]) == (
        f"Bearer {KEY}",
        "https://example.org",
        "Acme",
    )
    assert headers["X-OpenRouter-Title"] == "Acme"
    bare = provider_for(sim.url + "/api/v1")
    assert "HTTP-Referer" not in bare.http._headers and "X-Title" not in bare.http._headers


def test_embeddings_are_a_model_error_without_a_request(openrouter: OpenRouterProvider, sim: Simulator) -> None:
    error = raised(lambda: openrouter.embed(MODEL, ["x"], Deadline(5)))
    assert error.kind is ErrorKind.MODEL and not error.retryable and sim.stats().requests == {}


def test_models_and_health(openrouter: OpenRouterProvider, provider_for: ProviderFactory) -> None:
    listed = openrouter.models()
    assert [m.name for m in listed] == [MODEL, "openrouter:llama3.2", "openrouter:nomic-embed-text"]
    assert listed[0].details["pricing"] == {"prompt": "0.000001", "completion": "0.000002"}
    health = openrouter.health(5)
    assert health.ok and "3 models" in health.message
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        closed = provider_for(f"http://127.0.0.1:{holder.getsockname()[1]}/api/v1").health(5)
    assert not closed.ok and "refused" in (closed.error_details or "").lower()


# ---- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "kind", "status", "retryable"),
    [
        (Fault(status=400, message="Invalid request"), ErrorKind.VALIDATION, 400, False),
        (Fault(status=402, message="Insufficient credits"), ErrorKind.PROVIDER, 402, False),
        (Fault(status=403, message="Key not allowed"), ErrorKind.PROVIDER, 403, False),
        (Fault(status=404, message="No endpoints found for openai/gpt-4o-mini"), ErrorKind.MODEL, 404, False),
        (Fault(status=408, message="Request timed out"), ErrorKind.TIMEOUT, 408, True),
        (Fault(status=502, message="Provider returned error"), ErrorKind.PROVIDER, 502, True),
        (Fault(reason="busy"), ErrorKind.PROVIDER, 503, True),
    ],
    ids=["400", "402-credits", "403-key", "404", "408", "502-model-down", "503-no-provider"],
)
def test_each_error_code_has_its_kind(
    openrouter: OpenRouterProvider, sim: Simulator, fault: Fault, kind: ErrorKind, status: int, retryable: bool
) -> None:
    sim.set_faults([fault])
    for chunks in (None, []):
        error = raised(lambda: call(openrouter, chunks=chunks))  # noqa: B023 - called at once
        assert (error.kind, error.status, error.retryable) == (kind, status, retryable)
        assert error.message.startswith(f"POST /chat/completions: {status} ")
        assert counts(error) == (kind in (ErrorKind.PROVIDER, ErrorKind.TIMEOUT))  # as for every provider
    assert requests_to(sim) == 2  # nothing retried within the call: the job's retries decide
    if status >= 500:
        assert error.message.endswith("(provider Simulator)")


def test_a_model_openrouter_does_not_know_is_a_model_error(openrouter: OpenRouterProvider) -> None:
    request = msgspec.convert({"messages": [{"role": "user", "content": "x"}]}, ChatRequest)
    error = raised(lambda: openrouter.chat("openrouter:nobody/nothing", request, Deadline(30), None))
    assert (error.kind, error.status) == (ErrorKind.MODEL, 400) and "not a valid model ID" in error.message


def test_a_wrong_key_is_never_retried_and_a_moderation_refusal_is_the_inputs_fault(
    provider_for: ProviderFactory,
) -> None:
    with Simulator(SimulatorConfig(port=0, models=[REMOTE], api_key="sk-or-right")) as sim:
        error = raised(lambda: call(provider_for(sim.url + "/api/v1")))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.PROVIDER, 401, False)
    assert error.message == "POST /chat/completions: 401 User not found."
    flagged = plugin._Error(code=403, message="flagged", metadata={"reasons": ["x"], "flagged_input": "secret words"})
    refusal = error_for(403, flagged, "POST /chat/completions")
    assert refusal.kind is ErrorKind.VALIDATION and "secret words" not in refusal.message


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_rate_limit_is_rate_limited_with_its_retry_after(
    openrouter: OpenRouterProvider, sim: Simulator, streaming: bool
) -> None:
    sim.set_faults([Fault(reason="rate_limit", retry_after=12, count=1)])
    error = raised(lambda: call(openrouter, chunks=[] if streaming else None))
    assert isinstance(error, RateLimited) and error.retry_after == 12.0
    assert (error.kind, error.status, counts(error)) == (ErrorKind.RATE_LIMIT, 429, False)
    assert error.message.startswith("POST /chat/completions: 429 Rate limit exceeded")
    assert requests_to(sim) == 1 and call(openrouter).text == REPLY


def test_an_error_chunk_mid_stream_raises_after_the_chunks_already_delivered(
    openrouter: OpenRouterProvider, sim: Simulator
) -> None:
    # The keep-alive comment, then two pieces: the fourth line is the error chunk (finish_reason "error").
    sim.set_faults([Fault(kind="stream_error", after_chunks=3, count=1)])
    chunks: list[str] = []
    error = raised(lambda: call(openrouter, chunks=chunks))
    assert chunks == ["Why", " is"]
    assert (error.kind, error.status, counts(error)) == (ErrorKind.PROVIDER, None, True)
    assert error.message == "POST /chat/completions: 502 Internal Server Error"
    assert call(openrouter, chunks=[]).text == REPLY  # the broken stream's connection is not reused half-read


@pytest.mark.parametrize("after_chunks", [3, 1000], ids=["early", "before-done"])
def test_a_stream_cut_before_done_is_incomplete_with_what_arrived(
    openrouter: OpenRouterProvider, sim: Simulator, after_chunks: int
) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=after_chunks, count=1)])
    chunks: list[str] = []
    with pytest.raises(Incomplete) as caught:
        call(openrouter, chunks=chunks)
    assert caught.value.partial.done_reason == INCOMPLETE and caught.value.partial.text == "".join(chunks)
    assert chunks == ["Why", " is"] if after_chunks == 3 else "".join(chunks) == REPLY
    assert not counts(caught.value)


def test_no_answer_by_the_deadline_is_a_timeout(openrouter: OpenRouterProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", seconds=5, count=1)])
    started = time.monotonic()
    assert raised(lambda: call(openrouter, deadline=0.5)).kind is ErrorKind.TIMEOUT
    assert time.monotonic() - started < 3


def test_the_key_and_the_prompt_never_reach_an_error_or_the_log(
    openrouter: OpenRouterProvider, sim: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_prompt = "my-private-question-53"
    errors = []
    for fault in (
        Fault(kind="cut", after_chunks=3),
        Fault(kind="stream_error", after_chunks=3),
        Fault(reason="rate_limit"),
        Fault(status=400, message="bad"),
    ):
        sim.set_faults([fault])
        errors.append(raised(lambda: call(openrouter, chunks=[], text=secret_prompt)))  # noqa: B023
    for error in errors:
        assert KEY not in error.message and secret_prompt not in error.message and KEY not in repr(error)
    assert KEY not in caplog.text and secret_prompt not in caplog.text


# ---- the plugin and its settings ------------------------------------------------------


def test_the_plugin_offers_a_provider_only_with_a_key_and_serves_prefixed_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    assert plugin.llm_worker_providers(Settings()) == []
    monkeypatch.setenv("OPENROUTER_API_KEY", KEY)
    [made] = plugin.llm_worker_providers(Settings())
    assert made.name == "openrouter" and made.url == "https://openrouter.ai/api/v1"
    assert [made.serves(m) for m in (MODEL, REMOTE, "llama3.2", "openrouter:")] == [True, False, False, False]
    assert plugin.llm_worker_settings() == [OpenRouterSettings]
    made.close()


@pytest.mark.parametrize(
    ("env", "value", "allowed"),
    [
        ("OPENROUTER_BASE_URL", "openrouter.ai/api/v1", "text matching `^https?://"),
        ("OPENROUTER_TIMEOUT", "50", "an integer from 100 to 86400000"),
        ("OPENROUTER_MODEL_PREFIX", "open router:", "text matching"),
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable_the_value_and_what_is_allowed(
    env: str, value: str, allowed: str
) -> None:
    with pytest.raises(SettingError) as caught:
        load_section(OpenRouterSettings, {env: value})
    assert (caught.value.source, caught.value.value) == (env, value) and allowed in caught.value.allowed
    assert str(caught.value) == f"{env}={value!r}: expected {caught.value.allowed}"


# ---- end to end ----------------------------------------------------------------------


def test_a_running_service_answers_openrouter_jobs_whole_and_streamed(
    service: Callable[..., Any], sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    svc = service(
        OPENROUTER_BASE_URL=sim.url + "/api/v1",
        OPENROUTER_API_KEY=KEY,
        OPENROUTER_TITLE="llm-worker tests",
        WORKER_POOLS="llm-chat=2",
    )
    client = client_for(redis_url)
    # Given a chat, a generate and a streamed chat for an OpenRouter model, when they run...
    chat = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}]}, model=MODEL)
    generate = client.submit("generate", {"prompt": PROMPT}, model=MODEL)
    streamed = client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}], "stream": True}, model=MODEL)
    # ...then each is answered through OpenRouter, the stream in order.
    assert "".join(client.stream(streamed, timeout=30)) == REPLY
    results = wait_all(client, [chat, generate, streamed])
    assert all(result["success"] for result in results.values()), results
    assert results[chat]["response"]["message"]["content"] == REPLY
    assert results[generate]["response"]["response"] == REPLY
    assert (results[chat]["promptTokens"], results[chat]["completionTokens"]) == (5, 12)
    assert sim.stats().requests.get("openrouter_chat") == 3
    assert KEY not in svc.tail(10_000)
