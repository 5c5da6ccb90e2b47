"""The OpenAI-compatible provider against the simulator's /v1, over real sockets: answers, routing, errors, settings."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from support import chat, client_for, wait_all

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.plugin.manager import PluginManager
from llm_worker.plugin.openai_shapes import openai_messages
from llm_worker.plugin.providers import INCOMPLETE, Completion, Deadline, Incomplete, ProviderError, RateLimited
from llm_worker.plugins import openai as plugin
from llm_worker.plugins.openai import OpenAIProvider, classify
from llm_worker.protocol import jobs
from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest
from llm_worker.settings import config, sections
from llm_worker.settings.config import SettingError

CHAT = "openai:llama3.2"
EMBED = "openai:nomic-embed-text"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"  # the simulator echoes the prompt, then counts to reply_tokens (12)
RATE_LIMITED = "Rate limit reached for requests. Please try again in 1s."
CONTEXT = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens."

ProviderFactory = Callable[..., OpenAIProvider]


@pytest.fixture
def provider_for() -> Iterator[ProviderFactory]:
    """Build providers as a worker does, from settings; every one is closed afterwards."""
    made: list[OpenAIProvider] = []

    def make(url: str, **env: str) -> OpenAIProvider:
        provider = OpenAIProvider(config.load({"OPENAI_BASE_URL": url, "OPENAI_RETRY_DELAY": "10", **env}).settings)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def openai(sim: Simulator, provider_for: ProviderFactory) -> OpenAIProvider:
    return provider_for(sim.url + "/v1")


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A URL whose port refuses connections: bound, never listening, so no one else can take it meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}/v1"


def call(
    provider: OpenAIProvider,
    endpoint: str,
    *,
    chunks: list[str] | None = None,
    model: str = CHAT,
    text: str = PROMPT,
    deadline: float = 30.0,
    **fields: Any,
) -> Completion:
    """Run a chat or generate call; it streams into ``chunks`` when a list is given."""
    on_chunk = chunks.append if chunks is not None else None
    if endpoint == "chat":
        request = msgspec.convert({"messages": [{"role": "user", "content": text}], **fields}, ChatRequest)
        return provider.chat(model, request, Deadline(deadline), on_chunk)
    request = msgspec.convert({"prompt": text, **fields}, GenerateRequest)
    return provider.generate(model, request, Deadline(deadline), on_chunk)


def requests_to(sim: Simulator, endpoint: str = "openai_chat") -> int:
    return sim.stats().requests.get(endpoint, 0)


def raised(run: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run()
    return caught.value


# ---- answers ------------------------------------------------------------------------


def test_chat_answers_whole_with_text_reason_message_and_usage(openai: OpenAIProvider, sim: Simulator) -> None:
    done = call(openai, "chat")
    assert done.text == REPLY and done.model == "llama3.2"  # the name the API was asked for, without the prefix
    assert done.done_reason == "stop"
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.prompt_tokens, done.completion_tokens) == (5, 12)
    assert sim.stats().requests_by_model == {"llama3.2:latest": 1}


def test_chat_streams_every_piece_in_order_with_the_usage_of_the_last_chunk(
    openai: OpenAIProvider, sim: Simulator
) -> None:
    chunks: list[str] = []
    done = call(openai, "chat", chunks=chunks)
    assert len(chunks) == 12 and chunks[:2] == ["Why", " is"] and chunks[-1] == " 12"
    assert "".join(chunks) == done.text == REPLY
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.done_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 5, 12)
    # The connection the stream used is reused: the next call on this thread opens none.
    assert call(openai, "chat").text == REPLY and len(openai.http._open) == 1


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_options_reach_the_api_as_openai_parameters(openai: OpenAIProvider, streaming: bool) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(
        openai,
        "chat",
        chunks=chunks,
        text="a b c d e",
        format={"type": "object"},
        options={
            "num_predict": 3,
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": ["\n"],
            "seed": 7,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.5,
            "top_k": 40,
            "num_ctx": 8192,
            "repeat_penalty": 1.1,
        },
    )  # the last three are dropped
    assert done.text == "a b c" and done.done_reason == "length"  # num_predict was sent as max_tokens


def test_options_translate_to_openais_names_and_unknown_ones_are_dropped(openai: OpenAIProvider) -> None:
    request = msgspec.convert(
        {
            "messages": [{"role": "user", "content": "x"}],
            "format": "json",
            "options": {"num_predict": 64, "temperature": 0, "stop": ["END"], "seed": 1, "top_k": 5, "mirostat": 2},
        },
        ChatRequest,
    )
    body = openai._body(CHAT, request, print)
    assert body == {
        "model": "llama3.2",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "temperature": 0.0,
        "stop": ["END"],
        "seed": 1,
        "response_format": {"type": "json_object"},
    }
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = msgspec.convert({"prompt": "x", "format": schema, "options": {"num_predict": -1}}, GenerateRequest)
    assert openai._body(CHAT, request, None) == {
        "model": "llama3.2",
        "stream": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}},
    }


def test_messages_of_every_role_translate_with_images_and_tool_calls() -> None:
    request = msgspec.convert(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is this?", "images": ["iVBORw0KGgo=", "/9j/4AAQ"]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                        {"id": "given", "function": {"name": "time", "arguments": {}}},
                    ],
                },
                {"role": "tool", "content": "12:00", "tool_name": "time"},
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
            ]
        },
        ChatRequest,
    )
    assert openai_messages(request.messages) == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            ],
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_2_0",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {"id": "given", "type": "function", "function": {"name": "time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "given"},  # matched by the function's name
        {"role": "tool", "content": "sunny", "tool_call_id": "call_2_0"},
    ]


def test_a_chat_with_system_and_tool_messages_is_answered(openai: OpenAIProvider) -> None:
    request = msgspec.convert(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "weather", "arguments": {}}}],
                },
                {"role": "tool", "content": "sunny", "tool_name": "weather"},
                {"role": "user", "content": "and tomorrow?"},
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        },
        ChatRequest,
    )
    done = openai.chat(CHAT, request, Deadline(30), None)
    assert done.text.startswith("and tomorrow? 3 4")
    assert done.prompt_tokens == 6  # every message's words


def test_streamed_tool_calls_are_joined_and_returned_as_ollama_writes_them() -> None:
    got = plugin._Streamed("m")
    for chunk in [
        {
            "choices": [
                {
                    "delta": {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "weather", "arguments": ""},
                            }
                        ],
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "time", "arguments": "oops"}}]
                    }
                }
            ]
        },
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]:
        assert got.add(msgspec.convert(chunk, plugin._Answer)) == ("", "")
    done = got.completion(chat=True)
    assert done.done_reason == "tool_calls" and done.text == ""
    assert done.completion_tokens == 4  # no usage came: the chunks that carried a piece of a call, an estimate
    assert done.message == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "call_a", "function": {"name": "weather", "arguments": {"city": "Paris"}}},
            {"id": "call_b", "function": {"name": "time", "arguments": "oops"}},
        ],
    }  # not JSON: kept as the text


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_generate_is_a_chat_of_the_system_and_the_prompt(openai: OpenAIProvider, streaming: bool) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(
        openai, "generate", chunks=chunks, text="Once upon a time", system="be brief", options={"num_predict": 6}
    )
    assert done.text == "Once upon a time 5 6" and done.done_reason == "length"
    assert (done.prompt_tokens, done.completion_tokens) == (6, 6)  # system words count as prompt
    assert done.message is None  # generate has no assistant message
    if chunks is not None:
        assert chunks == ["Once", " upon", " a", " time", " 5", " 6"]


def test_embed_returns_one_unit_vector_per_input_in_input_order(openai: OpenAIProvider, sim: Simulator) -> None:
    inputs = ["one", "two words", "one"]
    got = openai.embed(EMBED, inputs, Deadline(30), {"truncate": True, "keep_alive": "5m"})  # Ollama's options: ignored
    assert got.model == "nomic-embed-text" and len(got.vectors) == 3 and got.prompt_tokens == 4
    for vector in got.vectors:
        assert len(vector) == 16 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
    assert got.vectors[0] == got.vectors[2] != got.vectors[1]
    assert openai.embed(EMBED, ["two words"], Deadline(30)).vectors == [got.vectors[1]]


def test_embed_puts_vectors_in_index_order_whatever_order_the_api_lists_them(
    openai: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_order = openai.embed(EMBED, ["a", "b", "c"], Deadline(30)).vectors
    answer = openai.http.json

    def shuffled(*args: Any, **kwargs: Any) -> Any:  # as servers that batch inputs may answer
        got = answer(*args, **kwargs)
        got.data = [got.data[2], got.data[0], got.data[1]]
        return got

    monkeypatch.setattr(openai.http, "json", shuffled)
    assert openai.embed(EMBED, ["a", "b", "c"], Deadline(30)).vectors == in_order


def test_models_lists_the_apis_models_none_loaded(openai: OpenAIProvider) -> None:
    models = {m.name: m for m in openai.models()}
    assert set(models) == {"llama3.2:latest", "nomic-embed-text:latest"}
    assert not any(m.loaded for m in models.values())
    assert models["llama3.2:latest"].details["owned_by"] == "library"


def test_health_says_ok_when_the_api_lists_its_models(openai: OpenAIProvider, sim: Simulator) -> None:
    health = openai.health(10)
    assert health.ok and health.url == sim.url + "/v1" and health.error_details is None
    assert "2 models" in health.message


def test_health_of_a_closed_port_is_not_ok_and_says_why_without_raising(
    provider_for: ProviderFactory, closed_url: str
) -> None:
    health = provider_for(closed_url, OPENAI_MAX_RETRIES="0").health(10)
    assert not health.ok and health.url == closed_url
    assert "GET /models" in health.error_details and "refused" in health.error_details.lower()


def test_health_with_a_wrong_key_is_not_ok() -> None:
    with Simulator(SimulatorConfig(port=0, api_key="sk-right")) as sim:
        provider = OpenAIProvider(
            config.load({"OPENAI_BASE_URL": sim.url + "/v1", "OPENAI_API_KEY": "sk-wrong"}).settings
        )
        health = provider.health(10)
        provider.close()
    assert not health.ok and health.error_details == "GET /models: Incorrect API key provided"


def test_the_key_and_organization_are_sent_as_headers() -> None:
    with Simulator(SimulatorConfig(port=0, api_key="sk-right")) as sim:
        provider = OpenAIProvider(
            config.load(
                {"OPENAI_BASE_URL": sim.url + "/v1", "OPENAI_API_KEY": "sk-right", "OPENAI_ORGANIZATION": "org-7"}
            ).settings
        )
        assert call(provider, "chat").text == REPLY
        assert provider.http._headers["OpenAI-Organization"] == "org-7"
        provider.close()
    bare = OpenAIProvider(config.load({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).settings)
    assert "Authorization" not in bare.http._headers and "OpenAI-Organization" not in bare.http._headers


# ---- error kinds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "style, wording",
    [("old", 'model "missing" not found, try pulling it first'), ("new", "model 'missing' not found")],
    ids=["old", "new"],
)
def test_a_missing_model_is_a_model_error_and_is_not_retried(
    provider_for: ProviderFactory, style: str, wording: str
) -> None:
    with Simulator(SimulatorConfig(port=0, not_found_style=style)) as sim:  # type: ignore[arg-type]
        openai = provider_for(sim.url + "/v1")
        for path, endpoint, run in [
            ("/chat/completions", "openai_chat", lambda: call(openai, "chat", model="openai:missing")),
            ("/chat/completions", "openai_chat", lambda: call(openai, "chat", model="openai:missing", chunks=[])),
            ("/chat/completions", "openai_chat", lambda: call(openai, "generate", model="openai:missing")),
            ("/embeddings", "openai_embeddings", lambda: openai.embed("openai:missing", ["x"], Deadline(30))),
        ]:
            before = requests_to(sim, endpoint)
            error = raised(run)
            assert error.kind is ErrorKind.MODEL and error.status == 404 and not error.retryable
            assert error.message == f"POST {path}: {wording}"
            assert requests_to(sim, endpoint) == before + 1


@pytest.mark.parametrize(
    "fault, message",
    [
        (Fault(status=400, message="invalid 'messages[0].role'"), "invalid 'messages[0].role'"),
        (
            Fault(status=422, message="1 validation error for ChatCompletionRequest"),
            "1 validation error for ChatCompletionRequest",
        ),
        (Fault(status=400, message=CONTEXT), CONTEXT),
        (Fault(status=500, message=CONTEXT), CONTEXT),  # the words decide, whatever the status
    ],
    ids=["400", "422", "context-400", "context-500"],
)
def test_a_refused_request_is_a_validation_error_and_is_not_retried(
    openai: OpenAIProvider, sim: Simulator, fault: Fault, message: str
) -> None:
    sim.set_faults([fault])
    error = raised(lambda: call(openai, "chat"))
    assert error.kind is ErrorKind.VALIDATION and not error.retryable
    assert error.message == f"POST /chat/completions: {message}"
    assert requests_to(sim) == 1


def test_a_bad_value_the_api_itself_refuses_is_a_validation_error(openai: OpenAIProvider, sim: Simulator) -> None:
    request = msgspec.convert({"messages": [{"role": "user", "content": "x"}]}, ChatRequest)
    body = openai._body(CHAT, request, None) | {"messages": [], "stream": False}
    error = raised(lambda: openai.http.json("POST", "/chat/completions", body, Deadline(30)))
    assert error.kind is ErrorKind.VALIDATION and error.status == 400 and "too short" in error.message


def test_a_wrong_key_is_a_provider_error_that_is_never_retried(provider_for: ProviderFactory) -> None:
    with Simulator(SimulatorConfig(port=0, api_key="sk-right")) as sim:
        openai = provider_for(sim.url + "/v1", OPENAI_API_KEY="sk-wrong", OPENAI_MAX_RETRIES="3")
        for run in (
            lambda: call(openai, "chat"),
            lambda: call(openai, "chat", chunks=[]),
            lambda: openai.embed(EMBED, ["x"], Deadline(30)),
        ):
            error = raised(run)
            assert error.kind is ErrorKind.PROVIDER and error.status == 401
            assert not error.retryable  # by the job-level retry either: a wrong key stays wrong
            assert error.message.endswith(": Incorrect API key provided")
        assert sim.stats().requests == {"openai_chat": 2, "openai_embeddings": 1}


def test_a_forbidden_answer_is_a_provider_error_that_is_never_retried(openai: OpenAIProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=403, message="Project does not have access to model")])
    error = raised(lambda: call(openai, "chat"))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.PROVIDER, 403, False)
    assert requests_to(sim) == 1


def test_a_408_is_a_timeout_error(openai: OpenAIProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=408, message="request timed out")])
    error = raised(lambda: call(openai, "chat"))
    assert (error.kind, error.status) == (ErrorKind.TIMEOUT, 408) and error.retryable


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_rate_limit_is_raised_at_once_as_rate_limited_not_retried_within_the_call(
    provider_for: ProviderFactory, sim: Simulator, streaming: bool
) -> None:
    # The job waits in the delayed set instead, spending no attempt (tests/test_ratelimit.py).
    openai = provider_for(sim.url + "/v1", OPENAI_MAX_RETRIES="2")
    sim.set_faults([Fault(reason="rate_limit", count=1)])
    error = raised(lambda: call(openai, "chat", chunks=[] if streaming else None))
    assert isinstance(error, RateLimited)
    assert (error.kind, error.status, error.retryable, error.counted) == (ErrorKind.RATE_LIMIT, 429, True, False)
    assert error.message == f"POST /chat/completions: {RATE_LIMITED}"
    assert error.retry_after is None  # the simulator sends no Retry-After: the job's backoff decides
    assert requests_to(sim) == 1 and sim.stats().responses == {429: 1}
    assert call(openai, "chat").text == REPLY


def test_a_busy_answer_is_retried_max_retries_times_then_is_a_provider_error(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    openai = provider_for(sim.url + "/v1", OPENAI_MAX_RETRIES="2")
    sim.set_faults([Fault(reason="busy")])
    started = time.monotonic()
    error = raised(lambda: call(openai, "chat"))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.PROVIDER, 503, True)
    assert error.message == "POST /chat/completions: server busy, please try again.  maximum pending requests exceeded"
    assert requests_to(sim) == 3  # the first try and OPENAI_MAX_RETRIES more
    assert time.monotonic() - started >= 0.01 + 0.02  # with the doubling OPENAI_RETRY_DELAY between them


def test_a_server_error_is_a_provider_error_not_retried_within_the_call(openai: OpenAIProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=500, message="The server had an error while processing your request.")])
    error = raised(lambda: call(openai, "generate"))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.PROVIDER, 500, True)
    assert error.message == "POST /chat/completions: The server had an error while processing your request."
    assert requests_to(sim) == 1


def test_an_error_event_mid_stream_raises_after_the_chunks_already_delivered(
    openai: OpenAIProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=3, count=1)])
    chunks: list[str] = []
    error = raised(lambda: call(openai, "chat", chunks=chunks))
    assert chunks == ["Why", " is", " the"]
    assert error.kind is ErrorKind.PROVIDER and error.status is None
    assert error.message == "POST /chat/completions: an error was encountered while running the model: unexpected EOF"
    assert requests_to(sim) == 1
    assert call(openai, "chat").text == REPLY  # the connection of the broken stream is not reused half-read


@pytest.mark.parametrize("after_chunks", [2, 1000], ids=["early", "after-the-finish"])
def test_a_stream_cut_before_done_is_incomplete_with_what_arrived(
    openai: OpenAIProvider, sim: Simulator, after_chunks: int
) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=after_chunks, count=1)])
    chunks: list[str] = []
    error = raised(lambda: call(openai, "chat", chunks=chunks))
    if after_chunks == 2:
        assert chunks == ["Why", " is"]
    else:
        assert len(chunks) == 12 and "".join(chunks) == REPLY  # every piece, and the finish: still not an answer
    # http.client may read a cut as the end of the body: either way, no [DONE] means no answer.
    assert isinstance(error, Incomplete) and error.kind is ErrorKind.PROVIDER and error.counted is False
    assert error.message.startswith(
        ("POST /chat/completions: stream ended before", "POST /chat/completions: stream cut")
    )
    assert error.partial.text == "".join(chunks) and error.partial.done_reason == INCOMPLETE
    assert error.partial.message == {"role": "assistant", "content": "".join(chunks)}
    assert requests_to(sim) == 1
    assert call(openai, "chat").text == REPLY


@pytest.mark.parametrize("ends_after, missing, text", [(4, "finish_reason", "Why is the sky"), (13, "[DONE]", REPLY)])
def test_a_stream_that_ends_cleanly_before_done_is_incomplete(
    openai: OpenAIProvider, monkeypatch: pytest.MonkeyPatch, ends_after: int, missing: str, text: str
) -> None:
    lines = openai.http.lines

    def ends_early(*args: Any) -> Iterator[bytes]:  # a server that closes its stream cleanly, too soon
        for number, line in enumerate(lines(*args)):
            if number == ends_after:
                return
            yield line

    monkeypatch.setattr(openai.http, "lines", ends_early)
    error = raised(lambda: call(openai, "chat", chunks=[]))
    assert isinstance(error, Incomplete) and error.kind is ErrorKind.PROVIDER
    assert error.message == f"POST /chat/completions: stream ended before {missing}"
    assert error.partial.text == text


# ---- what llama-cpp-python's server does (tests/test_llamacpp.py meets the real one) ------------------------


LLAMACPP = "openai:llamacpp-tiny"  # the simulator streams this one as llama-cpp-python does (its docstring)


@pytest.fixture
def llamacpp_sim() -> Iterator[Simulator]:
    """The simulator with a model it streams as llama-cpp-python does, long answers, and one without pooling."""
    config = SimulatorConfig(
        port=0, models=["llamacpp-tiny", "nomic-embed-text", "nopool-embed"], reply_tokens=400, token_ms=5
    )
    with Simulator(config) as sim:
        yield sim


def test_a_stream_stopped_by_a_newer_request_is_incomplete_not_an_empty_success(
    provider_for: ProviderFactory, llamacpp_sim: Simulator
) -> None:
    """llama-cpp-python stops a running stream for any newer request: [DONE], no finish_reason.

    Seen against llama-cpp-python 0.3.36 with two workers streaming at once:
    the provider took that [DONE] for a whole answer, and the job succeeded
    with what had come so far (nothing, when it came first).
    """
    first, second = provider_for(llamacpp_sim.url + "/v1"), provider_for(llamacpp_sim.url + "/v1")
    newer: list[Completion] = []
    chunks: list[str] = []

    def on_chunk(text: str, thinking: str = "") -> None:
        chunks.append(text)
        if len(chunks) == 1:  # a request arrives while the stream runs (400 pieces of 5 ms)
            newer.append(call(second, "chat", model=LLAMACPP, text="newer", options={"num_predict": 3}))

    request = msgspec.convert({"messages": [{"role": "user", "content": PROMPT}]}, ChatRequest)
    with pytest.raises(Incomplete) as caught:
        first.chat(LLAMACPP, request, Deadline(30), on_chunk)
    error = caught.value
    assert "[DONE] came without a finish_reason" in error.message
    assert error.kind is ErrorKind.PROVIDER and error.retryable and error.counted is False
    assert 1 <= len(chunks) < 400 and error.partial.text == "".join(chunks)
    assert error.partial.done_reason == INCOMPLETE
    assert newer[0].text == "newer 2 3" and newer[0].done_reason == "length"
    # The next stream, alone, is whole.
    assert call(first, "chat", model=LLAMACPP, chunks=[], options={"num_predict": 5}).done_reason == "length"


def test_a_stream_without_usage_counts_its_pieces_as_completion_tokens(
    openai: OpenAIProvider, provider_for: ProviderFactory, llamacpp_sim: Simulator
) -> None:
    # llama-cpp-python ignores stream_options.include_usage: its streams carry no token counts.
    chunks: list[str] = []
    done = call(
        provider_for(llamacpp_sim.url + "/v1"), "chat", model=LLAMACPP, chunks=chunks, options={"num_predict": 7}
    )
    assert done.done_reason == "length" and len(chunks) == 7
    assert (done.prompt_tokens, done.completion_tokens) == (None, 7)
    # Where the server counts, its usage is taken, not the estimate.
    assert call(openai, "chat", chunks=[]).completion_tokens == 12


def test_embeddings_of_a_model_without_pooling_are_a_model_error_that_says_what_to_do(
    provider_for: ProviderFactory, llamacpp_sim: Simulator
) -> None:
    # llama.cpp answers a vector per token of each input, a list of lists, for a model without a pooling type.
    openai = provider_for(llamacpp_sim.url + "/v1")
    error = raised(lambda: openai.embed("openai:nopool-embed", ["one two three", "four"], Deadline(30)))
    assert (error.kind, error.retryable, error.counted) == (ErrorKind.MODEL, False, False)
    assert error.message == (
        "POST /embeddings: the server answered 3 vectors for input 0 (one per token), not one: model 'nopool-embed'"
        " has no pooling; serve it with a pooling type (llama-server --pooling mean; llama-cpp-python kv_overrides"
        " <arch>.pooling_type=int:1) or use an embedding model"
    )
    assert len(openai.embed("openai:nomic-embed-text", ["one two three"], Deadline(30)).vectors[0]) == 16


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_prompt_over_a_llamacpp_context_is_a_validation_error_streamed_or_not(
    provider_for: ProviderFactory, llamacpp_sim: Simulator, streaming: bool
) -> None:
    # Streamed, llama-cpp-python answers 200 and an empty stream: asked again unstreamed, it says why.
    openai = provider_for(llamacpp_sim.url + "/v1")
    chunks: list[str] | None = [] if streaming else None
    error = raised(lambda: call(openai, "chat", model=LLAMACPP, text="blue " * 4100, chunks=chunks))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.VALIDATION, 400, False)
    assert error.message == (
        "POST /chat/completions: This model's maximum context length is 4096 tokens. However,"
        " you requested 4100 tokens (4100 in the messages, None in the completion). Please"
        " reduce the length of the messages or completion."
    )
    assert requests_to(llamacpp_sim) == (2 if streaming else 1) and chunks in ([], None)


def test_a_stream_cut_before_its_first_event_is_asked_again_unstreamed(openai: OpenAIProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=0, count=1)])
    chunks: list[str] = []
    done = call(openai, "chat", chunks=chunks)
    assert done.text == REPLY and done.done_reason == "stop" and chunks == [REPLY]  # the whole answer, at once
    assert (done.prompt_tokens, done.completion_tokens) == (5, 12)
    assert requests_to(sim) == 2


def test_the_provider_offers_openai_max_concurrent_to_the_hosts_gate() -> None:
    assert provider().max_concurrent == 0  # no limit of its own
    assert provider(OPENAI_MAX_CONCURRENT="1").max_concurrent == 1


# ---- thinking ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_reasoning_is_the_completions_thinking_apart_from_the_text(openai: OpenAIProvider, streaming: bool) -> None:
    pieces: list[tuple[str, str]] = []
    on_chunk = (lambda text, thinking="": pieces.append((text, thinking))) if streaming else None
    request = msgspec.convert({"messages": [{"role": "user", "content": PROMPT}], "think": "max"}, ChatRequest)
    done = openai.chat(CHAT, request, Deadline(30), on_chunk)
    # Ollama's /v1 sends a thinking model's thoughts as "reasoning"; "max" went as the top effort, "high".
    assert done.text == REPLY and done.thinking == "Thinking at high effort."
    assert done.message == {"role": "assistant", "content": REPLY, "thinking": "Thinking at high effort."}
    assert done.completion_tokens == 12 + 4  # the server's count: thoughts are generated tokens too
    if streaming:
        assert pieces[:4] == [("", "Thinking"), ("", " at"), ("", " high"), ("", " effort.")]
        assert "".join(text for text, _ in pieces[4:]) == REPLY and all(not t for _, t in pieces[4:])


def test_reasoning_content_as_llama_cpp_vllm_and_deepseek_send_it_is_thinking_too() -> None:
    whole = msgspec.json.decode(
        b'{"choices": [{"message": {"content": "4", "reasoning_content": "2+2"}, "finish_reason": "stop"}]}',
        type=plugin._Answer,
    )
    assert whole.choices[0].message.thinking() == "2+2"
    got = plugin._Streamed("m")
    for delta in ({"reasoning_content": "2+"}, {"reasoning_content": "2"}, {"content": "4"}):
        got.add(msgspec.convert({"choices": [{"delta": delta}]}, plugin._Answer))
    got.add(msgspec.convert({"choices": [{"delta": {}, "finish_reason": "stop"}]}, plugin._Answer))
    done = got.completion(chat=False)
    assert (done.text, done.thinking, done.message, done.completion_tokens) == ("4", "2+2", None, 3)


@pytest.mark.parametrize(
    "think, effort",
    [
        ("low", "low"),
        ("medium", "medium"),
        ("high", "high"),
        ("max", "high"),
        (True, None),
        (False, None),
        (None, None),
    ],
)
def test_think_levels_are_sent_as_reasoning_effort_and_booleans_are_not(
    openai: OpenAIProvider, think: object, effort: str | None
) -> None:
    fields = {} if think is None else {"think": think}
    body = openai._body(CHAT, msgspec.convert({"prompt": "x", **fields}, GenerateRequest), None)
    assert body.get("reasoning_effort") == effort


def test_a_refused_connection_is_a_network_error_after_the_retries(
    provider_for: ProviderFactory, closed_url: str
) -> None:
    openai = provider_for(closed_url, OPENAI_RETRY_DELAY="100", OPENAI_MAX_RETRIES="2")
    started = time.monotonic()
    error = raised(lambda: call(openai, "chat"))
    assert time.monotonic() - started >= 0.1 + 0.2  # two doubling pauses: every retry was made
    assert error.kind is ErrorKind.NETWORK and error.status is None and error.retryable
    assert error.message.startswith(f"POST /chat/completions: cannot reach {closed_url}")
    assert "refused" in error.message.lower()


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_server_that_never_answers_times_out_at_the_deadline(
    openai: OpenAIProvider, sim: Simulator, streaming: bool
) -> None:
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    error = raised(lambda: call(openai, "chat", chunks=[] if streaming else None, deadline=0.5))
    assert error.kind is ErrorKind.TIMEOUT and "no answer within" in error.message
    assert 0.4 <= time.monotonic() - started < 10


def test_openai_timeout_bounds_the_wait_for_an_answer_within_a_longer_deadline(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    openai = provider_for(sim.url + "/v1", OPENAI_TIMEOUT="300")
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    error = raised(lambda: call(openai, "chat", deadline=60))
    assert error.kind is ErrorKind.TIMEOUT and error.message == "POST /chat/completions: no answer within 0.3s"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "status, message, kind",
    [
        (400, "Invalid value for 'temperature'", ErrorKind.VALIDATION),
        (422, "Input should be a valid string", ErrorKind.VALIDATION),
        (400, CONTEXT, ErrorKind.VALIDATION),
        (500, "context_length_exceeded", ErrorKind.VALIDATION),
        (401, "Incorrect API key provided", ErrorKind.PROVIDER),
        (403, "Country, region, or territory not supported", ErrorKind.PROVIDER),
        (404, "The model `gpt-9` does not exist or you do not have access to it.", ErrorKind.MODEL),
        (408, "Request timed out", ErrorKind.TIMEOUT),
        (429, RATE_LIMITED, ErrorKind.RATE_LIMIT),
        (500, "The server had an error while processing your request.", ErrorKind.PROVIDER),
        (502, "Bad gateway", ErrorKind.PROVIDER),
        (503, "The engine is currently overloaded", ErrorKind.PROVIDER),
        (409, "conflict", ErrorKind.PROVIDER),
    ],
)
def test_classify_maps_each_answer_to_its_error_kind(status: int, message: str, kind: ErrorKind) -> None:
    assert classify(status, message) is kind


# ---- which models it serves -----------------------------------------------------------------


def provider(**env: str) -> OpenAIProvider:
    return OpenAIProvider(config.load({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", **env}).settings)


def test_prefixed_and_mapped_models_are_served_under_their_remote_names() -> None:
    p = provider(OPENAI_MODEL_MAP="fast=gpt-4o-mini,llama3.2=meta-llama/Llama-3.2-3B-Instruct,openai:big=gpt-4o")
    assert p.remote_name("openai:gpt-4o-mini") == "gpt-4o-mini"
    assert p.remote_name("openai:fast") == "gpt-4o-mini"  # the map, prefix or not
    assert p.remote_name("fast") == "gpt-4o-mini"
    assert p.remote_name("llama3.2") == "meta-llama/Llama-3.2-3B-Instruct"
    assert p.remote_name("openai:big") == "gpt-4o"
    for model in ("mistral", "gpt-4o-mini", "openai:", "llama3.2:latest", "OPENAI:x"):
        assert not p.serves(model), model
        assert p.remote_name(model) is None


def test_another_prefix_or_none_at_all() -> None:
    assert provider(OPENAI_MODEL_PREFIX="vllm/").remote_name("vllm/qwen2.5") == "qwen2.5"
    assert not provider(OPENAI_MODEL_PREFIX="vllm/").serves("openai:qwen2.5")
    everything = provider(OPENAI_MODEL_PREFIX="")
    assert everything.serves("llama3.2") and everything.remote_name("llama3.2") == "llama3.2"


def test_a_model_it_does_not_serve_is_a_model_error_without_a_request(openai: OpenAIProvider, sim: Simulator) -> None:
    error = raised(lambda: call(openai, "chat", model="llama3.2"))
    assert error.kind is ErrorKind.MODEL and sim.stats().requests == {}


def test_the_plugin_offers_a_provider_only_with_a_base_url() -> None:
    assert plugin.llm_worker_providers(config.load({}).settings) == []
    [made] = plugin.llm_worker_providers(config.load({"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}).settings)
    assert isinstance(made, OpenAIProvider) and made.name == "openai"


def test_with_both_builtins_loaded_prefixed_and_mapped_models_reach_openai_and_the_rest_ollama() -> None:
    manager = PluginManager(disabled=set()).load()
    names = [info.name for info in manager.plugins()]
    assert "ollama" in names and "openai" in names
    settings = config.load(
        {"OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_MODEL_MAP": "fast=gpt-4o-mini"}
    ).settings
    providers = manager.providers(settings)
    assert [p.name for p in providers] == ["openai", "ollama"]  # asked in this order; Ollama serves every model

    def first_serving(model: str) -> str:  # as the worker's executor picks
        return next(p.name for p in providers if p.serves(model))

    models = ("openai:gpt-4o", "fast", "llama3.2", "openai")
    assert [first_serving(m) for m in models] == ["openai", "openai", "ollama", "ollama"]
    assert [p.name for p in manager.providers(config.load({}).settings)] == ["ollama"]  # off without a URL
    for made in providers:
        made.close()


# ---- settings ------------------------------------------------------------------------


def test_defaults_leave_the_provider_off() -> None:
    o = config.Settings().openai
    assert (o.base_url, o.api_key, o.model_prefix, o.model_map, o.timeout, o.max_retries, o.organization) == (
        "",
        "",
        "openai:",
        {},
        120_000,
        2,
        "",
    )


@pytest.mark.parametrize(
    ("env", "value", "allowed"),
    [
        ("OPENAI_BASE_URL", "api.openai.com/v1", "text matching `^(https?://"),
        ("OPENAI_BASE_URL", "ftp://api.openai.com/v1", "text matching `^(https?://"),
        ("OPENAI_BASE_URL", "http://", "text matching `^(https?://"),
        ("OPENAI_MODEL_MAP", "llama3.2", "comma-separated model=remote pairs"),
        ("OPENAI_MODEL_MAP", "a=b,c", "comma-separated model=remote pairs"),
        ("OPENAI_MODEL_MAP", "=gpt-4o", "comma-separated model=remote pairs"),
        ("OPENAI_MODEL_MAP", "a=b,a=c", "comma-separated model=remote pairs"),
        ("OPENAI_MODEL_MAP", "fast=", "remotes matching ^\\S{1,256}$"),
        ("OPENAI_MODEL_MAP", "my model=gpt-4o", "models matching " + sections.MODEL_NAME),
        ("OPENAI_MODEL_PREFIX", "-x:", "text matching"),
        ("OPENAI_MODEL_PREFIX", "open ai:", "text matching"),
        ("OPENAI_TIMEOUT", "50", "an integer from 100 to 86400000"),
        ("OPENAI_MAX_RETRIES", "21", "an integer from 0 to 20"),
        ("OPENAI_RETRY_DELAY", "-1", "an integer from 0 to 60000"),
    ],
)
def test_a_bad_openai_setting_is_refused_by_name(env: str, value: str, allowed: str) -> None:
    with pytest.raises(SettingError) as caught:
        config.load({env: value})
    assert (caught.value.source, caught.value.value) == (env, value)
    assert allowed in caught.value.allowed
    assert str(caught.value) == f"{env}={value!r}: expected {caught.value.allowed}"


def test_good_openai_settings_from_env_and_toml(tmp_path: Path) -> None:
    s = config.load(
        {
            "OPENAI_BASE_URL": "https://api.openai.com/v1",
            "OPENAI_API_KEY": "sk-abc",
            "OPENAI_MODEL_MAP": " fast = gpt-4o-mini , hf.co/u/r:Q4=meta-llama/Llama-3.1-8B ",
            "OPENAI_TIMEOUT": "5000",
            "OPENAI_MAX_RETRIES": "0",
            "OPENAI_ORGANIZATION": "org-1",
        }
    ).settings.openai
    assert s.model_map == {"fast": "gpt-4o-mini", "hf.co/u/r:Q4": "meta-llama/Llama-3.1-8B"}
    assert (s.base_url, s.api_key, s.timeout, s.max_retries, s.organization) == (
        "https://api.openai.com/v1",
        "sk-abc",
        5000,
        0,
        "org-1",
    )
    path = tmp_path / "settings.toml"
    path.write_text('[openai]\nbase_url = "http://localhost:8000/v1"\nmodel_map = {fast = "qwen2.5"}\n')
    assert config.load({}, str(path)).settings.openai.model_map == {"fast": "qwen2.5"}
    path.write_text("[openai]\nmodel_map = {fast = 3}\n")
    with pytest.raises(SettingError, match="comma-separated model=remote pairs"):
        config.load({}, str(path))


def test_the_api_key_is_masked_and_the_map_shown_as_pairs() -> None:
    settings = config.load({"OPENAI_API_KEY": "sk-secret-1", "OPENAI_MODEL_MAP": "a=b,c=d"}).settings
    shown = {decl.env: value for decl, value in config.effective(settings)}
    assert shown["OPENAI_API_KEY"] == "***" and "sk-secret-1" not in "\n".join(shown.values())
    assert shown["OPENAI_MODEL_MAP"] == "a=b,c=d"


def test_model_names_in_settings_follow_the_job_rule() -> None:
    assert sections.MODEL_NAME == jobs.MODEL_NAME


# ---- end to end --------------------------------------------------------------------


def test_a_running_service_sends_prefixed_models_to_openai_and_the_rest_to_ollama(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    service(OPENAI_BASE_URL=sim.url + "/v1", WORKER_POOLS="llm-chat=2")
    client = client_for(redis_url)
    # Given a job for each provider, when both run, then each API got exactly one request.
    via_openai = chat(client, PROMPT, model="openai:llama3.2")
    via_ollama = chat(client, PROMPT, model="llama3.2")
    results = wait_all(client, [via_openai, via_ollama])
    for job_id in (via_openai, via_ollama):
        assert results[job_id]["success"], results[job_id]
        assert results[job_id]["response"]["message"]["content"] == REPLY
    assert results[via_openai]["promptTokens"] == 5 and results[via_openai]["completionTokens"] == 12
    requests = sim.stats().requests
    assert (requests.get("openai_chat"), requests.get("chat")) == (1, 1)
