"""The OpenAI-compatible provider against a real inference server: llama.cpp, through llama-cpp-python's server.

The simulator says what we believe servers do; this says what one does. The
server runs a tiny random-weight model (tests/llamacpp_model.py) on one CPU
thread, with its defaults where they matter (``interrupt_requests``: a newer
request stops a running stream). Each xdist worker process that runs these
tests starts its own server, once. Without llama-cpp-python's environment
(scripts/llamacpp) the tests skip, and fail in CI.

What it showed (llama-cpp-python 0.3.36), and the provider now handles; the
simulator's OpenAI mode reproduces each, for tests/test_openai.py:

- a stream stopped for a newer request ends with ``[DONE]`` and no
  ``finish_reason``: that is Incomplete, not an answer; any request stops
  it, a GET /v1/models (a health probe) too, so OPENAI_MAX_CONCURRENT=1 and
  the host's gate are what keep two jobs whole;
- streams carry no usage (``stream_options`` is ignored): the provider
  counts the pieces;
- a model without a pooling type answers /v1/embeddings with a vector per
  token: a model error that says so;
- a prompt over the context is a 400 ``context_length_exceeded`` unstreamed,
  the job's validation error; streamed, it is a 200 and an empty stream (the
  error goes to the server's log only), so the provider asks again unstreamed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import msgspec
import pytest
import redis
from llamacpp_support import CHAT, CONTEXT, NOPOOL, LlamaServer, server_python
from support import client_for, wait_all

from llm_worker.plugin.providers import INCOMPLETE, Completion, Deadline, Incomplete, ProviderError
from llm_worker.plugins.openai import OpenAIProvider
from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest
from llm_worker.settings import config

MODEL = "openai:" + CHAT
LONG = 500  # tokens of an answer long enough to be running still when a second request comes

ProviderFactory = Callable[..., OpenAIProvider]


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    server = LlamaServer(server_python(), tmp_path_factory.mktemp("llamacpp")).start()
    yield server
    server.stop()


@pytest.fixture
def provider_for(llama: LlamaServer, request: pytest.FixtureRequest) -> Iterator[ProviderFactory]:
    made: list[OpenAIProvider] = []

    def make(**env: str) -> OpenAIProvider:
        settings = config.load({"OPENAI_BASE_URL": llama.url + "/v1", "OPENAI_RETRY_DELAY": "10", **env}).settings
        made.append(OpenAIProvider(settings))
        return made[-1]

    yield make
    for provider in made:
        provider.close()
    if getattr(request.node, "failed_call", False):
        print(f"\n---- llama-cpp-python's server log (last lines) ----\n{llama.tail()}")


@pytest.fixture
def openai(provider_for: ProviderFactory) -> OpenAIProvider:
    return provider_for()


def chat(
    provider: OpenAIProvider,
    text: str = "why is the sky blue?",
    *,
    on_chunk: Callable[..., None] | None = None,
    deadline: float = 60.0,
    **fields: object,
) -> Completion:
    request = msgspec.convert({"messages": [{"role": "user", "content": text}], **fields}, ChatRequest)
    return provider.chat(MODEL, request, Deadline(deadline), on_chunk)


def close(u: list[float], v: list[float]) -> bool:
    return all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(u, v, strict=True))


def raised(run: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run()
    return caught.value


# ---- answers ------------------------------------------------------------------------------------------------


def test_a_chat_is_answered_whole_with_the_servers_token_counts(openai: OpenAIProvider) -> None:
    done = chat(openai, options={"num_predict": 8, "temperature": 0, "seed": 3})
    assert done.done_reason == "length" and done.text.strip()  # the model never ends by itself: max_tokens does
    assert done.model == CHAT and done.message == {"role": "assistant", "content": done.text}
    assert done.completion_tokens == 8 and done.prompt_tokens is not None and done.prompt_tokens > 5


def test_a_streamed_generate_delivers_every_piece_and_counts_them_without_usage(openai: OpenAIProvider) -> None:
    chunks: list[str] = []
    request = msgspec.convert(
        {"prompt": "hello world", "system": "be brief", "options": {"num_predict": 12}}, GenerateRequest
    )
    done = openai.generate(MODEL, request, Deadline(60), chunks.append)
    assert done.done_reason == "length" and done.message is None
    assert len(chunks) == 12 and "".join(chunks) == done.text
    # llama-cpp-python sends no usage in streams, whatever stream_options asks: the pieces are counted.
    assert (done.prompt_tokens, done.completion_tokens) == (None, 12)
    # The stream's connection is kept and reused.
    assert chat(openai, options={"num_predict": 2}).completion_tokens == 2 and len(openai.http._open) == 1


def test_embeddings_are_one_pooled_vector_per_input_in_order(openai: OpenAIProvider) -> None:
    got = openai.embed(MODEL, ["hello world", "the sky is blue", "hello world"], Deadline(60))
    assert got.model == CHAT and got.prompt_tokens is not None and got.prompt_tokens >= 6
    assert [len(v) for v in got.vectors] == [64, 64, 64]  # the model's width
    # The same text twice in one batch: the same vector to float32's rounding, not to the bit (seen: 1e-7 apart),
    # since its place in the batch changes the order of the sums.
    assert close(got.vectors[0], got.vectors[2]) and not close(got.vectors[0], got.vectors[1])


def test_embeddings_of_a_model_without_pooling_are_a_model_error(openai: OpenAIProvider) -> None:
    error = raised(lambda: openai.embed("openai:" + NOPOOL, ["hello world", "blue"], Deadline(60)))
    assert (error.kind, error.retryable, error.counted) == (ErrorKind.MODEL, False, False)
    assert "(one per token), not one" in error.message and "has no pooling" in error.message
    assert len(openai.embed(MODEL, ["blue"], Deadline(60)).vectors) == 1  # the server is fine


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_prompt_over_the_context_is_the_jobs_validation_error(openai: OpenAIProvider, streaming: bool) -> None:
    words = " ".join(["blue"] * (CONTEXT + 100))
    error = raised(lambda: chat(openai, words, on_chunk=(lambda *a, **k: None) if streaming else None))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.VALIDATION, 400, False)
    assert "maximum context length" in error.message
    assert chat(openai, options={"num_predict": 2}).done_reason == "length"


# ---- streams that do not end well ---------------------------------------------------------------------------


def test_a_stream_stopped_for_a_newer_request_is_incomplete_and_the_newer_one_is_answered(
    provider_for: ProviderFactory,
) -> None:
    first, second = provider_for(), provider_for()
    newer: list[Completion] = []
    chunks: list[str] = []

    def on_chunk(text: str, thinking: str = "") -> None:
        chunks.append(text)
        if len(chunks) == 1:  # while the first streams (LONG tokens), a second request arrives
            newer.append(chat(second, "hello", options={"num_predict": 3}))

    with pytest.raises(Incomplete) as caught:
        chat(first, on_chunk=on_chunk, options={"num_predict": LONG})
    error = caught.value
    # llama-cpp-python ended the first stream with [DONE] and no finish_reason: before, a success.
    assert "[DONE] came without a finish_reason" in error.message
    assert error.kind is ErrorKind.PROVIDER and error.retryable and error.counted is False
    assert 1 <= len(chunks) < LONG and error.partial.text == "".join(chunks)
    assert error.partial.done_reason == INCOMPLETE and error.partial.completion_tokens == len(chunks)
    assert newer[0].done_reason == "length" and newer[0].completion_tokens == 3


def test_a_health_probe_stops_a_running_stream_too(provider_for: ProviderFactory) -> None:
    """Every request of llama-cpp-python's API waits for its one model, GET /v1/models too: a probe stops a stream.

    So a host must not probe such a server while its calls run (the sampler
    probes the OpenAI provider when no Ollama provider is loaded).
    """
    streaming, probing = provider_for(), provider_for()
    chunks: list[str] = []
    health = []

    def on_chunk(text: str, thinking: str = "") -> None:
        chunks.append(text)
        if len(chunks) == 1:
            health.append(probing.health(30))

    with pytest.raises(Incomplete):
        chat(streaming, on_chunk=on_chunk, options={"num_predict": LONG})
    assert health[0].ok and 1 <= len(chunks) < LONG


def test_a_client_that_leaves_mid_stream_times_out_and_the_server_serves_the_next(openai: OpenAIProvider) -> None:
    chunks: list[str] = []
    deadline = Deadline(60)
    gone = threading.Event()

    def on_chunk(text: str, thinking: str = "") -> None:
        chunks.append(text)
        if len(chunks) == 3:  # the job's time runs out here: the provider must leave at the next line
            deadline.at = 0
            gone.set()

    request = msgspec.convert(
        {"messages": [{"role": "user", "content": "hello"}], "options": {"num_predict": LONG}}, ChatRequest
    )
    error = raised(lambda: openai.chat(MODEL, request, deadline, on_chunk))
    assert gone.is_set() and (error.kind, error.retryable) == (ErrorKind.TIMEOUT, True)
    assert error.message == "POST /chat/completions: job timeout reached"
    assert not openai.http._open  # the half-read connection was closed, not kept
    chunks.clear()
    done = chat(openai, on_chunk=chunks.append, options={"num_predict": 4})
    assert done.done_reason == "length" and len(chunks) == 4


# ---- end to end: the service, Redis, and this server ---------------------------------------------------------


def test_a_running_service_answers_chat_generate_streams_and_embeddings_from_llama_cpp(
    service, llama: LlamaServer, redis_url: str, r: redis.Redis
) -> None:
    service(OPENAI_BASE_URL=llama.url + "/v1", WORKER_POOLS="llm-chat=1,llm-embeddings=1", OPENAI_MAX_CONCURRENT="1")
    client = client_for(redis_url)
    ids = {
        "chat": client.submit(
            "chat", {"messages": [{"role": "user", "content": "hi"}], "options": {"num_predict": 5}}, model=MODEL
        ),
        "generate": client.submit(
            "generate", {"prompt": "hello", "stream": True, "options": {"num_predict": 6}}, model=MODEL
        ),
        "embeddings": client.submit("embeddings", {"input": ["hello world", "blue"]}, model=MODEL),
        "nopool": client.submit("embeddings", {"input": ["hello world"]}, model="openai:" + NOPOOL),
        "too long": client.submit(
            "chat", {"messages": [{"role": "user", "content": "blue " * (CONTEXT + 100)}], "stream": True}, model=MODEL
        ),  # 200 and an empty stream, first
    }
    streamed = "".join(client.stream(ids["generate"], timeout=60))
    results = wait_all(client, ids.values(), timeout=60)
    chat_result, generate, embeddings, nopool, too_long = (results[ids[k]] for k in ids)
    assert chat_result["success"] and chat_result["response"]["doneReason"] == "length", chat_result
    assert chat_result["completionTokens"] == 5 and chat_result["promptTokens"] > 0
    assert generate["success"] and generate["response"]["response"] == streamed, generate
    assert generate["completionTokens"] == 6
    assert embeddings["success"] and [len(v) for v in embeddings["response"]["embeddings"]] == [64, 64], embeddings
    assert (nopool["success"], nopool["errorType"], nopool["retryCount"]) == (False, "model", 0), nopool
    assert (too_long["success"], too_long["errorType"], too_long["retryCount"]) == (False, "validation", 0), too_long


def test_with_openai_max_concurrent_1_two_streaming_jobs_at_once_are_both_whole(
    service, llama: LlamaServer, redis_url: str, r: redis.Redis
) -> None:
    # Two workers, one llama-cpp-python slot: without the host's gate each stream would stop the other.
    service(OPENAI_BASE_URL=llama.url + "/v1", WORKER_POOLS="llm-chat=2", OPENAI_MAX_CONCURRENT="1")
    client = client_for(redis_url)
    ids = [
        client.submit(
            "chat",
            {"messages": [{"role": "user", "content": f"story {n}"}], "stream": True, "options": {"num_predict": LONG}},
            model=MODEL,
            max_retries=0,
        )
        for n in range(2)
    ]
    results = wait_all(client, ids, timeout=120)
    for job_id in ids:
        result = results[job_id]
        assert result["success"] and result["response"]["doneReason"] == "length", result
        assert result["completionTokens"] == LONG and result["retryCount"] == 0
