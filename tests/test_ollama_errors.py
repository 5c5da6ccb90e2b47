"""The table of Ollama's error answers: its order, its rows against Ollama's own texts, old and new."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from llm_worker.host.breaker import counts
from llm_worker.plugins.ollama import OLLAMA_OPTIONS
from llm_worker.plugins.ollama_errors import (
    EMBED,
    OUT_OF_MEMORY,
    TABLE,
    LoadOptionsRefused,
    OllamaError,
    classify,
    error_for,
    lookup,
)
from llm_worker.protocol.jobs import ErrorKind, Options

M, V, P, T, N = ErrorKind.MEMORY, ErrorKind.VALIDATION, ErrorKind.PROVIDER, ErrorKind.TIMEOUT, ErrorKind.NETWORK
MODEL = ErrorKind.MODEL
OLLAMA_SRC = Path(os.environ.get("OLLAMA_SRC", "/tmp/ollama-src"))


# ---- the table's shape --------------------------------------------------------------------------------


def test_every_row_has_a_unique_name_and_cites_where_ollama_says_it() -> None:
    assert len({row.name for row in TABLE}) == len(TABLE)
    for row in TABLE:
        assert re.search(r"\w+/\w+\.go|not Ollama's", row.source), row.name


def test_messages_are_matched_before_statuses_and_the_last_row_matches_anything() -> None:
    signs = [row.sign is not None for row in TABLE]
    assert signs == sorted(signs, reverse=True), "a row with a message sign comes after a status-only row"
    last = TABLE[-1]
    assert last.sign is None and not last.status and last.endpoint is None


def test_rows_that_pause_the_host_are_not_counted_and_say_what_to_set() -> None:
    for row in TABLE:
        if row.unreachable:
            assert row.counted is False and row.advice and "OLLAMA_BASE_URL" in row.advice, row.name


# ---- Ollama's texts, each with the version that says it ---------------------------------------------------

# (status, text, endpoint) -> (rule, kind, crashed, retryable)
CASES = [
    # a crashed runner: memory, crashed, retried once the memory strategy has unloaded idle models
    # to v0.24.x
    (500, "llama runner process has terminated: exit status 0xc0000409", None, "crash.terminated", M, True, True),
    (500, "llama runner process has terminated: signal: killed", None, "crash.terminated", M, True, True),
    (500, "llama-server process has terminated: exit status 2", None, "crash.terminated", M, True, True),  # 0.30+
    (
        500,
        "llama-server process has terminated: exit status 1: error loading model: unable to allocate CUDA0 buffer",
        None,
        "crash.terminated",
        M,
        True,
        True,
    ),
    (500, "llama-server process no longer running: exit status 2 ", None, "crash.gone", M, True, True),
    (500, "llama runner process no longer running: -1 ", None, "crash.gone", M, True, True),
    (
        500,
        "llama-server reported out-of-memory during startup: cudaMalloc failed: out of memory",
        None,
        "crash.startup_oom",
        M,
        True,
        True,
    ),
    (
        500,
        (
            "model runner has unexpectedly stopped, this may be due to resource limitations or an internal "
            "error, check "
            "ollama server logs for details"
        ),
        None,
        "crash.stopped",
        M,
        True,
        True,
    ),
    # to v0.9.0
    (500, 'POST predict: Post "http://127.0.0.1:35677/completion": EOF', None, "crash.stopped", M, True, True),
    (
        500,
        'llama-server apply-template error: Post "http://127.0.0.1:1/apply-template": EOF',
        None,
        "crash.stopped",
        M,
        True,
        True,
    ),
    (
        None,
        "an error was encountered while running the model: unexpected EOF",
        "/api/chat",
        "crash.mid_answer",
        M,
        True,
        True,
    ),
    (
        None,
        "an error was encountered while running the model: CUDA error: out of memory",
        "/api/generate",
        "crash.mid_answer",
        M,
        True,
        True,
    ),
    (
        400,
        'do embedding request: Post "http://127.0.0.1:41999/v1/embeddings": EOF',
        EMBED,
        "crash.embedding",
        M,
        True,
        True,
    ),
    (400, "llama-server process no longer running: exit status 2 ", EMBED, "crash.gone", M, True, True),
    (500, "CUDA error: an illegal memory access was encountered", None, "crash.runner_log", M, True, True),
    # out of memory, nothing died
    (
        500,
        "model requires more system memory (12.3 GiB) than is available (4.0 GiB)",
        None,
        "memory.requires",
        M,
        False,
        True,
    ),
    (500, "unable to load full model on GPU", None, "memory.full_gpu", M, False, True),
    (500, "failed to allocate compute buffer", None, "memory.out_of_memory", M, False, True),
    (400, "cudaMalloc failed: out of memory", EMBED, "memory.out_of_memory", M, False, True),
    (500, "unable to allocate CUDA0 buffer", None, "memory.llama_cpp", M, False, True),
    # permanent model errors: the model fallback, no retries
    (404, "model 'llama3.2' not found", "/api/chat", "model.not_found", MODEL, False, False),
    (404, 'model "llama3.2" not found, try pulling it first', "/api/chat", "model.not_found", MODEL, False, False),
    (400, '"nomic-embed-text" does not support chat', "/api/chat", "model.capability", MODEL, False, False),
    (400, '"nomic-embed-text" does not support generate', "/api/generate", "model.capability", MODEL, False, False),
    (400, '"llama3.2" does not support thinking', "/api/chat", "model.capability", MODEL, False, False),
    (400, "llama3.2 does not support tools", "/api/chat", "model.capability", MODEL, False, False),
    (400, "registry.ollama.ai/library/x:latest does not support insert", None, "model.capability", MODEL, False, False),
    (
        400,
        "x does not support thinking. Pull the model again to get the latest version with full thinking support",
        None,
        "model.capability",
        MODEL,
        False,
        False,
    ),
    (501, "this model does not support embeddings", EMBED, "model.capability", MODEL, False, False),  # 0.24 runner
    (400, "Model Does Not Support Tools", None, "model.capability", MODEL, False, False),
    (
        500,
        (
            "error loading model: failed to load model: this model may be incompatible with your version of Ollama. "
            "If you previously pulled this model, try updating it by running `ollama pull x`"
        ),
        None,
        "model.incompatible",
        MODEL,
        False,
        False,
    ),
    (
        500,
        (
            "'llama3.2-vision' is no longer compatible with your version of Ollama and has been replaced by a newer "
            "version. To re-download, run 'ollama pull llama3.2-vision'"
        ),
        None,
        "model.incompatible",
        MODEL,
        False,
        False,
    ),
    (
        500,
        'template: :1:12: executing "" at <.Messages>: range can\'t iterate over 1',
        None,
        "model.template",
        MODEL,
        False,
        False,
    ),
    (
        500,
        "llama-server template error: map[message:Unknown method: startswith]",
        None,
        "model.template",
        MODEL,
        False,
        False,
    ),
    (
        None,
        "an error was encountered while running the model: Deepseek2 does not support K-shift",
        "/api/chat",
        "model.kshift",
        MODEL,
        False,
        False,
    ),
    (400, "embedding contains NaN or Inf values", EMBED, "model.nan", MODEL, False, False),
    (403, "ollama cloud is disabled: remote model is unavailable", "/api/chat", "model.cloud", MODEL, False, False),
    (400, "this server cannot run this remote model", "/api/chat", "model.cloud", MODEL, False, False),
    (
        400,
        "image generation models are not currently supported",
        "/api/generate",
        "model.image_generation",
        MODEL,
        False,
        False,
    ),
    # a request that cannot succeed as sent
    (400, "the input length exceeds the context length", EMBED, "request.context_length", V, False, False),
    (400, "input after truncation exceeds maximum context length", EMBED, "request.context_length", V, False, False),
    (
        400,
        "input exceeds maximum context length and cannot be truncated further",
        EMBED,
        "request.context_length",
        V,
        False,
        False,
    ),
    (400, "input length exceeds maximum context length", EMBED, "request.context_length", V, False, False),  # <=0.11
    (
        400,
        (
            "the prompt is longer than the context length currently available to the model; shorten the prompt, "
            "adjust the context length in settings, or use a model with a longer context length"
        ),
        "/api/chat",
        "request.context_length",
        V,
        False,
        False,
    ),
    (400, "invalid input type", EMBED, "request.body", V, False, False),
    (400, "missing request body", EMBED, "request.body", V, False, False),
    (
        400,
        "json: cannot unmarshal string into Go struct field EmbedRequest.truncate of type bool",
        EMBED,
        "request.body",
        V,
        False,
        False,
    ),
    (400, "raw mode does not support template, system, or context", "/api/generate", "request.body", V, False, False),
    (400, "top_logprobs must be between 0 and 20", "/api/chat", "request.body", V, False, False),
    (500, 'option "use_mmap" must be of type boolean', "/api/chat", "options.type", V, False, False),
    # transient
    (503, "server busy, please try again.  maximum pending requests exceeded", None, "busy.queue", P, False, True),
    (500, "no slots available after 10 retries", None, "busy.slots", P, False, True),
    (500, "unexpected server status: llm server loading model", None, "runner.not_ready", P, False, True),
    (500, 'llama-server error: {"status":"error"}', None, "runner.not_ready", P, False, True),
    (500, "timed out waiting for llama-server to start - ", None, "load.timeout", T, False, True),
    (500, "timed out waiting for llama runner to start - progress 0.00 - ", None, "load.timeout", T, False, True),
    (400, "tokenize error: read: connection reset by peer", EMBED, "embed.runtime", P, False, True),
    (500, "error reading llama-server response: read tcp: i/o timeout", "/api/chat", "server", P, False, True),
    (None, "something new", "/api/chat", "server", P, False, True),
    (502, "bad gateway", None, "server", P, False, True),
    (499, "request canceled", None, "server", P, False, True),
    (408, "request timeout", None, "timeout.proxy", T, False, True),
    # the host's configuration
    (403, "", "/api/chat", "config.host", N, False, True),
    (403, "", "/api/version", "config.host", N, False, True),
    (404, "404 page not found", "/api/chat", "config.route", N, False, True),
    # by status alone
    (400, "invalid request", "/api/chat", "request.invalid", V, False, False),
    (404, "not here", "/api/chat", "model.missing", MODEL, False, False),
]


@pytest.mark.parametrize("status, text, endpoint, rule, kind, crashed, retryable", CASES)
def test_each_answer_of_ollamas_gets_its_row(
    status: int | None, text: str, endpoint: str | None, rule: str, kind: ErrorKind, crashed: bool, retryable: bool
) -> None:
    row = lookup(status, text, endpoint)
    assert (row.name, row.kind, row.crashed) == (rule, kind, crashed)
    error = error_for("POST /x", status, text, endpoint)
    assert (error.kind, error.crashed, error.retryable, error.status) == (kind, crashed, retryable, status)


@pytest.mark.parametrize("sign", OUT_OF_MEMORY)
def test_every_text_of_ollamas_out_of_memory_list_is_a_memory_error(sign: str) -> None:
    assert lookup(500, f"ggml: {sign.upper()} while loading", None).name == "memory.out_of_memory"


def test_a_400_is_a_bad_request_except_on_api_embed_where_ollama_answers_runtime_errors_with_it() -> None:
    assert lookup(400, "anything", "/api/chat").kind is ErrorKind.VALIDATION
    embed = error_for("POST /api/embed", 400, "anything", EMBED)
    assert embed.kind is ErrorKind.PROVIDER and embed.retryable and embed.rule == "embed.runtime"


@pytest.mark.parametrize(
    "text",
    [
        'model "x" not found, try pulling it first',
        "x does not support tools",
        "this model may be incompatible with your version of Ollama",
        'template: :1: function "x" not defined',
    ],
)
def test_permanent_model_errors_are_neither_retried_nor_counted_by_the_breaker(text: str) -> None:
    error = error_for("POST /api/chat", 400, text, "/api/chat")
    assert error.kind is ErrorKind.MODEL and not error.retryable and not counts(error)


def test_a_crash_is_not_counted_until_the_executor_says_it_repeated() -> None:
    error = error_for("POST /api/chat", 500, "llama-server process has terminated: exit status 2", "/api/chat")
    assert error.crashed and not counts(error)
    error.counted = True  # what the executor does when it crashes again after the memory strategy unloaded
    assert counts(error)


# ---- the errors built from the rows ------------------------------------------------------------------


@pytest.mark.parametrize("embedding, setting", [(False, "MODEL_LOAD_OPTIONS"), (True, "EMBEDDING_LOAD_OPTIONS")])
def test_a_load_option_of_the_wrong_type_is_refused_naming_the_setting_it_came_from(
    embedding: bool, setting: str
) -> None:
    error = error_for("POST /api/embed", 500, 'option "num_ctx" must be of type integer', EMBED, embedding=embedding)
    assert isinstance(error, LoadOptionsRefused) and (error.setting, error.option) == (setting, "num_ctx")
    assert error.kind is ErrorKind.VALIDATION and not error.retryable and error.counted is False
    assert error.message.startswith('POST /api/embed: option "num_ctx" must be of type integer (set num_ctx in ')
    assert setting in error.advice


def test_a_sampling_option_of_the_wrong_type_is_the_jobs_fault() -> None:
    error = error_for("POST /api/chat", 500, 'option "stop" must be of type array', "/api/chat")
    assert type(error) is OllamaError and error.kind is ErrorKind.VALIDATION and error.advice == ""
    assert error.message == 'POST /api/chat: option "stop" must be of type array'


def test_a_403_names_the_host_and_what_to_set_and_pauses_the_host() -> None:
    error = error_for("POST /api/chat", 403, "", "/api/chat", host="gpu7.example.com")
    assert error.unreachable and error.counted is False and error.rule == "config.host"
    assert error.message.startswith("POST /api/chat: HTTP 403 (Ollama refused the request with 403 and no body")
    assert "'gpu7.example.com'" in error.advice and "OLLAMA_HOST=0.0.0.0" in error.advice


def test_classify_gives_the_kind_for_the_http_client() -> None:
    assert classify(404, "model 'x' not found") is ErrorKind.MODEL
    assert classify(500, "llama-server process has terminated: exit status 2") is ErrorKind.MEMORY
    assert classify(503, "server busy, please try again.  maximum pending requests exceeded") is ErrorKind.PROVIDER


# ---- against Ollama's source, where a copy of it is at hand ----------------------------------------------

needs_source = pytest.mark.skipif(
    not (OLLAMA_SRC / "llm" / "status.go").exists(), reason=f"no Ollama source at {OLLAMA_SRC} (set OLLAMA_SRC)"
)


@needs_source
def test_the_out_of_memory_list_is_ollamas() -> None:
    source = (OLLAMA_SRC / "llm" / "status.go").read_text()
    block = re.search(r"var outOfMemorySubstrings = \[\]string\{(.*?)\}", source, re.DOTALL)
    assert block is not None
    assert tuple(s.lower() for s in re.findall(r'"([^"]+)"', block.group(1))) == OUT_OF_MEMORY


@needs_source
@pytest.mark.parametrize(
    "path, text",
    [
        ("llm/llama_server.go", "llama-server process has terminated: %s"),
        ("llm/llama_server.go", "llama-server process no longer running: %s %s"),
        ("llm/llama_server.go", "llama-server reported out-of-memory during startup: %s"),
        ("llm/llama_server.go", "model runner has unexpectedly stopped, this may be due to resource limitations"),
        ("llm/llama_server.go", "an error was encountered while running the model: %s"),
        ("llm/llama_server.go", "do embedding request: %w"),
        ("llm/llama_server.go", "the input length exceeds the context length"),
        ("llm/llama_server.go", "no slots available after %d retries"),
        ("llm/llama_server.go", "llama-server template error: %v"),
        ("llm/server.go", "unable to load full model on GPU"),
        ("server/sched.go", "this model may be incompatible with your version of Ollama"),
        ("server/sched.go", "server busy, please try again.  maximum pending requests exceeded"),
        ("server/routes.go", "model '%s' not found"),
        ("server/routes.go", "model %q not found, try pulling it first"),
        ("server/routes.go", "%q does not support thinking"),
        ("server/routes.go", "input exceeds maximum context length and cannot be truncated further"),
        ("server/routes.go", "embedding contains NaN or Inf values"),
        ("server/routes.go", "c.AbortWithStatus(http.StatusForbidden)"),
        ("server/images.go", 'errors.New("does not support")'),
        ("api/types.go", "option %q must be of type boolean"),
    ],
)
def test_the_texts_the_table_names_are_in_ollamas_source(path: str, text: str) -> None:
    assert text in (OLLAMA_SRC / path).read_text()


@needs_source
def test_the_options_sent_are_those_of_ollamas_api_options() -> None:
    source = (OLLAMA_SRC / "api" / "types.go").read_text()
    fields = ""
    for struct in ("Options", "Runner"):
        block = re.search(rf"^type {struct} struct \{{(.*?)^\}}", source, re.DOTALL | re.MULTILINE)
        assert block is not None
        fields += block.group(1)
    assert set(re.findall(r'json:"([a-z_]+)', fields)) == OLLAMA_OPTIONS


def test_the_job_options_dropped_are_the_ones_ollama_removed() -> None:
    assert set(Options.__struct_fields__) - OLLAMA_OPTIONS == {"mirostat", "mirostat_tau", "mirostat_eta"}
