"""The Ollama provider against the simulator, over real sockets: answers, error kinds, retries, deadlines."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.plugin.providers import Completion, Deadline, Incomplete, ProviderError
from llm_worker.plugins.ollama import LoadOptionsRefused, OllamaError, OllamaProvider
from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest, Message, Options
from llm_worker.settings import config

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


def call(
    provider: OllamaProvider,
    endpoint: str,
    *,
    chunks: list[str] | None = None,
    model: str = CHAT,
    text: str = PROMPT,
    deadline: float = 30.0,
    **fields: Any,
) -> Completion:
    """Run a chat or generate call; it streams the answer's text pieces into ``chunks`` when a list is given."""

    def on_text(text: str, thinking: str | None = None) -> None:
        if thinking is None:
            chunks.append(text)  # type: ignore[union-attr]

    on_chunk = on_text if chunks is not None else None
    if endpoint == "chat":
        chat = msgspec.convert({"messages": [{"role": "user", "content": text}], **fields}, ChatRequest)
        return provider.chat(model, chat, Deadline(deadline), on_chunk)
    generate = msgspec.convert({"prompt": text, **fields}, GenerateRequest)
    return provider.generate(model, generate, Deadline(deadline), on_chunk)


def error_of(run: Callable[[], object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        run()
    return caught.value


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
    done = call(
        ollama, "generate", chunks=chunks, text="Once upon a time", system="be brief", options={"num_predict": 6}
    )
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


def test_health_of_a_closed_port_is_not_ok_and_says_why_without_raising(
    provider_for: ProviderFactory, closed_url: str
) -> None:
    health = provider_for(closed_url).health(10)
    assert not health.ok and health.message == "Ollama is not reachable"
    assert health.url == closed_url and health.version is None
    details = health.error_details or ""
    assert "GET /api/version" in details and "refused" in details.lower()


def test_health_of_a_server_that_never_answers_is_not_ok_within_its_timeout(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(kind="hang", endpoints=("version",))])
    started = time.monotonic()
    health = ollama.health(0.5)
    assert not health.ok and "no answer" in (health.error_details or "")
    assert time.monotonic() - started < 10


# ---- error kinds for what Ollama really answers -----------------------------------------


@pytest.mark.parametrize(
    "style, wording",
    [("old", 'model "missing-model" not found, try pulling it first'), ("new", "model 'missing-model' not found")],
    ids=["old", "new"],
)
def test_a_missing_model_is_a_model_error_in_both_wordings_and_is_not_retried(
    provider_for: ProviderFactory, style: str, wording: str
) -> None:
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


def test_a_bad_request_is_a_validation_error_and_is_not_retried(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=400, message="invalid request")])
    error = error_of(lambda: call(ollama, "chat"))
    assert (error.kind, error.status, error.retryable) == (ErrorKind.VALIDATION, 400, False)
    assert error.message == "POST /api/chat: invalid request"
    assert requests_to(sim, "chat") == 1


def test_a_job_option_the_server_refuses_is_a_validation_error_and_is_not_retried(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    # Built directly, past the job validation that would refuse the options first: the server
    # refuses them (Ollama: 500 'option "temperature" must be of type float32').
    request = ChatRequest(messages=[Message(role="user", content=PROMPT)], options=Options(temperature="hot"))  # type: ignore[arg-type]
    error = error_of(lambda: ollama.chat(CHAT, request, Deadline(30), None))
    assert error.kind is ErrorKind.VALIDATION and not error.retryable and not isinstance(error, LoadOptionsRefused)
    assert requests_to(sim, "chat") == 1


def test_a_400_saying_the_model_does_not_support_the_task_is_a_model_error(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(status=400, message='"nomic-embed-text" does not support chat')])
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", model=EMBED)
    assert caught.value.kind is ErrorKind.MODEL and caught.value.status == 400
    assert "does not support chat" in caught.value.message


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_busy_is_retried_max_retries_times_then_is_a_provider_error(
    provider_for: ProviderFactory, sim: Simulator, streaming: bool
) -> None:
    ollama = provider_for(sim.url, OLLAMA_MAX_RETRIES="2")
    sim.set_faults([Fault(status=503, message=BUSY)])
    chunks: list[str] | None = [] if streaming else None
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks)
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.status == 503
    assert caught.value.message == f"POST /api/chat: {BUSY}"
    assert requests_to(sim, "chat") == 3  # the first try and OLLAMA_MAX_RETRIES more
    assert not chunks


def test_busy_that_clears_after_one_retry_succeeds(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=503, message=BUSY, count=1)])
    assert call(ollama, "chat").text == REPLY
    assert requests_to(sim, "chat") == 2
    assert sim.stats().responses == {503: 1, 200: 1}


def test_any_other_500_is_a_provider_error_not_retried_within_the_call(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(status=500, message="something broke")])
    with pytest.raises(ProviderError) as caught:
        call(ollama, "generate")
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.status == 500
    assert caught.value.message == "POST /api/generate: something broke"
    assert requests_to(sim, "generate") == 1


def test_a_crash_line_mid_stream_raises_a_crashed_runner_after_the_chunks_already_delivered(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    # Ollama writes this line when llama-server's stream broke off (unexpected EOF) and closes the runner.
    sim.set_faults(
        [
            Fault(
                kind="stream_error",
                after_chunks=3,
                message="an error was encountered while running the model: unexpected EOF",
            )
        ]
    )
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=chunks)
    assert chunks == ["Why", " is", " the"]
    assert caught.value.kind is ErrorKind.MEMORY and caught.value.crashed and caught.value.status is None
    assert caught.value.message == "POST /api/chat: an error was encountered while running the model: unexpected EOF"
    assert requests_to(sim, "chat") == 1


def test_an_error_line_mid_stream_that_no_row_names_is_a_provider_error(ollama: OllamaProvider, sim: Simulator) -> None:
    sim.set_faults([Fault(kind="stream_error", after_chunks=2, message="error reading llama-server response: x")])
    chunks: list[str] = []
    with pytest.raises(ProviderError) as caught:
        call(ollama, "generate", chunks=chunks)
    assert chunks == ["Why", " is"]
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.retryable and not caught.value.crashed


def test_an_out_of_memory_mid_stream_is_a_crashed_runner(ollama: OllamaProvider, sim: Simulator) -> None:
    # Mid-answer, Ollama reports the runner's last error line once llama-server's stream broke off.
    sim.set_faults(
        [
            Fault(
                kind="stream_error",
                after_chunks=1,
                message="an error was encountered while running the model: CUDA error: out of memory",
            )
        ]
    )
    chunks: list[str] = []
    error = error_of(lambda: call(ollama, "generate", chunks=chunks))
    assert chunks == ["Why"] and error.kind is ErrorKind.MEMORY and error.crashed


def test_a_stream_cut_before_its_final_line_is_incomplete_with_the_text_so_far(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(kind="cut", after_chunks=2)])
    chunks: list[str] = []
    with pytest.raises(Incomplete) as caught:
        call(ollama, "chat", chunks=chunks)
    assert chunks == ["Why", " is"]
    assert caught.value.kind is ErrorKind.PROVIDER and caught.value.counted is False and caught.value.retryable
    message = caught.value.message
    assert message.startswith("POST /api/chat: ") and ("stream cut" in message or "stream ended before done" in message)
    partial = caught.value.partial
    assert partial.text == "Why is" and partial.done_reason is None and partial.model == CHAT
    assert partial.message == {"role": "assistant", "content": "Why is"}
    assert requests_to(sim, "chat") == 1


def test_a_whole_answer_cut_after_the_server_took_the_request_is_not_run_again_and_again(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    # The simulator runs the model, then closes the connection with no answer:
    # the server saw the request, so a retry runs the model again.
    sim.set_faults([Fault(kind="cut")])
    with pytest.raises(ProviderError):
        call(ollama, "chat")
    # One retry can be defended (a kept-alive connection that died), not three.
    assert requests_to(sim, "chat") <= 2


def test_a_refused_connection_is_a_network_error_after_the_retries(
    provider_for: ProviderFactory, closed_url: str
) -> None:
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
def test_a_server_that_never_answers_times_out_at_the_deadline(
    ollama: OllamaProvider, sim: Simulator, streaming: bool
) -> None:
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", chunks=[] if streaming else None, deadline=0.5)
    elapsed = time.monotonic() - started
    assert caught.value.kind is ErrorKind.TIMEOUT and "no answer within" in caught.value.message
    assert 0.4 <= elapsed < 10
    assert requests_to(sim, "chat") == 1


def test_ollama_timeout_bounds_the_wait_for_an_answer_within_a_longer_deadline(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(sim.url, OLLAMA_TIMEOUT="300")
    sim.set_faults([Fault(kind="hang")])
    started = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        call(ollama, "chat", deadline=60)
    assert caught.value.kind is ErrorKind.TIMEOUT and "no answer within 0.3s" in caught.value.message
    assert time.monotonic() - started < 30


def test_a_stream_still_running_at_the_deadline_times_out_and_the_next_call_is_unharmed(
    ollama: OllamaProvider, sim: Simulator
) -> None:
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
def test_a_deadline_already_spent_times_out_without_sending_anything(
    ollama: OllamaProvider, sim: Simulator, endpoint: str
) -> None:
    with pytest.raises(ProviderError) as caught:
        if endpoint == "embed":
            ollama.embed(EMBED, ["x"], Deadline(0))
        else:
            call(ollama, endpoint, deadline=0)
    assert caught.value.kind is ErrorKind.TIMEOUT and "job timeout reached" in caught.value.message
    assert sim.stats().requests == {}


# ---- Ollama's own texts through the simulator's faults: what the table makes of each ------------------------


@pytest.mark.parametrize(
    "message",
    [
        "llama runner process has terminated: signal: killed",  # to v0.24
        "llama-server process has terminated: exit status 2",  # v0.30+
        "llama-server process has terminated: exit status 1: CUDA error: an illegal memory access was encountered",
        "llama-server process no longer running: exit status 2 ",
        "llama runner process no longer running: -1 ",
        (
            "model runner has unexpectedly stopped, this may be due to resource limitations or an internal "
            "error, check "
            "ollama server logs for details"
        ),
        "llama-server reported out-of-memory during startup: cudaMalloc failed: out of memory",
    ],
    ids=[
        "old-terminated",
        "terminated",
        "terminated-cuda",
        "no-longer-running",
        "old-no-longer-running",
        "stopped",
        "startup-oom",
    ],
)
def test_a_crashed_runner_is_a_memory_error_marked_crashed_and_retried_by_the_job(
    ollama: OllamaProvider, sim: Simulator, message: str
) -> None:
    sim.set_faults([Fault(status=500, message=message)])
    error = error_of(lambda: call(ollama, "chat"))
    assert (error.kind, error.crashed, error.retryable, error.counted) == (ErrorKind.MEMORY, True, True, None)
    assert error.message == f"POST /api/chat: {message}" and error.status == 500
    assert requests_to(sim, "chat") == 1  # the memory strategy retries, after unloading; not the HTTP client


@pytest.mark.parametrize(
    "message",
    [
        "model requires more system memory (12.3 GiB) than is available (4.0 GiB)",
        "unable to load full model on GPU",
        "failed to allocate compute buffer\ncudaMalloc failed: out of memory",
        "vk::Device::allocateMemory: ErrorOutOfMemory",
    ],
    ids=["requires-more", "full-gpu", "cuda", "vulkan"],
)
def test_out_of_memory_that_killed_nothing_is_a_memory_error_not_a_crash(
    ollama: OllamaProvider, sim: Simulator, message: str
) -> None:
    sim.set_faults([Fault(status=500, message=message)])
    error = error_of(lambda: call(ollama, "generate"))
    assert (error.kind, error.crashed, error.retryable) == (ErrorKind.MEMORY, False, True)


@pytest.mark.parametrize(
    "message, kind, crashed",
    [
        ('do embedding request: Post "http://127.0.0.1:41999/v1/embeddings": EOF', ErrorKind.MEMORY, True),
        ("llama-server process no longer running: exit status 2 ", ErrorKind.MEMORY, True),
        ("failed to allocate compute buffer: out of memory", ErrorKind.MEMORY, False),
        (
            "tokenize error: read tcp 127.0.0.1:50000->127.0.0.1:41999: read: connection reset by peer",
            ErrorKind.PROVIDER,
            False,
        ),
    ],
    ids=["do-embedding-request", "no-longer-running", "oom", "unnamed-runtime"],
)
def test_a_400_of_api_embed_carrying_a_runtime_sign_is_transient_not_a_bad_request(
    ollama: OllamaProvider, sim: Simulator, message: str, kind: ErrorKind, crashed: bool
) -> None:
    # Ollama's EmbedHandler answers 400 for any error of the embedding call itself.
    sim.set_faults([Fault(status=400, message=message, endpoints=("embed",))])
    error = error_of(lambda: ollama.embed(EMBED, ["x"], Deadline(30)))
    assert (error.kind, error.crashed, error.retryable, error.status) == (kind, crashed, True, 400)
    assert requests_to(sim, "embed") == 1


@pytest.mark.parametrize(
    "message",
    [
        "the input length exceeds the context length",
        "input exceeds maximum context length and cannot be truncated further",
        "invalid input type",
    ],
)
def test_a_real_bad_request_of_api_embed_stays_a_validation_error(
    ollama: OllamaProvider, sim: Simulator, message: str
) -> None:
    sim.set_faults([Fault(status=400, message=message, endpoints=("embed",))])
    error = error_of(lambda: ollama.embed(EMBED, ["x"], Deadline(30)))
    assert (error.kind, error.retryable, error.crashed) == (ErrorKind.VALIDATION, False, False)


def test_the_same_unnamed_400_is_a_validation_error_on_chat_but_transient_on_embed(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(status=400, message="something odd")])
    assert error_of(lambda: call(ollama, "chat")).kind is ErrorKind.VALIDATION
    embed_error = error_of(lambda: ollama.embed(EMBED, ["x"], Deadline(30)))
    assert embed_error.kind is ErrorKind.PROVIDER and embed_error.retryable


@pytest.mark.parametrize(
    "message",
    [
        "llama3.2 does not support tools",
        '"llama3.2" does not support thinking',
        '"llama3.2" does not support generate',
        "registry.ollama.ai/library/llama3.2:latest does not support insert",
        (
            "this model may be incompatible with your version of Ollama. If you previously pulled this model, "
            "try updating "
            "it by running `ollama pull llama3.2`"
        ),
        (
            "'llama3.2-vision' is no longer compatible with your version of Ollama and has been replaced by a "
            "newer version. "
            "To re-download, run 'ollama pull llama3.2-vision'"
        ),
        'template: :1:12: executing "" at <.Messages>: range can\'t iterate over x',
        "llama-server template error: map[message:Unknown method: startswith]",
    ],
    ids=[
        "tools",
        "thinking",
        "generate",
        "insert",
        "incompatible",
        "no-longer-compatible",
        "template",
        "server-template",
    ],
)
def test_a_permanent_model_error_goes_to_the_model_fallback_without_retries(
    provider_for: ProviderFactory, sim: Simulator, message: str
) -> None:
    ollama = provider_for(sim.url, OLLAMA_MAX_RETRIES="3")
    sim.set_faults([Fault(status=500 if "template" in message or "compatible" in message else 400, message=message)])
    error = error_of(lambda: call(ollama, "generate", chunks=[]))
    assert (error.kind, error.retryable, error.counted, error.crashed) == (ErrorKind.MODEL, False, None, False)
    assert error.message == f"POST /api/generate: {message}"
    assert requests_to(sim, "generate") == 1


@pytest.mark.parametrize("style", ["old", "new"])
def test_a_missing_model_is_found_missing_by_its_message_on_every_endpoint(
    provider_for: ProviderFactory, style: str
) -> None:
    with Simulator(SimulatorConfig(port=0, not_found_style=style)) as sim:  # type: ignore[arg-type]
        ollama = provider_for(sim.url)
        for run in (
            lambda: ollama.show("missing-model", Deadline(30)),
            lambda: ollama.load("missing-model", Deadline(30)),
        ):
            error = error_of(run)
            assert error.kind is ErrorKind.MODEL and isinstance(error, OllamaError) and error.rule == "model.not_found"


def test_an_option_of_the_wrong_type_in_the_settings_is_refused_naming_the_setting(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(
        sim.url,
        OLLAMA_MAX_RETRIES="3",
        MODEL_LOAD_OPTIONS="num_ctx=2048",
        EMBEDDING_LOAD_OPTIONS="num_ctx=512,num_batch=512",
    )
    sim.set_faults(
        [
            Fault(
                status=500,
                message='option "use_mmap" must be of type boolean',
                endpoints=("chat", "generate", "embed", "load"),
            )
        ]
    )
    for run, setting in [
        (lambda: call(ollama, "chat"), "MODEL_LOAD_OPTIONS"),
        (lambda: ollama.load(CHAT, Deadline(30)), "MODEL_LOAD_OPTIONS"),
        (lambda: ollama.embed(EMBED, ["x"], Deadline(30)), "EMBEDDING_LOAD_OPTIONS"),
        (lambda: ollama.load(EMBED, Deadline(30)), "EMBEDDING_LOAD_OPTIONS"),
    ]:
        with pytest.raises(LoadOptionsRefused) as caught:
            run()
        error = caught.value
        assert (error.setting, error.option, error.kind) == (setting, "use_mmap", ErrorKind.VALIDATION)
        assert not error.retryable and error.counted is False
        assert error.message.endswith(
            f"(set use_mmap in {setting} as Ollama's api.Runner types it (use_mmap true/false; the others integers))"
        )
    assert sim.stats().requests["chat"] == 1 and sim.stats().requests["generate"] == 1  # no retries


def test_a_jobs_own_option_of_the_wrong_type_is_the_jobs_error_not_the_settings(
    ollama: OllamaProvider, sim: Simulator
) -> None:
    sim.set_faults([Fault(status=500, message='option "temperature" must be of type float32')])
    error = error_of(lambda: call(ollama, "chat"))
    assert not isinstance(error, LoadOptionsRefused)
    assert (error.kind, error.retryable, error.counted) == (ErrorKind.VALIDATION, False, False)


def test_a_base_url_with_a_path_is_a_configuration_error_that_pauses_the_host(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(sim.url + "/v1")  # Ollama's OpenAI API, not its own: gin answers "404 page not found"
    health = ollama.health(10)
    assert not health.ok and "OLLAMA_BASE_URL must be Ollama's own address with no path" in health.message
    error = error_of(lambda: call(ollama, "chat"))
    assert error.unreachable and error.counted is False and error.kind is ErrorKind.NETWORK


# ---- answers a stand-in server gives word for word: 403, thinking, no done line ----------------------------


class Canned:
    """A stand-in for Ollama over real HTTP: each path answers what the test set, and every request body is kept.

    An answer is (status, body): bytes are sent whole (Content-Length), a list
    of bytes as a chunked stream, one chunk a line, then its end.
    """

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes | list[bytes]]] = {}
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                canned.bodies.append((self.path, json.loads(data) if data else {}))
                status, body = canned.answers.get(self.path, (404, b"404 page not found"))
                self.send_response(status)
                if isinstance(body, list):
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for piece in body:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(body)))
                    if body:
                        self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, path: str, status: int, body: bytes | list[dict[str, Any]] | dict[str, Any]) -> None:
        if isinstance(body, list):
            self.answers[path] = (status, [json.dumps(obj).encode() + b"\n" for obj in body])
        else:
            self.answers[path] = (status, json.dumps(body).encode() if isinstance(body, dict) else body)

    def sent(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.bodies if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned() -> Iterator[Canned]:
    server = Canned()
    yield server
    server.close()


def test_a_403_with_no_body_is_the_hosts_configuration_it_pauses_the_host_and_health_says_what_to_set(
    canned: Canned, provider_for: ProviderFactory
) -> None:
    # Ollama's allowedHostsMiddleware: AbortWithStatus(403), nothing else, on every route.
    for path in ("/api/version", "/api/chat", "/api/embed"):
        canned.set(path, 403, b"")
    ollama = provider_for(canned.url)
    health = ollama.health(10)
    assert not health.ok and health.version is None
    for words in (
        "403",
        "OLLAMA_BASE_URL",
        "http://127.0.0.1:<port>",
        "http://localhost:<port>",
        "OLLAMA_HOST=0.0.0.0",
        "OLLAMA_ORIGINS",
        "'127.0.0.1'",
    ):
        assert words in health.message, words
    assert (health.error_details or "").startswith("GET /api/version: HTTP 403 (Ollama refused the request")
    for run in (lambda: call(ollama, "chat"), lambda: ollama.embed(EMBED, ["x"], Deadline(30))):
        error = error_of(run)
        assert error.unreachable and error.status == 403 and error.counted is False
        assert error.kind is ErrorKind.NETWORK and error.retryable
        assert "set OLLAMA_BASE_URL to http://127.0.0.1:<port>" in error.message
    assert len(canned.sent("/api/chat")) == 1  # a 403 is not retried within the call


THINKING_CHAT = [
    {"model": CHAT, "message": {"role": "assistant", "content": "", "thinking": "Rayleigh"}, "done": False},
    {"model": CHAT, "message": {"role": "assistant", "content": "", "thinking": " scattering."}, "done": False},
    {"model": CHAT, "message": {"role": "assistant", "content": "Blue", "thinking": ""}, "done": False},
    {"model": CHAT, "message": {"role": "assistant", "content": " light."}, "done": False},
    {
        "model": CHAT,
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 5,
        "eval_count": 7,
    },
]


def test_a_streamed_chat_streams_its_reasoning_apart_and_keeps_it(
    canned: Canned, provider_for: ProviderFactory
) -> None:
    canned.set("/api/chat", 200, THINKING_CHAT)
    pieces: list[tuple[str, str | None]] = []
    done = provider_for(canned.url).chat(
        CHAT,
        msgspec.convert({"messages": [{"role": "user", "content": PROMPT}], "think": "high"}, ChatRequest),
        Deadline(30),
        lambda text, thinking=None: pieces.append((text, thinking)),
    )
    assert pieces == [("", "Rayleigh"), ("", " scattering."), ("Blue", None), (" light.", None)]
    assert done.text == "Blue light." and done.thinking == "Rayleigh scattering."
    assert done.message == {"role": "assistant", "content": "Blue light.", "thinking": "Rayleigh scattering."}
    assert (done.done_reason, done.prompt_tokens, done.completion_tokens) == ("stop", 5, 7)
    assert canned.sent("/api/chat")[0]["think"] == "high"  # a level, as the job gave it


@pytest.mark.parametrize("think", [True, False, "low", "max"])
def test_think_is_sent_as_the_job_gives_it_and_a_whole_generate_keeps_its_thinking(
    canned: Canned, provider_for: ProviderFactory, think: bool | str
) -> None:
    canned.set(
        "/api/generate",
        200,
        {"model": CHAT, "response": "Blue.", "thinking": "Because Rayleigh.", "done": True, "done_reason": "stop"},
    )
    done = call(provider_for(canned.url), "generate", think=think)
    assert done.text == "Blue." and done.thinking == "Because Rayleigh." and done.message is None
    assert canned.sent("/api/generate")[0]["think"] == think


def test_a_streamed_generate_streams_its_reasoning_apart(canned: Canned, provider_for: ProviderFactory) -> None:
    canned.set(
        "/api/generate",
        200,
        [
            {"model": CHAT, "response": "", "thinking": "Hm.", "done": False},
            {"model": CHAT, "response": "Blue.", "done": False},
            {"model": CHAT, "response": "", "done": True, "done_reason": "stop"},
        ],
    )
    pieces: list[tuple[str, str | None]] = []
    request = msgspec.convert({"prompt": PROMPT, "think": True}, GenerateRequest)
    done = provider_for(canned.url).generate(
        CHAT, request, Deadline(30), lambda text, thinking=None: pieces.append((text, thinking))
    )
    assert pieces == [("", "Hm."), ("Blue.", None)]
    assert (done.text, done.thinking) == ("Blue.", "Hm.")


def test_a_stream_that_ends_with_no_done_line_is_incomplete_with_its_text_and_reasoning(
    canned: Canned, provider_for: ProviderFactory
) -> None:
    # Ollama closes the stream without a done line when llama-server stops with no stop event.
    canned.set("/api/chat", 200, THINKING_CHAT[:3])
    chunks: list[str] = []
    with pytest.raises(Incomplete) as caught:
        call(provider_for(canned.url), "chat", chunks=chunks)
    assert caught.value.message == "POST /api/chat: stream ended before done"
    partial = caught.value.partial
    assert (partial.text, partial.thinking, partial.done_reason) == ("Blue", "Rayleigh scattering.", None)
    assert partial.message == {"role": "assistant", "content": "Blue", "thinking": "Rayleigh scattering."}
    assert caught.value.counted is False and caught.value.retryable


def test_an_empty_200_stream_is_incomplete_too(canned: Canned, provider_for: ProviderFactory) -> None:
    canned.set("/api/generate", 200, [])
    with pytest.raises(Incomplete) as caught:
        call(provider_for(canned.url), "generate", chunks=[])
    assert caught.value.partial.text == "" and caught.value.partial.message is None


@pytest.mark.parametrize("endpoint", ["chat", "generate"])
def test_a_whole_answer_with_done_false_is_incomplete_with_its_text_reasoning_and_counts(
    canned: Canned, provider_for: ProviderFactory, endpoint: str
) -> None:
    # writeChatResponse / GenerateHandler send the last line with the text joined: done false if it never ended.
    if endpoint == "chat":
        answer = {
            "model": CHAT,
            "message": {"role": "assistant", "content": "Blue li", "thinking": "Hm."},
            "done": False,
            "eval_count": 3,
        }
    else:
        answer = {"model": CHAT, "response": "Blue li", "thinking": "Hm.", "done": False, "eval_count": 3}
    canned.set(f"/api/{endpoint}", 200, answer)
    with pytest.raises(Incomplete) as caught:
        call(provider_for(canned.url), endpoint)
    assert caught.value.message == f"POST /api/{endpoint}: the answer came with done: false"
    partial = caught.value.partial
    assert (partial.text, partial.thinking, partial.completion_tokens) == ("Blue li", "Hm.", 3)
    assert partial.done_reason is None


def test_job_options_ollama_no_longer_has_are_dropped_and_load_options_are_the_hosts(
    canned: Canned, provider_for: ProviderFactory
) -> None:
    canned.set("/api/chat", 200, THINKING_CHAT[-1])
    ollama = provider_for(canned.url, MODEL_LOAD_OPTIONS="num_ctx=8192,use_mmap=false")
    call(
        ollama,
        "chat",
        options={
            "temperature": 0.5,
            "mirostat": 2,
            "mirostat_tau": 5.0,
            "mirostat_eta": 0.1,
            "num_ctx": 99,
            "stop": ["x"],
            "tfs_z": 1.0,
            "penalize_newline": True,
        },
    )
    assert canned.sent("/api/chat")[0]["options"] == {
        "temperature": 0.5,
        "stop": ["x"],
        "num_ctx": 8192,
        "use_mmap": False,
    }


# ---- load options per model kind -------------------------------------------------------------------------


def loaded_context(sim: Simulator) -> dict[str, int]:
    with urllib.request.urlopen(sim.url + "/api/ps") as answer:
        return {m["name"]: m["context_length"] for m in json.load(answer)["models"]}


SPLIT_OPTIONS = {"MODEL_LOAD_OPTIONS": "num_ctx=8192", "EMBEDDING_LOAD_OPTIONS": "num_ctx=2048,num_batch=2048"}


def test_jobs_to_an_embedding_model_carry_the_embedding_load_options_and_the_others_model_load_options(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(sim.url, **SPLIT_OPTIONS)
    for _ in range(2):
        call(ollama, "chat")
        ollama.embed(EMBED, ["x"], Deadline(30))
    assert loaded_context(sim) == {"llama3.2:latest": 8192, "nomic-embed-text:latest": 2048}
    assert sim.stats().loads == {"llama3.2:latest": 1, "nomic-embed-text:latest": 1}
    assert requests_to(sim, "show") == 2  # once per model, then remembered


def test_the_model_managers_load_uses_the_options_of_the_models_kind(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(sim.url, **SPLIT_OPTIONS)
    ollama.load(CHAT, Deadline(30))
    ollama.load(EMBED, Deadline(30))
    assert loaded_context(sim) == {"llama3.2:latest": 8192, "nomic-embed-text:latest": 2048}
    call(ollama, "chat")
    ollama.embed(EMBED, ["x"], Deadline(30))
    assert sim.stats().loads == {"llama3.2:latest": 1, "nomic-embed-text:latest": 1}  # the jobs matched the loads
    assert requests_to(sim, "show") == 2


def test_a_failed_api_show_does_not_fail_the_job_and_is_asked_again_next_time(
    provider_for: ProviderFactory, sim: Simulator
) -> None:
    ollama = provider_for(sim.url, **SPLIT_OPTIONS)
    sim.set_faults([Fault(status=500, message="boom", endpoints=("show",), count=2)])
    assert call(ollama, "chat").text == REPLY  # guessed from the endpoint: a chat model
    assert len(ollama.embed(EMBED, ["x"], Deadline(30)).vectors) == 1  # and an embedding model
    assert loaded_context(sim) == {"llama3.2:latest": 8192, "nomic-embed-text:latest": 2048}
    call(ollama, "chat")
    assert requests_to(sim, "show") == 3  # the guesses were not remembered


def test_with_the_same_options_for_both_kinds_no_api_show_is_asked(ollama: OllamaProvider, sim: Simulator) -> None:
    call(ollama, "chat")
    ollama.embed(EMBED, ["x"], Deadline(30))
    assert requests_to(sim, "show") == 0
