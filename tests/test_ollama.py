"""The Ollama provider against the simulator, over real sockets: answers, error kinds, retries, deadlines."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from llm_worker import config
from llm_worker.jobs import ChatRequest, ErrorKind, GenerateRequest, Message, Options
from llm_worker.plugins.ollama import OllamaProvider, classify
from llm_worker.providers import Completion, Deadline, ProviderError
from llm_worker.simulator import Fault, Simulator, SimulatorConfig

CHAT = "llama3.2"
EMBED = "nomic-embed-text"
PROMPT = "Why is the sky blue?"
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"  # the simulator echoes the prompt, then counts to reply_tokens (12)
BUSY = "server busy, please try again.  maximum pending requests exceeded"

ProviderFactory = Callable[..., OllamaProvider]


@pytest.fixture
def provider_for() -> Iterator[ProviderFactory]:
    """Build providers as a worker does, from settings; every one is closed afterwards."""
    made: list[OllamaProvider] = []

    def make(url: str, **env: str) -> OllamaProvider:
        provider = OllamaProvider(config.load({"OLLAMA_BASE_URL": url, "OLLAMA_RETRY_DELAY": "10", **env}).settings)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def ollama(sim: Simulator, provider_for: ProviderFactory) -> OllamaProvider:
    return provider_for(sim.url)


@pytest.fixture
def closed_url() -> Iterator[str]:
    """A URL whose port refuses connections: bound, never listening, so no one else can take it meanwhile."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{holder.getsockname()[1]}"


def call(provider: OllamaProvider, endpoint: str, *, chunks: list[str] | None = None, model: str = CHAT,
         text: str = PROMPT, deadline: float = 30.0, **fields: Any) -> Completion:
    """Run a chat or generate call; it streams into ``chunks`` when a list is given."""
    on_chunk = chunks.append if chunks is not None else None
    if endpoint == "chat":
        request = msgspec.convert({"messages": [{"role": "user", "content": text}], **fields}, ChatRequest)
        return provider.chat(model, request, Deadline(deadline), on_chunk)
    request = msgspec.convert({"prompt": text, **fields}, GenerateRequest)
    return provider.generate(model, request, Deadline(deadline), on_chunk)


def requests_to(sim: Simulator, endpoint: str) -> int:
    return sim.stats().requests.get(endpoint, 0)


# ---- answers ------------------------------------------------------------------------


def test_chat_answers_whole_with_text_reason_message_and_token_counts(ollama: OllamaProvider) -> None:
    done = call(ollama, "chat")
    assert done.text == REPLY and done.model == CHAT
    assert done.done_reason == "stop"
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.prompt_tokens, done.completion_tokens) == (5, 12)  # the simulator counts words


def test_chat_streams_every_piece_in_order_and_the_pieces_make_the_text(ollama: OllamaProvider) -> None:
    chunks: list[str] = []
    done = call(ollama, "chat", chunks=chunks)
    assert len(chunks) == 12 and chunks[:2] == ["Why", " is"] and chunks[-1] == " 12"
    assert "".join(chunks) == done.text == REPLY
    assert done.message == {"role": "assistant", "content": REPLY}
    assert (done.done_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 5, 12)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_generate_answers_whole_and_streamed_with_its_options_applied(ollama: OllamaProvider, streaming: bool) -> None:
    chunks: list[str] | None = [] if streaming else None
    done = call(ollama, "generate", chunks=chunks, text="Once upon a time", system="be brief", options={"num_predict": 6})
    assert done.text == "Once upon a time 5 6"
    assert done.done_reason == "length"  # num_predict reached the server and cut the reply short
    assert (done.prompt_tokens, done.completion_tokens) == (6, 6)  # system words count as prompt
    assert done.message is None  # generate has no assistant message
    if chunks is not None:
        assert chunks == ["Once", " upon", " a", " time", " 5", " 6"]


def test_embed_returns_one_unit_vector_per_input_in_input_order(ollama: OllamaProvider) -> None:
    inputs = ["one", "two words", "one"]
    got = ollama.embed(EMBED, inputs, Deadline(30))
    assert got.model == EMBED and len(got.vectors) == 3
    for vector in got.vectors:
        assert len(vector) == 16 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-6)
    assert got.vectors[0] == got.vectors[2] != got.vectors[1]  # same text, same vector; order kept
    assert got.prompt_tokens == 4
    assert ollama.embed(EMBED, ["two words"], Deadline(30)).vectors == [got.vectors[1]]


def test_models_lists_the_tags_and_marks_loaded_the_ones_a_call_loaded(ollama: OllamaProvider) -> None:
    before = {m.name: m for m in ollama.models()}
    assert set(before) == {"llama3.2:latest", "nomic-embed-text:latest"}
    assert not any(m.loaded for m in before.values())
    assert before["llama3.2:latest"].size > 0 and before["llama3.2:latest"].details["family"] == "llama"

    call(ollama, "chat")

    after = {m.name: m for m in ollama.models()}
    chat_model, embed_model = after["llama3.2:latest"], after["nomic-embed-text:latest"]
    assert chat_model.loaded and chat_model.vram > 0 and chat_model.expires_at
    assert not embed_model.loaded and embed_model.vram == 0 and embed_model.expires_at is None


def test_health_says_ok_with_the_version(ollama: OllamaProvider, sim: Simulator) -> None:
    health = ollama.health(10)
    assert health.ok and health.message == "Ollama is running"
    assert health.url == sim.url and health.version and health.error_details is None


def test_health_of_a_closed_port_is_not_ok_and_says_why_without_raising(provider_for: ProviderFactory, closed_url: str) -> None:
    health = provider_for(closed_url).health(10)
    assert not health.ok and health.message == "Ollama is not reachable"
    assert health.url == closed_url and health.version is None
    assert "GET /api/version" in health.error_details and "refused" in health.error_details.lower()


def test_health_of_a_server_that_never_answers_is_not_ok_within_its_timeout(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="hang", endpoints=("version",))])
    started = time.monotonic()
    health = ollama.health(0.5)
    assert not health.ok and "no answer" in health.error_details
    assert time.monotonic() - started < 10


# ---- error kinds for what Ollama really answers -----------------------------------------


@pytest.mark.parametrize("style, wording", [("old", 'model "missing-model" not found, try pulling it first'),
                                             ("new", "model 'missing-model' not found")], ids=["old", "new"])
def test_a_missing_model_is_a_model_error_in_both_wordings_and_is_not_retried(
        provider_for: ProviderFactory, style: str, wording: str) -> None:
    with Simulator(SimulatorConfig(port=0, not_found_style=style)) as sim:  # type: ignore[arg-type]
        ollama = provider_for(sim.url)
        for endpoint, run in [
            ("chat", lambda: call(ollama, "chat", model="missing-model")),
            ("chat", lambda: call(ollama, "chat", model="missing-model", chunks=[])),
            ("generate", lambda: call(ollama, "generate", model="missing-model")),
            ("embed", lambda: ollama.embed("missing-model", ["x"], Deadline(30))),
        ]:
            before = requests_to(sim, endpoint)
            with pytest.raises(ProviderError) as caught:
                run()
            assert caught.value.kind is ErrorKind.MODEL and caught.value.status == 404
            assert caught.value.message == f"POST /api/{endpoint}: {wording}"
            assert not caught.value.retryable
            assert requests_to(sim, endpoint) == before + 1


@pytest.mark.parametrize("fault, request_fields, message", [
    (Fault(reason="bad_request"), {}, "invalid request"),
    (None, {"options": Options(temperature="hot")}, "invalid options: "),  # type: ignore[arg-type]
], ids=["fault", "bad-options"])
def test_a_bad_request_is_a_validation_error_and_is_not_retried(
        ollama: OllamaProvider, sim: Simulator, fault: Fault | None, request_fields: dict[str, Any], message: str) -> None:
    sim.set_faults([fault] if fault else [])
    # Built directly, past the job validation that would refuse the options first.
    request = ChatRequest(messages=[Message(role="user", content=PROMPT)], **request_fields)
    with pytest.raises(ProviderError) as caught:
        ollama.chat(CHAT, request, Deadline(30), None)
    assert caught.value.kind is ErrorKind.VALIDATION and caught.value.status == 400
    assert caught.value.message.startswith(f"POST /api/chat: {message}")
    assert requests_to(sim, "chat") == 1


def test_a_400_saying_the_model_does_not_support_the_task_is_a_model_error(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=400, message='"nomic-embed-text" does not support chat')])
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", model=EMBED)
    assert caught.value.kind is ErrorKind.MODEL and caught.value.status == 400
    assert "does not support chat" in caught.value.message


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_busy_is_retried_max_retries_times_then_is_a_provider_error(
        provider_for: ProviderFactory, sim: Simulator, streaming: bool) -> None:
    ollama = provider_for(sim.url, OLLAMA_MAX_RETRIES="2")
    sim.set_faults([Fault(reason="busy")])
    chunks: list[str] | None = [] if streaming else None
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks)
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.status == 503
    assert caught.value.message == f"POST /api/chat: {BUSY}"
    assert requests_to(sim, "chat") == 3  # the first try and OLLAMA_MAX_RETRIES more
    assert not chunks


def test_busy_that_clears_after_one_retry_succeeds(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(reason="busy", count=1)])
    assert call(ollama, "chat").text == REPLY
    assert requests_to(sim, "chat") == 2
    assert sim.stats().responses == {503: 1, 200: 1}


@pytest.mark.parametrize("reason, words", [("oom", "requires more system memory"),
                                            ("runner", "llama runner process has terminated")])
def test_out_of_memory_and_a_terminated_runner_are_memory_errors_not_retried_within_the_call(
        ollama: OllamaProvider, sim: Simulator, reason: str, words: str) -> None:
    sim.set_faults([Fault(reason=reason)])  # type: ignore[arg-type]
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat")
    assert caught.value.kind is ErrorKind.MEMORY and caught.value.status == 500
    assert words in caught.value.message
    assert caught.value.retryable  # by the job-level retry, not by the HTTP client
    assert requests_to(sim, "chat") == 1


def test_any_other_500_is_a_provider_error_not_retried_within_the_call(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=500, message="something broke")])
    with pytest.raises(ProviderError) as caught:
        call(ollama, "generate")
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.status == 500
    assert caught.value.message == "POST /api/generate: something broke"
    assert requests_to(sim, "generate") == 1


def test_an_error_line_mid_stream_raises_after_the_chunks_already_delivered(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=3)])
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks)
    assert chunks == ["Why", " is", " the"]
    assert caught.value.kind is ErrorKind.PROVIDER
    assert caught.value.message == "POST /api/chat: an error was encountered while running the model: unexpected EOF"
    assert requests_to(sim, "chat") == 1


def test_an_out_of_memory_error_line_mid_stream_is_a_memory_error(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", reason="oom", after_chunks=1)])
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "generate", chunks=chunks)
    assert chunks == ["Why"] and caught.value.kind is ErrorKind.MEMORY


def test_a_stream_cut_before_its_final_line_is_a_provider_error(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=2)])
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks)
    assert chunks == ["Why", " is"]
    assert caught.value.kind is ErrorKind.PROVIDER
    message = caught.value.message
    assert message.startswith("POST /api/chat: ") and ("stream cut" in message or "stream ended before done" in message)
    assert requests_to(sim, "chat") == 1


def test_a_whole_answer_cut_after_the_server_took_the_request_is_not_run_again_and_again(
        ollama: OllamaProvider, sim: Simulator) -> None:
    # The simulator runs the model, then closes the connection with no answer:
    # the server saw the request, so a retry runs the model again.
    sim.set_faults([Fault(kind="cut")])
    with pytest.raises(ProviderError):
        call(ollama, "chat")
    # One retry can be defended (a kept-alive connection that died), not three.
    assert requests_to(sim, "chat") <= 2


def test_a_refused_connection_is_a_network_error_after_the_retries(provider_for: ProviderFactory, closed_url: str) -> None:
    ollama = provider_for(closed_url, OLLAMA_RETRY_DELAY="100", OLLAMA_MAX_RETRIES="3")
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat")
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4  # three doubling pauses: every retry was made
    assert caught.value.kind is ErrorKind.NETWORK and caught.value.status is None
    assert caught.value.message.startswith(f"POST /api/chat: cannot reach {closed_url}")
    assert "refused" in caught.value.message.lower()


def test_retries_never_outlast_the_deadline(provider_for: ProviderFactory, closed_url: str) -> None:
    ollama = provider_for(closed_url, OLLAMA_RETRY_DELAY="60000")
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", deadline=5)
    assert caught.value.kind is ErrorKind.NETWORK
    assert time.monotonic() - started < 5  # a 60 s pause would overrun the job: give up at once instead


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_server_that_never_answers_times_out_at_the_deadline(ollama: OllamaProvider, sim: Simulator, streaming: bool) -> None:
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=[] if streaming else None, deadline=0.5)
    elapsed = time.monotonic() - started
    assert caught.value.kind is ErrorKind.TIMEOUT and "no answer within" in caught.value.message
    assert 0.4 <= elapsed < 10
    assert requests_to(sim, "chat") == 1


def test_ollama_timeout_bounds_the_wait_for_an_answer_within_a_longer_deadline(
        provider_for: ProviderFactory, sim: Simulator) -> None:
    ollama = provider_for(sim.url, OLLAMA_TIMEOUT="300")
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", deadline=60)
    assert caught.value.kind is ErrorKind.TIMEOUT and "no answer within 0.3s" in caught.value.message
    assert time.monotonic() - started < 30


def test_a_stream_still_running_at_the_deadline_times_out_and_the_next_call_is_unharmed(
        ollama: OllamaProvider, sim: Simulator) -> None:
    sim.config.token_ms = 200  # twelve tokens: 2.4 s, far past the deadline
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks, deadline=1.0)
    assert caught.value.kind is ErrorKind.TIMEOUT
    assert len(chunks) < 12
    # The abandoned stream's connection must not leak its rest into the next answer.
    sim.config.token_ms = 0
    assert call(ollama, "chat").text == REPLY
    assert requests_to(sim, "chat") == 2


@pytest.mark.parametrize("endpoint", ["chat", "generate", "embed"])
def test_a_deadline_already_spent_times_out_without_sending_anything(ollama: OllamaProvider, sim: Simulator, endpoint: str) -> None:
    with pytest.raises(ProviderError) as caught:
        if endpoint == "embed":
            ollama.embed(EMBED, ["x"], Deadline(0))
        else:
            call(ollama, endpoint, deadline=0)
    assert caught.value.kind is ErrorKind.TIMEOUT and "job timeout reached" in caught.value.message
    assert sim.stats().requests == {}


# ---- classification, as a table ------------------------------------------------------


@pytest.mark.parametrize("status, message, kind", [
    (404, 'model "llama3.2" not found, try pulling it first', ErrorKind.MODEL),
    (404, "model 'llama3.2' not found", ErrorKind.MODEL),
    (400, "invalid options: Expected `float`, got `str` - at `$.options.temperature`", ErrorKind.VALIDATION),
    (400, "invalid request", ErrorKind.VALIDATION),
    (400, '"nomic-embed-text" does not support chat', ErrorKind.MODEL),
    (400, "Model Does Not Support Tools", ErrorKind.MODEL),
    (500, "model requires more system memory (12.3 GiB) than is available (4.0 GiB)", ErrorKind.MEMORY),
    (500, "llama runner process has terminated: signal: killed", ErrorKind.MEMORY),
    (500, "llama runner has unexpectedly stopped", ErrorKind.MEMORY),
    (500, "CUDA error: out of memory", ErrorKind.MEMORY),
    (500, "unable to allocate CUDA0 buffer", ErrorKind.MEMORY),
    (500, "an error was encountered while running the model: unexpected EOF", ErrorKind.PROVIDER),
    (503, "server busy, please try again.  maximum pending requests exceeded", ErrorKind.PROVIDER),
    (502, "bad gateway", ErrorKind.PROVIDER),
    (408, "request timeout", ErrorKind.TIMEOUT),
])
def test_classify_maps_each_ollama_answer_to_its_error_kind(status: int, message: str, kind: ErrorKind) -> None:
    assert classify(status, message) is kind
