"""Jobs as PROTOCOL.md defines them: decoding, validation, error kinds, results."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from llm_worker.plugins import limits
from llm_worker.protocol import jobs
from llm_worker.protocol.jobs import ErrorKind, Invalid, JobError, Malformed, RequestRejected
from llm_worker.settings import config

fuzz = hypothesis_settings(max_examples=100, deadline=None, derandomize=True, database=None)


def settings(**env: Any) -> config.Settings:
    """Settings from an explicit environment, so the real one never leaks in."""
    return config.load({key: str(value) for key, value in env.items()}).settings


DEFAULT = settings()
USER = {"role": "user", "content": "Why is the sky blue?"}


def chat_job(**fields: Any) -> dict[str, Any]:
    return {"id": "job-1", "type": "chat", "userId": "user-1", "request": {"messages": [USER]}, **fields}


def decode(job: dict[str, Any] | bytes, s: config.Settings = DEFAULT) -> jobs.Decoded:
    """Decode as a worker does: validation, then the request-limits filter (plugins/limits.py).

    A refusal by the filter becomes Invalid here, as the worker dead-letters
    both the same way: errorType validation, the reason, the failure result.
    """
    raw = job if isinstance(job, bytes) else msgspec.json.encode(job)
    decoded = jobs.decode(raw, s)
    try:
        limits.check(decoded, s)
    except RequestRejected as exc:
        raise Invalid(exc.message, msgspec.json.decode(raw)) from None
    return decoded


def invalid(job: dict[str, Any] | bytes, s: config.Settings = DEFAULT) -> Invalid:
    with pytest.raises(Invalid) as caught:
        decode(job, s)
    assert caught.value.reason.strip()
    return caught.value


def malformed(raw: bytes, s: config.Settings = DEFAULT) -> Malformed:
    with pytest.raises(Malformed) as caught:
        jobs.decode(raw, s)
    assert caught.value.reason.strip()
    return caught.value


# ---- valid jobs of every type -----------------------------------------------------------


def test_a_chat_job() -> None:
    decoded = decode(
        chat_job(
            model="llama3.2",
            correlationId="corr-1",
            priority=5,
            retryCount=2,
            request={"messages": [USER], "stream": True, "options": {"temperature": 0.2}},
        )
    )
    (task,) = decoded.tasks
    assert (task.type, task.model, decoded.model) == ("chat", "llama3.2", "llama3.2")
    assert isinstance(task.request, jobs.ChatRequest)
    assert task.request.messages[0].content == USER["content"]
    assert task.request.options is not None and task.request.options.temperature == 0.2
    assert (decoded.job.correlation_id, decoded.job.priority, decoded.job.retry_count) == ("corr-1", 5, 2)
    assert decoded.stream is True
    assert decoded.raw == msgspec.json.encode(
        chat_job(
            model="llama3.2",
            correlationId="corr-1",
            priority=5,
            retryCount=2,
            request={"messages": [USER], "stream": True, "options": {"temperature": 0.2}},
        )
    )


def test_a_generate_job() -> None:
    decoded = decode(chat_job(type="generate", request={"prompt": "Say hi", "system": "Be brief", "keepAlive": "5m"}))
    (task,) = decoded.tasks
    assert isinstance(task.request, jobs.GenerateRequest)
    assert (task.type, task.request.prompt, task.request.system, task.request.keep_alive) == (
        "generate",
        "Say hi",
        "Be brief",
        "5m",
    )
    assert decoded.stream is False


@pytest.mark.parametrize(
    ("request_", "inputs"),
    [
        ({"input": "one text"}, ["one text"]),
        ({"input": ["a", "b", "c"]}, ["a", "b", "c"]),
        ({"prompt": "the older form"}, ["the older form"]),
        ({"input": "wins", "prompt": "ignored"}, ["wins"]),
        ({"input": "never streamed", "stream": True}, ["never streamed"]),
    ],
)
def test_an_embeddings_job(request_: dict[str, Any], inputs: list[str]) -> None:
    decoded = decode(chat_job(type="embeddings", request=request_))
    (task,) = decoded.tasks
    assert isinstance(task.request, jobs.EmbeddingsRequest)
    assert (task.type, task.request.inputs()) == ("embeddings", inputs)
    assert decoded.stream is False


def test_a_batch_job_becomes_one_task_per_request() -> None:
    s = settings(DEFAULT_CHAT_MODEL="chatty", DEFAULT_EMBEDDING_MODEL="embedder")
    decoded = decode(
        chat_job(
            type="batch",
            request={
                "requests": [
                    {"type": "chat", "request": {"messages": [USER]}},
                    {"type": "generate", "model": "mistral:7b", "request": {"prompt": "hi"}},
                    {"type": "embeddings", "request": {"input": ["x", "y"]}},
                ]
            },
        ),
        s,
    )
    assert [(t.type, t.model) for t in decoded.tasks] == [
        ("chat", "chatty"),
        ("generate", "mistral:7b"),
        ("embeddings", "embedder"),
    ]
    assert decoded.model == "chatty"
    assert decoded.stream is False


def test_a_batch_job_model_is_the_default_of_its_requests() -> None:
    decoded = decode(
        chat_job(
            type="batch",
            model="llama3.2",
            request={
                "requests": [
                    {"type": "chat", "request": {"messages": [USER]}},
                    {"type": "embeddings", "model": "nomic-embed-text", "request": {"input": "x"}},
                ]
            },
        )
    )
    assert [t.model for t in decoded.tasks] == ["llama3.2", "nomic-embed-text"]


@pytest.mark.parametrize(
    ("type_", "request_", "model"),
    [
        ("chat", {"messages": [USER]}, "chatty"),
        ("generate", {"prompt": "hi"}, "chatty"),
        ("embeddings", {"input": "hi"}, "embedder"),
    ],
)
def test_default_models_per_type(type_: str, request_: dict[str, Any], model: str) -> None:
    s = settings(DEFAULT_CHAT_MODEL="chatty", DEFAULT_EMBEDDING_MODEL="embedder")
    assert decode(chat_job(type=type_, request=request_), s).model == model
    assert decode(chat_job(type=type_, request=request_, model="named"), s).model == "named"


@pytest.mark.parametrize(
    ("worker_timeout", "job_timeout", "seconds"),
    [
        (300_000, None, 300.0),
        (300_000, 5_000, 5.0),
        (300_000, 1, 0.001),
        (300_000, 10**9, 300.0),
        (1_000, 5_000, 1.0),
    ],
)
def test_timeout_is_the_jobs_own_capped_by_worker_timeout(
    worker_timeout: int, job_timeout: int | None, seconds: float
) -> None:
    job = chat_job() if job_timeout is None else chat_job(timeout=job_timeout)
    assert decode(job, settings(WORKER_TIMEOUT=worker_timeout)).timeout == seconds


@pytest.mark.parametrize(
    ("queue_max", "max_retries", "attempts"),
    [
        (3, None, 3),
        (3, 0, 1),
        (3, 1, 2),
        (3, 2, 3),
        (3, 50, 3),
        (10, 4, 5),
    ],
)
def test_max_attempts_is_max_retries_plus_one_capped(queue_max: int, max_retries: int | None, attempts: int) -> None:
    job = chat_job() if max_retries is None else chat_job(maxRetries=max_retries)
    assert decode(job, settings(QUEUE_MAX_ATTEMPTS=queue_max)).max_attempts == attempts


CREATED = datetime(2026, 11, 23, 15, 4, 5, 123000, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("created_at", "epoch"),
    [
        ("2026-11-23T15:04:05.123Z", CREATED),
        ("2026-11-23T15:04:05.123+00:00", CREATED),
        ("2026-11-23T16:04:05.123+01:00", CREATED),
        ("2026-11-23T15:04:05.123", CREATED),  # naive: UTC
        ("2026-11-23T15:04:05Z", CREATED - 0.123),
        (1795446245123, CREATED),  # epoch milliseconds, as Date.now() gives
        (1795446245123.0, CREATED),
    ],
)
def test_created_at_in_every_form(created_at: Any, epoch: float) -> None:
    assert decode(chat_job(createdAt=created_at)).created == pytest.approx(epoch, abs=1e-6)


def test_created_is_none_when_the_producer_says_nothing() -> None:
    assert decode(chat_job()).created is None
    assert decode(chat_job(createdAt=None)).created is None


def test_unknown_fields_are_ignored_at_every_level() -> None:
    decoded = decode(
        chat_job(
            futureField={"nested": [1, 2]},
            request={
                "messages": [{**USER, "name": "alice", "weight": 2}],
                "options": {"temperature": 1, "num_gpu": 99, "new_knob": "x"},
                "stream": False,
                "newRequestField": True,
            },
        )
    )
    options = decoded.tasks[0].request.options
    assert options is not None and options.temperature == 1
    assert decoded.tasks[0].request.messages[0].role == "user"
    batch = decode(
        chat_job(
            type="batch",
            request={"requests": [{"type": "embeddings", "request": {"input": "x", "dims": 3}, "extra": 1}], "x": 2},
        )
    )
    assert batch.tasks[0].request.inputs() == ["x"]


# ---- payloads that are not jobs: Malformed ------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b'{"id": "job-1"',
        b"\x00\x01\x02garbage\xff",
        b"\xef\xbb\xbf{}",
        b"{'id': 'job-1'}",
        b'{"id":"job-1","type":"chat","userId":"u","request":{"messages":[{"role":"user","content":"x"}],"options":{"temperature":NaN}}}',
    ],
)
def test_a_payload_that_is_not_json_is_malformed(raw: bytes) -> None:
    assert malformed(raw).job_id is None


@pytest.mark.parametrize("raw", [b"[]", b'[{"id": "job-1"}]', b'"job-1"', b"42", b"1.5", b"null", b"true"])
def test_json_that_is_not_an_object_is_malformed(raw: bytes) -> None:
    assert malformed(raw).job_id is None


@pytest.mark.parametrize(
    "job",
    [
        {"type": "chat", "userId": "u", "request": {"messages": [USER]}},
        chat_job(id=None),
        chat_job(id=42),
        chat_job(id=""),
        chat_job(id="job 1"),
        chat_job(id="job/1"),
        chat_job(id="jöb-1"),
        chat_job(id="j" * 129),
    ],
    ids=["missing", "null", "number", "empty", "space", "slash", "non-ascii", "129-chars"],
)
def test_an_object_without_a_usable_id_is_malformed(job: dict[str, Any]) -> None:
    # Without a usable id no failure result can be written, so it is dead-lettered raw.
    assert malformed(msgspec.json.encode(job)).job_id is None


def test_an_id_of_128_characters_is_fine() -> None:
    assert decode(chat_job(id="a-Z_0.9:" * 16)).job.id == "a-Z_0.9:" * 16


def test_an_oversized_payload_is_refused_before_it_is_decoded() -> None:
    s = settings(MAX_JOB_BYTES=1024)
    raw = b'{"id": "big-1", "type": "chat", ' + b"x" * 1200  # not even JSON: the size is what counts
    error = malformed(raw, s)
    assert error.reason == f"payload of {len(raw)} bytes is over MAX_JOB_BYTES (1024)"
    assert error.job_id == "big-1"


@pytest.mark.parametrize(
    ("raw", "job_id"),
    [
        (b'  \n{ "id" :"big-2", "request": {}} ', "big-2"),
        (b'{"type": "chat", "id": "big-3"}', None),
        (b'{"request": {"id": "tool-call-1"}, "id": "big-4"}', None),
        (b'{"id": "bad id"}', None),
        (b'{"id": 17}', None),
    ],
)
def test_only_a_leading_id_is_recovered_from_an_oversized_payload(raw: bytes, job_id: str | None) -> None:
    s = settings(MAX_JOB_BYTES=1024)
    padded = raw + b" " * (1025 - len(raw))
    error = malformed(padded, s)
    assert "MAX_JOB_BYTES" in error.reason
    assert error.job_id == job_id


@pytest.mark.parametrize(
    ("raw", "job_id"),
    [
        (b'{"type": "chat", "id": "late"}', "late"),  # within the limit: decoded, any key order
        (b'{"id": "bad id"}', None),
        (b'{"id": ["x"]}', None),
        (b"not json", None),
        (b'{"type": "chat", "id": "late"}' + b" " * 1024, None),  # over it: only a leading id
        (b'{"id": "lead"}' + b" " * 1024, "lead"),
    ],
)
def test_the_id_of_a_payload_is_read_within_max_job_bytes(raw: bytes, job_id: str | None) -> None:
    assert jobs.job_id_of(raw, 1024) == job_id


def test_a_payload_of_exactly_max_job_bytes_is_decoded() -> None:
    s = settings(MAX_JOB_BYTES=1024)
    raw = msgspec.json.encode(chat_job())
    raw = raw[:-1] + b" " * (1024 - len(raw)) + b"}"
    assert len(raw) == 1024
    assert decode(raw, s).job.id == "job-1"
    malformed(raw[:-1] + b" }", s)


# ---- jobs that break a rule: Invalid, naming the field -------------------------------------------


def test_invalid_carries_the_job_and_a_path() -> None:
    error = invalid(chat_job(correlationId="c-9", request={"messages": [USER, {"role": "robot", "content": "beep"}]}))
    assert error.reason == "Invalid enum value 'robot' - at `$.request.messages[1].role`"
    assert error.job == chat_job(
        correlationId="c-9", request={"messages": [USER, {"role": "robot", "content": "beep"}]}
    )


@pytest.mark.parametrize(
    ("request_", "path"),
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "$.request.messages[0].role"),
        ({"messages": [{"role": "User", "content": "x"}]}, "$.request.messages[0].role"),
        ({"messages": [{"content": "x"}]}, "$.request.messages[0]"),
        ({"messages": [{"role": "user", "content": 5}]}, "$.request.messages[0].content"),
        ({"messages": []}, "$.request.messages"),
        ({"messages": "hello"}, "$.request.messages"),
        ({}, "$.request"),
        ({"messages": [USER], "stream": "yes"}, "$.request.stream"),
        ({"messages": [USER], "format": "xml"}, "$.request.format"),
        ({"messages": [USER], "keepAlive": "five minutes"}, "$.request.keepAlive"),
    ],
)
def test_a_bad_chat_request_is_invalid(request_: dict[str, Any], path: str) -> None:
    assert f"`{path}`" in invalid(chat_job(request=request_)).reason


def test_a_request_that_is_not_an_object_is_invalid() -> None:
    assert invalid(chat_job(request=5)).reason == "Expected `object`, got `int` - at `$.request`"
    assert "`$.request`" in invalid(chat_job(type="generate", request={"system": "no prompt"})).reason


BAD_OPTIONS = [
    ("temperature", -0.1),
    ("temperature", 2.1),
    ("temperature", "hot"),
    ("top_p", 1.5),
    ("top_p", -0.01),
    ("min_p", 2),
    ("typical_p", -1),
    ("top_k", -1),
    ("top_k", 100_001),
    ("top_k", 1.5),
    ("num_predict", -3),
    ("num_ctx", 0),
    ("num_keep", -2),
    ("repeat_last_n", -2),
    ("stop", ["s"] * 17),
    ("stop", [""]),
    ("stop", ["s" * 257]),
    ("stop", "END"),
    ("seed", 2**63),
    ("repeat_penalty", 10.5),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("mirostat", 3),
    ("mirostat", -1),
    ("mirostat", 1.5),
    ("mirostat_tau", 101),
    ("mirostat_eta", 1.1),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=[f"{n}={str(v)[:10]}" for n, v in BAD_OPTIONS])
def test_an_option_out_of_range_is_invalid(name: str, value: Any) -> None:
    job = chat_job(request={"messages": [USER], "options": {name: value}})
    assert f"`$.request.options.{name}" in invalid(job).reason
    generate = chat_job(type="generate", request={"prompt": "hi", "options": {name: value}})
    assert f"`$.request.options.{name}" in invalid(generate).reason


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 0},
        {"top_p": 1},
        {"top_k": 0},
        {"top_k": 100_000},
        {"num_predict": -1},
        {"num_predict": -2},
        {"num_predict": 16_384},
        {"num_ctx": 131_072},
        {"num_ctx": 1},
        {"stop": ["s"] * 16},
        {"stop": ["x" * 256]},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
        {"mirostat": 0},
        {"mirostat": 1},
        {"mirostat": 2},
        {"mirostat_tau": 100},
        {"mirostat_eta": 1},
        {"repeat_penalty": 0},
        {"presence_penalty": -2},
        {"frequency_penalty": 2},
        {"temperature": None},
    ],
)
def test_options_at_their_limits_are_accepted(options: dict[str, Any]) -> None:
    decode(chat_job(request={"messages": [USER], "options": options}))


def test_num_predict_and_num_ctx_are_capped_by_settings() -> None:
    s = settings(MAX_NUM_PREDICT=100, MAX_NUM_CTX=4096)
    decode(chat_job(request={"messages": [USER], "options": {"num_predict": 100, "num_ctx": 4096}}), s)
    error = invalid(chat_job(request={"messages": [USER], "options": {"num_predict": 101}}), s)
    assert error.reason == "num_predict 101 is over MAX_NUM_PREDICT (100) - at `$.request.options.num_predict`"
    error = invalid(chat_job(request={"messages": [USER], "options": {"num_ctx": 4097}}), s)
    assert error.reason == "num_ctx 4097 is over MAX_NUM_CTX (4096) - at `$.request.options.num_ctx`"
    error = invalid(chat_job(type="embeddings", request={"input": "x", "options": {"num_ctx": 4097}}), s)
    assert "`$.request.options.num_ctx`" in error.reason


def test_prompt_length_counts_all_chat_messages() -> None:
    s = settings(MAX_PROMPT_LENGTH=10)
    decode(
        chat_job(request={"messages": [{"role": "system", "content": "12345"}, {"role": "user", "content": "12345"}]}),
        s,
    )
    error = invalid(
        chat_job(request={"messages": [{"role": "system", "content": "12345"}, {"role": "user", "content": "123456"}]}),
        s,
    )
    assert error.reason == "prompt of 11 characters is over MAX_PROMPT_LENGTH (10) - at `$.request`"


def test_prompt_length_counts_generate_prompt_and_system() -> None:
    s = settings(MAX_PROMPT_LENGTH=10)
    decode(chat_job(type="generate", request={"prompt": "1234567890"}), s)
    decode(chat_job(type="generate", request={"prompt": "12345", "system": "12345"}), s)
    assert (
        "MAX_PROMPT_LENGTH (10)"
        in invalid(chat_job(type="generate", request={"prompt": "123456", "system": "12345"}), s).reason
    )
    assert "MAX_PROMPT_LENGTH (10)" in invalid(chat_job(type="generate", request={"prompt": "12345678901"}), s).reason


def test_prompt_length_applies_to_each_embedding_input() -> None:
    s = settings(MAX_PROMPT_LENGTH=10)
    decode(chat_job(type="embeddings", request={"input": ["1234567890", "1234567890", "1234567890"]}), s)
    for request in ({"input": ["short", "12345678901"]}, {"input": "12345678901"}, {"prompt": "12345678901"}):
        error = invalid(chat_job(type="embeddings", request=request), s)
        assert error.reason == "an input of 11 characters is over MAX_PROMPT_LENGTH (10) - at `$.request.input`"


def test_too_many_messages_is_invalid() -> None:
    s = settings(MAX_MESSAGES=2)
    decode(chat_job(request={"messages": [USER] * 2}), s)
    error = invalid(chat_job(request={"messages": [USER] * 3}), s)
    assert error.reason == "3 messages is over MAX_MESSAGES (2) - at `$.request.messages`"


def test_too_many_embedding_inputs_is_invalid() -> None:
    s = settings(MAX_EMBEDDING_INPUTS=2)
    decode(chat_job(type="embeddings", request={"input": ["a", "b"]}), s)
    error = invalid(chat_job(type="embeddings", request={"input": ["a", "b", "c"]}), s)
    assert error.reason == "3 inputs is over MAX_EMBEDDING_INPUTS (2) - at `$.request.input`"


@pytest.mark.parametrize("request_", [{}, {"input": []}, {"input": None}, {"prompt": None}, {"options": {}}])
def test_an_embeddings_request_without_input_is_invalid(request_: dict[str, Any]) -> None:
    error = invalid(chat_job(type="embeddings", request=request_))
    assert error.reason == "embeddings request has no input - at `$.request.input`"


@pytest.mark.parametrize("input_", [5, [1, 2], ["a", None]])
def test_an_embeddings_input_of_the_wrong_type_is_invalid(input_: Any) -> None:
    assert "`$.request.input" in invalid(chat_job(type="embeddings", request={"input": input_})).reason


def test_a_batch_over_max_batch_requests_is_invalid() -> None:
    s = settings(MAX_BATCH_REQUESTS=2)
    item = {"type": "embeddings", "request": {"input": "x"}}
    decode(chat_job(type="batch", request={"requests": [item] * 2}), s)
    error = invalid(chat_job(type="batch", request={"requests": [item] * 3}), s)
    assert error.reason == "batch of 3 requests is over MAX_BATCH_REQUESTS (2) - at `$.request.requests`"


GOOD_ITEM = {"type": "chat", "request": {"messages": [USER]}}


@pytest.mark.parametrize(
    ("item", "path"),
    [
        (
            {"type": "chat", "request": {"messages": [{"role": "robot"}]}},
            "`$.request.requests[1].request.messages[0].role`",
        ),
        (
            {"type": "chat", "request": {"messages": [USER], "options": {"num_ctx": 10**7}}},
            "`$.request.requests[1].request.options.num_ctx`",
        ),
        (
            {"type": "chat", "request": {"messages": [USER], "options": {"top_p": 2}}},
            "`$.request.requests[1].request.options.top_p`",
        ),
        ({"type": "embeddings", "request": {}}, "`$.request.requests[1].request.input`"),
        ({"type": "generate", "request": {"prompt": "x" * 8193}}, "`$.request.requests[1].request`"),
        ({"type": "generate", "request": []}, "`$.request.requests[1].request`"),
        ({"type": "chat", "model": "bad model!", "request": {"messages": [USER]}}, "`$.request.requests[1].model`"),
        ({"type": "batch", "request": {"requests": [GOOD_ITEM]}}, "`$.request.requests[1].type`"),
        ({"request": {"messages": [USER]}}, "`$.request.requests[1]`"),
        ({"type": "chat"}, "`$.request.requests[1]`"),
    ],
)
def test_a_bad_request_inside_a_batch_names_its_index(item: dict[str, Any], path: str) -> None:
    error = invalid(chat_job(type="batch", request={"requests": [GOOD_ITEM, item]}))
    assert path in error.reason


def test_an_empty_batch_is_invalid() -> None:
    assert "`$.request.requests`" in invalid(chat_job(type="batch", request={"requests": []})).reason
    assert "`$.request`" in invalid(chat_job(type="batch", request={})).reason


def test_a_model_outside_allowed_models_is_invalid() -> None:
    s = settings(ALLOWED_MODELS="llama3.2,nomic-embed-text")
    decode(chat_job(model="llama3.2:latest"), s)
    error = invalid(chat_job(model="mistral"), s)
    assert "'mistral'" in error.reason and "ALLOWED_MODELS" in error.reason
    batch = chat_job(
        type="batch",
        model="llama3.2",
        request={"requests": [GOOD_ITEM, {"type": "embeddings", "model": "bge-m3", "request": {"input": "x"}}]},
    )
    assert "'bge-m3'" in invalid(batch, s).reason
    # A default model outside the list is refused too, rather than run.
    outside = settings(ALLOWED_MODELS="llama3.2,nomic-embed-text", DEFAULT_CHAT_MODEL="llama2")
    assert "'llama2'" in invalid(chat_job(), outside).reason


def test_an_invalid_model_name_inside_a_batch_is_invalid() -> None:
    error = invalid(chat_job(type="batch", request={"requests": [{**GOOD_ITEM, "model": " llama3.2"}]}))
    assert error.reason == "model name ' llama3.2' is not valid - at `$.request.requests[0].model`"


# A job with a usable id that breaks the job schema can be answered by id: PROTOCOL.md says
# its failure result is written so a waiting producer wakes. That needs Invalid, not Malformed.
SCHEMA_BREAKS = [
    ("bad-type", chat_job(type="translate"), "$.type"),
    ("no-type", {k: v for k, v in chat_job().items() if k != "type"}, "type"),
    ("no-user", {k: v for k, v in chat_job().items() if k != "userId"}, "userId"),
    ("empty-user", chat_job(userId=""), "$.userId"),
    ("no-request", {k: v for k, v in chat_job().items() if k != "request"}, "request"),
    ("bad-model", chat_job(model="llama 3"), "$.model"),
    ("empty-model", chat_job(model=""), "$.model"),
    ("negative-retry-count", chat_job(retryCount=-1), "$.retryCount"),
    ("negative-max-retries", chat_job(maxRetries=-1), "$.maxRetries"),
    ("zero-timeout", chat_job(timeout=0), "$.timeout"),
    ("priority", chat_job(priority=10**7), "$.priority"),
    ("created-text", chat_job(createdAt="yesterday"), "$.createdAt"),
    ("created-date-only", chat_job(createdAt="2026-13-45T00:00:00Z"), "$.createdAt"),
    ("created-negative", chat_job(createdAt=-1), "$.createdAt"),
    ("created-bool", chat_job(createdAt=True), "$.createdAt"),
]


@pytest.mark.parametrize(
    ("job", "path"), [(job, path) for _, job, path in SCHEMA_BREAKS], ids=[n for n, _, _ in SCHEMA_BREAKS]
)
def test_a_job_with_an_id_that_breaks_the_schema_is_invalid(job: dict[str, Any], path: str) -> None:
    error = invalid(job)
    assert path in error.reason
    assert error.job == job


@pytest.mark.parametrize("raw", [b"[]", b"42", b'"job-1"', b"null"])
def test_json_that_is_not_an_object_is_not_reported_as_not_json(raw: bytes) -> None:
    assert malformed(raw).reason.startswith("not a job object: Expected `object`")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":"a\xff"}',
        b'{"userId":"\xff","id":"job-1"}',
        b'{"id":"job-1","type":"chat","userId":"u\xfe","request":{"messages":[{"role":"user","content":"x"}]}}',
        b'{"id":"job-1","type":"chat","userId":"u","request":{"messages":[{"role":"user","content":"\xff\xfe"}]}}',
    ],
    ids=["id", "user-first", "user", "content"],
)
def test_invalid_utf8_inside_a_string_is_refused(raw: bytes) -> None:
    with pytest.raises((Malformed, Invalid)):
        jobs.decode(raw, DEFAULT)


NESTED = b"[" * 1500 + b"]" * 1500


@pytest.mark.parametrize(
    "raw",
    [
        NESTED,
        b"[" * 1500,
        b'{"x":' + NESTED + b"}",
        b'{"id":"job-1","type":"chat","userId":"u","request":' + NESTED + b"}",
        b'{"id":"job-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}]},"extra":' + NESTED + b"}",
    ],
    ids=["array", "unclosed-array", "no-id", "request", "unknown-field"],
)
def test_deeply_nested_json_inside_an_object_is_refused(raw: bytes) -> None:
    with pytest.raises((Malformed, Invalid)):
        jobs.decode(raw, DEFAULT)


# ---- ALLOWED_MODELS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "allowed", "expected"),
    [
        ("anything", [], True),
        ("llama3.2", ["llama3.2"], True),
        ("llama3.2:latest", ["llama3.2"], True),
        ("llama3.2", ["llama3.2:latest"], True),
        ("llama3.2:1b", ["llama3.2"], False),
        ("llama3.2", ["llama3.2:1b"], False),
        ("llama3.2:1b", ["llama3.2:1b", "mistral"], True),
        ("llama3.2:3b", ["llama3.2:1b"], False),
        ("llama3", ["llama3.2"], False),
        ("mistral", ["llama3.2", "mistral"], True),
        ("library/llama3.2", ["library/llama3.2"], True),
        ("library/llama3.2:latest", ["library/llama3.2"], True),
        ("library/llama3.2:1b", ["library/llama3.2"], False),
        ("hf.co/user/repo:Q4_K_M", ["hf.co/user/repo:Q4_K_M"], True),
        ("hf.co/user/repo", ["hf.co/user/repo:Q4_K_M"], False),
        ("hf.co/user/repo:Q8_0", ["hf.co/user/repo:Q4_K_M"], False),
        ("hf.co/user/repo", ["hf.co/user/repo:latest"], True),
        ("localhost:5000/team/model", ["localhost:5000/team/model:latest"], True),  # a port is not a tag
        ("localhost:5000/team/model:v2", ["localhost:5000/team/model"], False),
    ],
)
def test_model_allowed(model: str, allowed: list[str], expected: bool) -> None:
    assert jobs.model_allowed(model, allowed) is expected


# ---- error kinds ---------------------------------------------------------------------------------


def test_error_kinds_are_the_protocols_and_exactly_five_are_retryable() -> None:
    assert {kind.value for kind in ErrorKind} == {
        "validation",
        "model",
        "timeout",
        "memory",
        "network",
        "provider",
        "crashed",
        "rate_limit",
        "unknown",
    }
    assert {kind for kind in ErrorKind if kind.retryable} == {
        ErrorKind.TIMEOUT,
        ErrorKind.MEMORY,
        ErrorKind.NETWORK,
        ErrorKind.PROVIDER,
        ErrorKind.RATE_LIMIT,
    }
    assert ErrorKind("timeout") is ErrorKind.TIMEOUT and ErrorKind.TIMEOUT == "timeout"


def test_job_error_kind_and_retryable_override() -> None:
    plain = JobError("boom")
    assert (plain.kind, plain.retryable, plain.message, str(plain)) == (ErrorKind.UNKNOWN, False, "boom", "boom")
    assert JobError("slow", ErrorKind.TIMEOUT).retryable is True
    assert JobError("slow", ErrorKind.TIMEOUT, retryable=False).retryable is False
    assert JobError("odd", ErrorKind.MODEL, retryable=True).retryable is True
    assert JobError("odd", ErrorKind.MODEL).retryable is False


def test_request_rejected_is_a_validation_error() -> None:
    rejected = RequestRejected("not on weekends")
    assert isinstance(rejected, JobError)
    assert (rejected.kind, rejected.retryable, rejected.message) == (ErrorKind.VALIDATION, False, "not on weekends")
    assert RequestRejected("try later", retryable=True).retryable is True
    assert JobError("x").kind is ErrorKind.UNKNOWN  # the subclass's kind does not leak into the base


# ---- results ------------------------------------------------------------------------------------

PROTOCOL_RESULT_FIELDS = [
    "jobId",
    "success",
    "response",
    "error",
    "errorType",
    "processingTime",
    "queueTime",
    "model",
    "requestedModel",
    "tokensUsed",
    "promptTokens",
    "completionTokens",
    "retryCount",
    "fallbackUsed",
    "cacheHit",
    "workerId",
    "correlationId",
    "completedAt",
]


def test_a_result_has_every_protocol_field_even_when_null() -> None:
    encoded = msgspec.json.decode(
        jobs.encode(jobs.Result(job_id="job-1", success=False, error="boom", error_type="timeout"))
    )
    for name in PROTOCOL_RESULT_FIELDS:
        assert name in encoded, name
    for name in encoded:
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z]*)*", name), name
    assert encoded["jobId"] == "job-1" and encoded["success"] is False
    assert (encoded["error"], encoded["errorType"], encoded["response"], encoded["tokensUsed"]) == (
        "boom",
        "timeout",
        None,
        None,
    )


def test_a_result_round_trips_the_protocol_example() -> None:
    example = {
        "jobId": "b3f1c2e0",
        "success": True,
        "response": {"message": {"role": "assistant", "content": "hi"}, "doneReason": "stop"},
        "error": None,
        "errorType": None,
        "processingTime": 812,
        "queueTime": 3,
        "model": "llama3.2",
        "requestedModel": "llama3.2",
        "tokensUsed": 96,
        "promptTokens": 25,
        "completionTokens": 71,
        "retryCount": 0,
        "fallbackUsed": False,
        "cacheHit": False,
        "workerId": "gpu-host-1:4711",
        "correlationId": "corr-123",
        "completedAt": "2026-11-23T15:04:06.000Z",
    }
    result = msgspec.json.decode(msgspec.json.encode(example), type=jobs.Result)
    assert (result.job_id, result.processing_time, result.worker_id) == ("b3f1c2e0", 812, "gpu-host-1:4711")
    again = msgspec.json.decode(jobs.encode(result))
    assert {name: again[name] for name in PROTOCOL_RESULT_FIELDS} == example


def test_iso_timestamps() -> None:
    assert jobs.iso(CREATED) == "2026-11-23T15:04:05.123Z"
    assert jobs.iso(0) == "1970-01-01T00:00:00.000Z"
    assert jobs.iso(CREATED + 0.000456, micro=True) == "2026-11-23T15:04:05.123456Z"
    now = jobs.iso()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
    parsed = datetime.fromisoformat(now.replace("Z", "+00:00"))
    assert abs(parsed - datetime.now(timezone.utc)) < timedelta(seconds=60)
    assert abs(datetime.fromisoformat(jobs.iso(time.time(), micro=True)[:-1] + "+00:00").timestamp() - time.time()) < 60


# ---- fuzzing: nothing but Malformed or Invalid, always with a reason -------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


def decode_or_refuse(raw: bytes) -> jobs.Decoded | None:
    try:
        return jobs.decode(raw, DEFAULT)
    except (Malformed, Invalid) as refusal:
        assert refusal.reason.strip()
        if isinstance(refusal, Invalid):
            assert isinstance(refusal.job, dict) and refusal.job.get("id")
        return None


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(raw: bytes) -> None:
    decode_or_refuse(raw)


@fuzz
@given(JSON)
def test_random_json_values_are_refused_cleanly(value: Any) -> None:
    decode_or_refuse(msgspec.json.encode(value))


# Mostly valid parts, each sometimes swapped for any JSON value, so both branches are exercised.
TYPES = st.sampled_from(["chat", "generate", "embeddings"])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool"]) | JSON},
    optional={"content": st.text(max_size=30) | JSON},
)
OPTIONS = st.dictionaries(
    st.sampled_from(["temperature", "top_p", "top_k", "num_predict", "num_ctx", "stop", "mirostat", "seed"]),
    st.integers(-3, 200) | st.floats(0, 3) | JSON,
    max_size=3,
)
ITEM_REQUEST = {"messages": [USER], "prompt": "p", "input": "i"}
REQUEST = st.fixed_dictionaries(
    {
        "messages": st.lists(MESSAGE, min_size=1, max_size=3) | JSON,
        "prompt": st.text(max_size=30) | JSON,
        "input": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | JSON,
        "requests": st.lists(
            st.fixed_dictionaries({"type": TYPES | JSON, "request": st.just(ITEM_REQUEST) | JSON}),
            min_size=1,
            max_size=3,
        )
        | JSON,
    },
    optional={"options": OPTIONS | JSON, "stream": st.booleans() | JSON},
)
JOB_FIELDS = st.fixed_dictionaries(
    {"type": (TYPES | st.just("batch")) | JSON},
    optional={
        "userId": st.just("u") | JSON,
        "model": st.sampled_from(["llama3.2", "x:1b", "hf.co/u/r:Q4"]) | JSON,
        "priority": st.integers(-5, 5) | JSON,
        "createdAt": st.just("2026-11-23T15:04:05Z") | st.integers(0, 2**50) | JSON,
        "timeout": st.integers(1, 10**9) | JSON,
        "retryCount": st.integers(0, 5) | JSON,
        "maxRetries": st.integers(0, 10) | JSON,
    },
)


@hypothesis_settings(fuzz, max_examples=60)
@given(JOB_FIELDS, REQUEST)
def test_random_jobs_with_an_id_are_decoded_or_refused_cleanly(fields: dict[str, Any], request: dict[str, Any]) -> None:
    job = {"id": "fuzz-1", "userId": "u", **fields, "request": request}
    decoded = decode_or_refuse(msgspec.json.encode(job))
    if decoded is not None:
        assert decoded.job.id == "fuzz-1" and decoded.tasks
        assert 0 < decoded.timeout <= DEFAULT.worker.timeout / 1000
        assert 1 <= decoded.max_attempts <= DEFAULT.queue.max_attempts


def test_iso_writes_what_datetime_isoformat_writes() -> None:
    import random
    from datetime import datetime, timezone

    from llm_worker.protocol.jobs import iso

    rng = random.Random(7)
    now = time.time()
    stamps = [rng.uniform(0, 4e9) for _ in range(20_000)] + [now + rng.uniform(-1e5, 1e5) for _ in range(20_000)]
    stamps += [float(int(now)) + n / 1e6 for n in (0, 1, 499, 500, 999_499, 999_500, 999_999)]
    for ts in stamps:
        dt = datetime.fromtimestamp(ts, timezone.utc)
        for micro in (False, True):
            expected = dt.isoformat(timespec="microseconds" if micro else "milliseconds").replace("+00:00", "Z")
            assert iso(ts, micro=micro) == expected, ts
