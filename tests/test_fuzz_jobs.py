"""Fuzzing the job decoder: whatever a producer pushes, a worker refuses it cleanly or can run it.

Every payload goes through ``jobs.decode`` as a worker takes it. Only two
outcomes are allowed:

- a refusal (Malformed, Invalid, or the request-limits filter's
  RequestRejected) that the worker's own Finisher turns into a validation
  dead letter, with a reason a person can read: one printable line of bounded
  length that says what is wrong and, where there is one, the JSON path; no
  Python repr of an exception, no traceback;
- a Decoded job that the worker can then run: the same Finisher writes its
  success, its retry (which decodes again) and its failure without an error.

Anything else (another exception, an entry that is not JSON) fails the test.
The examples are derandomized, so every run (and CI) sees the same ones;
LLM_WORKER_FUZZ_SCALE=10 runs ten times as many, with the same seed.
"""

from __future__ import annotations

import logging
import os
import re
import time
from datetime import timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm_worker.host.breaker import BreakerOpen
from llm_worker.plugin.manager import PluginManager
from llm_worker.plugins import limits, ollama
from llm_worker.protocol import jobs
from llm_worker.protocol.jobs import Answer, Decoded, ErrorKind, Invalid, JobError, Malformed, RequestRejected
from llm_worker.queue.cache import ResponseCache
from llm_worker.queue.reliable import Finished
from llm_worker.settings import config
from llm_worker.workerproc.finish import Finisher
from llm_worker.workerproc.outcome import Outcome

SCALE = float(os.environ.get("LLM_WORKER_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


DEFAULT = config.load({}).settings
SMALL = config.load({"MAX_JOB_BYTES": "65536"}).settings  # huge values cross the size limit sooner
MAX_REASON = 320  # characters: a dead letter's reason is read by a person, in a log line or a terminal
QUOTED = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
NOT_READABLE = ("Traceback", "Error(", "Exception(", " object at 0x", "<class ", 'File "')


# ---- the oracle: refused cleanly, or runnable ---------------------------------------------------


class Written:
    """Stands in for ReliableQueue: keeps what a finish would write to Redis, encoded as it would be."""

    def __init__(self) -> None:
        self.dead: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.retried: list[bytes] = []

    def _result(self, result: jobs.Result | None) -> None:
        if result is not None:
            self.results.append(jobs.loose(jobs.encode(result)))

    def complete(self, worker_id: str, raw: bytes, result: jobs.Result, **_: Any) -> Finished:
        self._result(result)
        return Finished(True, None)

    def retry_later(self, worker_id: str, raw: bytes, queue: str, payload: bytes, due: float, **_: Any) -> Finished:
        self.retried.append(payload)
        return Finished(True, None)

    def dead_letter(
        self, worker_id: str, raw: bytes, entry: jobs.DeadLetter, result: jobs.Result | None, **_: Any
    ) -> Finished:
        encoded = jobs.encode(entry)
        try:
            self.dead.append(jobs.loose(encoded))
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            pytest.fail(f"the dead letter is not JSON that can be read back ({exc}): {encoded[:300]!r}")
        self._result(result)
        return Finished(True, None)


@pytest.fixture(autouse=True, scope="module")
def quiet_worker_log() -> Any:
    """Thousands of refusals each log a warning; the test checks what they write instead."""
    logger = logging.getLogger("llm_worker.worker")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


PLUGINS = PluginManager()  # no sinks: the finish paths run, their events go nowhere


def finisher(written: Written, s: config.Settings) -> Finisher:
    return Finisher(
        written,
        s,
        "fuzz-host:1",
        "llm-chat",
        lambda call, *a, **kw: call(*a, **kw),  # type: ignore[arg-type]
        PLUGINS,
    )


def assert_readable(reason: str, raw: bytes) -> None:
    shown = f"{reason[:400]!r} for payload {raw[:200]!r}"
    assert isinstance(reason, str) and reason.strip(), shown
    assert reason.isprintable(), f"control characters in the reason: {shown}"
    assert len(reason) <= MAX_REASON, f"a reason of {len(reason)} characters: {shown}"
    skeleton = QUOTED.sub("''", reason)  # the values a reason quotes are the producer's, not ours
    for marker in NOT_READABLE:
        assert marker not in skeleton, f"{marker!r} in the reason: {shown}"


def assert_names_a_path(reason: str, raw: bytes) -> None:
    """An Invalid job's reason says where: a JSON path, or the missing field's name."""
    assert "`$" in reason or "field `" in reason, f"no JSON path in {reason!r} for payload {raw[:200]!r}"


def outcome(raw: bytes, s: config.Settings = DEFAULT) -> str | Decoded:
    """Take ``raw`` as a worker does; return the refusal's kind after checking its dead letter, or the runnable job."""
    written = Written()
    finish = finisher(written, s)
    try:
        decoded = jobs.decode(raw, s)
    except Malformed as refusal:
        assert_readable(refusal.reason, raw)
        assert refusal.job_id is None or re.fullmatch(jobs.JOB_ID, refusal.job_id)
        finish.malformed(raw, refusal, take_next=False)
        (entry,) = written.dead
        assert (entry["error"], entry["errorType"], entry["queue"]) == (refusal.reason, "validation", "llm-chat")
        assert "job" not in entry and raw[: jobs.RAW_KEEP].decode(errors="replace") == entry["raw"]
        assert [r["jobId"] for r in written.results] == ([refusal.job_id] if refusal.job_id else [])
        return "malformed"
    except Invalid as refusal:
        assert_readable(refusal.reason, raw)
        assert_names_a_path(refusal.reason, raw)
        assert refusal.job == jobs.loose(raw)  # the dead letter embeds the payload: it must be JSON
        assert re.fullmatch(jobs.JOB_ID, refusal.job["id"])
        finish.invalid(raw, refusal, take_next=False)
        (entry,) = written.dead
        assert (entry["error"], entry["errorType"], entry["job"]) == (refusal.reason, "validation", refusal.job)
        (result,) = written.results
        assert (result["jobId"], result["success"], result["errorType"], result["error"]) == (
            refusal.job["id"],
            False,
            "validation",
            refusal.reason,
        )
        return "invalid"
    # The request-limits filter refuses what is over a limit; the worker dead-letters that too.
    try:
        limits.check(decoded, s)
    except RequestRejected as refusal:
        assert_readable(refusal.message, raw)
        assert " - at `$" in refusal.message, refusal.message
        finish.record(decoded, time.time(), Outcome(error=refusal), take_next=False)
        (entry,) = written.dead
        assert (entry["error"], entry["errorType"], entry["job"]) == (refusal.message, "validation", jobs.loose(raw))
        return "rejected"
    run_like_a_worker(decoded, s)
    return decoded


def run_like_a_worker(d: Decoded, s: config.Settings) -> None:
    """What a worker does with a job besides the provider's answer: none of it may raise."""
    assert d.tasks and d.job.id and 0 < d.timeout <= s.worker.timeout / 1000
    assert 1 <= d.max_attempts <= s.queue.max_attempts
    d.prompt_text(), d.stream, d.model  # noqa: B018 - logs and events read them
    cache = ResponseCache(None, "llm:", 3600)  # type: ignore[arg-type] - key_of never touches Redis
    for task in d.tasks:
        cache.key_of("ollama", task)
        msgspec.json.encode(task.request)
        ollama.pinned(task.request.options, {"num_ctx": 4096})
    written = Written()
    finish = finisher(written, s)
    taken = time.time()
    finish.started(d, taken)
    answer = Answer({"message": {"role": "assistant", "content": "ok"}, "doneReason": "stop"}, d.model, 3, 4)
    finish.record(d, taken, Outcome(answer), take_next=False)
    busy = JobError("provider busy", ErrorKind.PROVIDER)
    finish.record(d, taken, Outcome(error=busy), take_next=False)  # retried, or dead when out of attempts
    probe = BreakerOpen(f"ollama:{d.model}", time.monotonic(), probe_failed=True)
    finish.record(d, taken, Outcome(error=probe), take_next=False)
    missing = JobError("model not found", ErrorKind.MODEL)
    finish.record(d, taken, Outcome(error=missing), take_next=False)  # dead at once
    assert [r["success"] for r in written.results][:1] == [True] and all(
        r["jobId"] == d.job.id for r in written.results
    )
    assert len(written.retried) + len(written.dead) == 3
    for payload in written.retried:  # a retry is taken again later: it must decode to the same job, one retry on
        _, _, job = payload.partition(b"\n") if payload.startswith(b"llm-chat\n") else (b"", b"", payload)
        if len(job) <= s.limits.max_job_bytes:
            again = jobs.decode(job, s)
            assert again.job.id == d.job.id and again.job.retry_count >= d.job.retry_count


# ---- strategies: values, valid jobs of every type, and ways to break them ----------------------

TEXT = st.text(max_size=30)
TRICKY_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\n",
        "\r\n",
        "\t",
        "\x1b[31m",
        "\u2028",
        "\ufeff",
        "\U0001f600",
        "é",
        "' - at `$.x`",
        '"',
        "\\",
        "`$",
        "Traceback (most recent call last):",
        "ValueError('x')",
        "<object at 0x1>",
        "%s%n",
        "{}",
        "null",
        "chat",
        "user",
        "json",
        "5m",
        "llama3.2",
        "a" * 300,
    ]
)
STRINGS = TEXT | TRICKY_TEXT
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 1e308, -1e308, 5e-324, 0.5, -0.0])
)
SCALARS = st.none() | st.booleans() | NUMBERS | STRINGS
FIELD_NAMES = st.sampled_from(
    [
        "id",
        "type",
        "userId",
        "request",
        "model",
        "priority",
        "correlationId",
        "createdAt",
        "timeout",
        "retryCount",
        "maxRetries",
        "messages",
        "role",
        "content",
        "images",
        "tool_calls",
        "tool_name",
        "options",
        "stream",
        "format",
        "keepAlive",
        "tools",
        "think",
        "prompt",
        "system",
        "input",
        "truncate",
        "requests",
        "temperature",
        "num_ctx",
        "stop",
        "seed",
        "mirostat",
        "probeFailures",
    ]
)
KEYS = FIELD_NAMES | TEXT
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)

ROLES = st.sampled_from(["system", "user", "assistant", "tool"])
MODELS = st.sampled_from(["llama3.2", "nomic-embed-text", "mistral:7b", "hf.co/u/r:Q4_K_M", "a"]) | st.from_regex(
    r"\A[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,40}\Z"
)
JOB_IDS = st.sampled_from(["job-1", "a", "a-Z_0.9:" * 16]) | st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z")
UNIT = st.floats(0, 1)
OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": UNIT,
        "top_k": st.integers(0, 100_000),
        "min_p": UNIT,
        "typical_p": UNIT,
        "num_predict": st.integers(-2, 16_384),
        "num_ctx": st.integers(1, 131_072),
        "num_keep": st.integers(-1, 10**6),
        "stop": st.lists(st.text(min_size=1, max_size=20), max_size=16),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "repeat_penalty": st.floats(0, 10),
        "repeat_last_n": st.integers(-1, 10**6),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "mirostat": st.sampled_from([0, 1, 2]),
        "mirostat_tau": st.floats(0, 100),
        "mirostat_eta": UNIT,
        "num_gpu": st.integers(0, 99),
        "new_knob": JSON,
    },
)
KEEP_ALIVE = st.sampled_from(["5m", "0", "-1", "1.5h", "300ms", "10s"]) | st.integers(-1, 10**6) | st.floats(-1, 1e6)
FORMAT = st.just("json") | st.dictionaries(st.text(max_size=8), JSON, max_size=3)
CALL = st.dictionaries(st.text(max_size=8), JSON, max_size=3)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES},
    optional={
        "content": TEXT,
        "images": st.lists(TEXT, max_size=2),
        "tool_calls": st.lists(CALL, max_size=2),
        "tool_name": TEXT,
        "name": TEXT,
    },
)
SHARED = {"options": OPTIONS, "keepAlive": KEEP_ALIVE}
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=4)},
    optional={
        **SHARED,
        "stream": st.booleans(),
        "format": FORMAT,
        "tools": st.lists(CALL, max_size=2),
        "think": st.booleans(),
    },
)
GENERATE = st.fixed_dictionaries(
    {"prompt": TEXT},
    optional={
        **SHARED,
        "system": TEXT,
        "stream": st.booleans(),
        "format": FORMAT,
        "images": st.lists(TEXT, max_size=2),
        "think": st.booleans(),
    },
)
EMBEDDINGS = st.fixed_dictionaries(
    {"input": TEXT | st.lists(TEXT, min_size=1, max_size=5)},
    optional={**SHARED, "truncate": st.booleans(), "stream": st.booleans(), "prompt": TEXT},
) | st.fixed_dictionaries({"prompt": TEXT}, optional=SHARED)
REQUESTS = {"chat": CHAT, "generate": GENERATE, "embeddings": EMBEDDINGS}
ITEM = st.one_of(
    *(
        st.fixed_dictionaries({"type": st.just(kind), "request": request}, optional={"model": MODELS})
        for kind, request in REQUESTS.items()
    )
)
BATCH = st.fixed_dictionaries({"requests": st.lists(ITEM, min_size=1, max_size=4)}, optional={"stream": st.booleans()})
CREATED = (
    st.datetimes(timezones=st.none() | st.just(timezone.utc)).map(lambda d: d.isoformat())
    | st.integers(0, 4 * 10**12)
    | st.floats(0, 4e12)
)
JOB_FIELDS = {
    "model": MODELS,
    "priority": st.integers(-1_000_000, 1_000_000),
    "correlationId": st.text(max_size=40),
    "createdAt": CREATED,
    "timeout": st.integers(1, 10**9),
    "retryCount": st.integers(0, 10),
    "maxRetries": st.integers(0, 10),
    "probeFailures": st.integers(0, 5),
    "futureField": JSON,
}


def job_of(kind: str, request: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"id": JOB_IDS, "type": st.just(kind), "userId": st.text(min_size=1, max_size=20), "request": request},
        optional=JOB_FIELDS,
    )


VALID_JOBS = st.one_of(*(job_of(kind, request) for kind, request in {**REQUESTS, "batch": BATCH}.items()))

# Values that break a field: any JSON, the wrong type, out of range, huge, unreadable when decoded loosely.
BAD_VALUES = JSON | st.sampled_from(
    [
        None,
        True,
        [],
        {},
        "",
        -1,
        0,
        1.5,
        2**64,
        -(2**63) - 1,
        10**30,
        1e308,
        "x" * 5000,
        ["x"] * 300,
        [[[[]]]],
        {"": None},
    ]
)


def paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value, the root excluded: keys of objects, indexes of arrays."""
    found = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        found.append((*at, key))
        found += paths(child, (*at, key))
    return found


def pointer(path: tuple[Any, ...]) -> str:
    """A path as the decoder writes it: $.request.messages[0].role."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def replaced(value: Any, path: tuple[Any, ...], new: Any, *, delete: bool = False) -> Any:
    """A copy of ``value`` with the part at ``path`` replaced by ``new`` (or deleted)."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if not rest and delete:
        del copy[head]
    elif not rest:  # the place may be new: a key the object does not have yet
        copy[head] = new
    else:
        copy[head] = replaced(copy[head], rest, new, delete=delete)
    return copy


@st.composite
def mutated_jobs(draw: st.DrawFn) -> dict[str, Any] | list[Any]:
    """A valid job with one to three of its parts replaced, deleted, wrapped, turned to text or joined by junk."""
    job: Any = draw(VALID_JOBS)
    for _ in range(draw(st.integers(1, 3))):
        places = paths(job)
        if not places:
            break
        path = draw(st.sampled_from(places))
        old = job
        for step in path:
            old = old[step]
        how = draw(st.sampled_from(["replace", "delete", "wrap", "text", "unknown", "empty"]))
        if how == "replace":
            job = replaced(job, path, draw(BAD_VALUES))
        elif how == "delete":
            job = replaced(job, path, None, delete=True)
        elif how == "wrap":
            job = replaced(job, path, draw(st.sampled_from([[old], {"value": old}])))
        elif how == "text":
            job = replaced(job, path, msgspec.json.encode(old).decode())
        elif how == "empty":
            job = replaced(job, path, type(old)() if isinstance(old, (dict, list, str)) else None)
        else:
            parent = path[:-1]
            holder = job
            for step in parent:
                holder = holder[step]
            if isinstance(holder, dict):
                job = (
                    replaced(job, (*parent, draw(KEYS)), draw(BAD_VALUES))
                    if parent
                    else {**job, draw(KEYS): draw(BAD_VALUES)}
                )
    return job


# ---- the properties ---------------------------------------------------------------------------


@fuzz(500)
@given(VALID_JOBS)
def test_valid_jobs_of_every_type_decode_and_can_be_run(job: dict[str, Any]) -> None:
    result = outcome(msgspec.json.encode(job))
    assert isinstance(result, Decoded), result
    assert result.job.id == job["id"] and len(result.tasks) == len(job["request"].get("requests", [None]))


@fuzz(600)
@given(
    st.binary(max_size=2000)
    | st.lists(
        st.sampled_from(
            [
                b"{",
                b"}",
                b"[",
                b"]",
                b",",
                b":",
                b'"id"',
                b'"job-1"',
                b'"type"',
                b'"chat"',
                b'"request"',
                b'"messages"',
                b'"role"',
                b'"user"',
                b'"userId"',
                b'"u"',
                b"null",
                b"true",
                b"1",
                b"-0",
                b"1e400",
                b"NaN",
                b'"\\ud800"',
                b'"\\u0000"',
                b"\xff",
                b"\xc3",
                b"\xef\xbb\xbf",
                b" ",
                b"\x00",
                b'"',
                b"\\",
            ]
        ),
        max_size=60,
    ).map(b"".join)
)
@example(b"")
@example(b"\xef\xbb\xbf{}")
@example(b'{"id":"job-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}]}} {}')
def test_random_bytes_are_refused_cleanly(raw: bytes) -> None:
    outcome(raw)


@fuzz(800)
@given(JSON)
def test_random_json_values_are_refused_cleanly_or_run(value: Any) -> None:
    outcome(msgspec.json.encode(value))


@fuzz(1000)
@given(mutated_jobs())
def test_mutations_of_valid_jobs_are_refused_cleanly_or_run(job: Any) -> None:
    outcome(msgspec.json.encode(job))


@fuzz(600)
@given(VALID_JOBS, st.data())
def test_byte_level_damage_to_valid_jobs_is_refused_cleanly_or_run(job: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(msgspec.json.encode(job))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(["insert", "delete", "flip", "truncate", "number", "junk-after"]))
        if how == "insert":
            raw[at:at] = data.draw(
                st.sampled_from(
                    [
                        b"\xff",
                        b"\xc3",
                        b"\x00",
                        b"\\",
                        b'"',
                        b",",
                        b"}",
                        b"]",
                        b"\\ud800",
                        b"1e400",
                        b"\xef\xbb\xbf",
                        b"\n",
                    ]
                )
            )
        elif how == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif how == "flip" and at < len(raw):
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "truncate":
            del raw[at:]
        elif how == "number":  # a number only a loose decoder chokes on, where any value is
            raw = bytearray(
                re.sub(
                    rb":(-?\d+(\.\d+)?)",
                    data.draw(st.sampled_from([b":1e400", b":-1e999", b":1" + b"0" * 40])),
                    bytes(raw),
                    count=1,
                )
            )
        else:
            raw += data.draw(st.sampled_from([b" ", b"x", b"{}", b"\x00"]))
    outcome(bytes(raw))


SLOTS = {  # where deep nesting hides, with HOLE for it
    "root": b"HOLE",
    "unknown-field": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}]},"x":HOLE}',
    "id": b'{"id":HOLE,"type":"chat"}',
    "leading-id-request": b'{"id":"deep-1","type":"chat","userId":"u","request":HOLE}',
    "request-unknown": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"x":HOLE}}',
    "content": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user","content":HOLE}]}}',
    "format": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"format":{"a":HOLE}}}',
    "tools": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"tools":[{"a":HOLE}]}}',
    "options": b'{"id":"deep-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"options":{"x":HOLE}}}',
    "batch-item": b'{"id":"deep-1","type":"batch","userId":"u","request":{"requests":[{"type":"chat","request":HOLE}]}}',
    "id-last": b'{"type":"chat","userId":"u","request":{"messages":[{"role":"user"}]},"x":HOLE,"id":"deep-1"}',
}


@fuzz(300)
@given(
    st.sampled_from(sorted(SLOTS)), st.integers(1, 3000), st.sampled_from([b"[", b'{"a":', b'[{"b":']), st.booleans()
)
@example("unknown-field", 100_000, b"[", True)
@example("root", 100_000, b'{"a":', False)
@example("format", 2000, b'{"a":', True)
def test_deep_nesting_anywhere_is_refused_cleanly_or_run(slot: str, depth: int, opener: bytes, closed: bool) -> None:
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"b":': b"}]"}[opener]
    nest = opener * depth + b"1" + (closer * depth if closed else b"")
    outcome(SLOTS[slot].replace(b"HOLE", nest), SMALL if len(nest) < 60_000 else DEFAULT)


HUGE_SLOTS = {  # where a huge string hides, with HOLE for it (a JSON string, quotes included)
    "id": b'{"id":HOLE,"type":"chat","userId":"u","request":{"messages":[{"role":"user"}]}}',
    "type": b'{"id":"huge-1","type":HOLE,"userId":"u","request":{"messages":[{"role":"user"}]}}',
    "userId": b'{"id":"huge-1","type":"chat","userId":HOLE,"request":{"messages":[{"role":"user"}]}}',
    "model": b'{"id":"huge-1","type":"chat","userId":"u","model":HOLE,"request":{"messages":[{"role":"user"}]}}',
    "correlationId": b'{"id":"huge-1","type":"chat","userId":"u","correlationId":HOLE,"request":{"messages":[{"role":"user"}]}}',
    "createdAt": b'{"id":"huge-1","type":"chat","userId":"u","createdAt":HOLE,"request":{"messages":[{"role":"user"}]}}',
    "role": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":HOLE}]}}',
    "content": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":"user","content":HOLE}]}}',
    "format": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"format":HOLE}}',
    "keepAlive": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"keepAlive":HOLE}}',
    "stop": b'{"id":"huge-1","type":"generate","userId":"u","request":{"prompt":"p","options":{"stop":[HOLE]}}}',
    "prompt": b'{"id":"huge-1","type":"generate","userId":"u","request":{"prompt":HOLE}}',
    "input": b'{"id":"huge-1","type":"embeddings","userId":"u","request":{"input":[HOLE]}}',
    "item-type": b'{"id":"huge-1","type":"batch","userId":"u","request":{"requests":[{"type":HOLE,"request":{}}]}}',
    "item-model": (
        b'{"id":"huge-1","type":"batch","userId":"u","request":{"requests":[{"type":"generate","model":HOLE,'
        b'"request":{"prompt":"p"}}]}}'
    ),
    "key": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}]},HOLE:1}',
    "mirostat": b'{"id":"huge-1","type":"chat","userId":"u","request":{"messages":[{"role":"user"}],"options":{"mirostat":HOLE}}}',
}


@fuzz(300)
@given(
    st.sampled_from(sorted(HUGE_SLOTS)), st.integers(1, 100_000), st.characters(exclude_categories=["Cs"]) | TRICKY_TEXT
)
@example("type", 2 * 1024 * 1024, "x")
@example("role", 60_000, "\n")
@example("item-type", 60_000, "é")
def test_huge_strings_anywhere_are_refused_cleanly_or_run(slot: str, size: int, text: str) -> None:
    value = msgspec.json.encode((text or "x") * (size // max(1, len(text or "x"))))
    outcome(HUGE_SLOTS[slot].replace(b"HOLE", value), SMALL if size < 200_000 else DEFAULT)


# ---- wrong types, field by field: the reason names the field's path ------------------------------

FULL_JOBS = [  # one job of each type with every field the schema knows, each with a valid value
    {
        "id": "full-1",
        "type": "chat",
        "userId": "u",
        "model": "llama3.2",
        "priority": 1,
        "correlationId": "c",
        "createdAt": "2026-11-23T15:04:05Z",
        "timeout": 1000,
        "retryCount": 0,
        "maxRetries": 1,
        "request": {
            "messages": [
                {
                    "role": "user",
                    "content": "hi",
                    "images": ["aGk="],
                    "tool_calls": [{"function": {}}],
                    "tool_name": "t",
                }
            ],
            "options": {
                "temperature": 0.5,
                "top_p": 0.9,
                "top_k": 40,
                "min_p": 0.1,
                "typical_p": 0.5,
                "num_predict": 10,
                "num_ctx": 2048,
                "num_keep": 1,
                "stop": ["END"],
                "seed": 7,
                "repeat_penalty": 1.1,
                "repeat_last_n": 64,
                "presence_penalty": 0.5,
                "frequency_penalty": 0.5,
                "mirostat": 1,
                "mirostat_tau": 5.0,
                "mirostat_eta": 0.1,
            },
            "stream": False,
            "format": "json",
            "keepAlive": "5m",
            "tools": [{"type": "function"}],
            "think": False,
        },
    },
    {
        "id": "full-2",
        "type": "generate",
        "userId": "u",
        "request": {
            "prompt": "p",
            "system": "s",
            "options": {"num_predict": 5},
            "stream": True,
            "format": {"type": "object"},
            "keepAlive": 300,
            "images": ["aGk="],
            "think": True,
        },
    },
    {
        "id": "full-3",
        "type": "embeddings",
        "userId": "u",
        "request": {"input": ["a", "b"], "options": {"seed": 1}, "keepAlive": 1.5, "truncate": True, "stream": False},
    },
    {
        "id": "full-4",
        "type": "batch",
        "userId": "u",
        "model": "llama3.2",
        "request": {
            "stream": False,
            "requests": [
                {"type": "chat", "model": "llama3.2", "request": {"messages": [{"role": "user", "content": "a"}]}},
                {"type": "generate", "request": {"prompt": "b"}},
                {"type": "embeddings", "model": "nomic-embed-text", "request": {"prompt": "c"}},
            ],
        },
    },
]
WRONG = [None, True, 7, 1.5, "x", [], [1], {}, {"k": 1}]
FREE_FORM = ("format", "tool_calls", "tools")  # objects of any content: only their own type is checked


def json_type(value: Any) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


@pytest.mark.parametrize("job", FULL_JOBS, ids=lambda j: j["type"])
def test_a_field_of_the_wrong_type_is_refused_naming_its_path(job: dict[str, Any]) -> None:
    assert isinstance(outcome(msgspec.json.encode(job)), Decoded)
    for path in paths(job):
        old = job
        for step in path:
            old = old[step]
        inside_free_form = any(part in FREE_FORM for part in path[:-1] if isinstance(part, str))
        for value in WRONG:
            if json_type(value) == json_type(old) or inside_free_form:
                continue
            raw = msgspec.json.encode(replaced(job, path, value))
            result = outcome(raw)
            if isinstance(result, Decoded):
                continue  # an optional field set to null, a number where an int is allowed, ...
            reason = str(re.sub(r"^not a job( object)?: ", "", _reason(raw)))
            where = pointer(path)
            if value is None and path[-1] == "prompt" and "embeddings request has no input" in reason:
                continue  # a null prompt is an absent one: the request then has no input, which the reason says
            assert f"`{where}`" in reason or f"`{where}." in reason or f"`{where}[" in reason, (where, value, reason)


def _reason(raw: bytes) -> str:
    try:
        decoded = jobs.decode(raw, DEFAULT)
    except (Malformed, Invalid) as refusal:
        return refusal.reason
    try:
        limits.check(decoded, DEFAULT)
    except RequestRejected as refusal:
        return refusal.message
    raise AssertionError("not refused")
