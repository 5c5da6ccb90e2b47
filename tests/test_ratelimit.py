"""Rate limits: the provider's 429 waited out without spending attempts, and the host's budgets per provider.

Real parts: a private redis-server, ``llm-worker run`` as a real process tree,
an OpenAI-compatible server over real HTTP (a small one in this process, which
answers as each test scripts it), forked processes sharing one budget.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
import redis
import urllib3
from support import chat, client_for, events, eventually, wait_all

from llm_worker import exitcodes
from llm_worker.host.layout import MAX_PROVIDERS, RATE_BUCKETS
from llm_worker.host.ratelimit import (
    DEFAULT_COMPLETION,
    OverBudget,
    RateLimits,
    estimate_tokens,
    find_row,
    snapshot,
    window,
)
from llm_worker.host.shm import SharedState
from llm_worker.plugin import RateLimited, retry_after_seconds
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.plugin.ratelimit import reset_seconds, wait_from_headers
from llm_worker.protocol.jobs import ChatRequest, EmbeddingsRequest, ErrorKind, Task
from llm_worker.settings.config import SettingError, load
from llm_worker.workerproc.ratewait import MIN_WAIT, RETRY_AFTER_JITTER, gave_up, rate_wait

MODEL = "openai:gpt-test"

# ---- reading what a 429 asks ---------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_800_000_000.0
    assert retry_after_seconds("2", now) == 2.0
    assert retry_after_seconds(" 1.5 ", now) == 1.5  # not RFC 9110's, but OpenAI's own client takes it
    assert retry_after_seconds(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after_seconds(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0  # over already
    assert retry_after_seconds("-3", now) == 0.0
    for nothing in (None, "", "soon", "Wed, 99 Foo 2015", "nan"):
        assert retry_after_seconds(nothing, now) is None, nothing


def test_reset_headers_are_go_durations() -> None:
    assert [reset_seconds(v) for v in ("1s", "6m0s", "20ms", "1h2m3.5s", "0.5s", "1m30s")] == [
        1.0,
        360.0,
        0.02,
        3723.5,
        0.5,
        90.0,
    ]
    assert [reset_seconds(v) for v in (None, "", "6 minutes", "1x", "s")] == [None] * 5


def test_a_429s_wait_prefers_retry_after_ms_then_retry_after_then_the_spent_limits_reset() -> None:
    now = time.time()

    def wait(**headers: str) -> float | None:
        return wait_from_headers({k.replace("_", "-"): v for k, v in headers.items()}.get, now)

    assert wait(retry_after_ms="250", retry_after="3") == 0.25
    assert wait(retry_after="3", x_ratelimit_reset_requests="1s") == 3.0
    resets = {"x_ratelimit_reset_requests": "1s", "x_ratelimit_reset_tokens": "6m0s"}
    assert wait(**resets, x_ratelimit_remaining_requests="0", x_ratelimit_remaining_tokens="900") == 1.0
    assert wait(**resets, x_ratelimit_remaining_requests="3", x_ratelimit_remaining_tokens="0") == 360.0
    assert wait(**resets) == 360.0  # which ran out is not said: the longer
    assert wait() is None


# ---- the estimate -------------------------------------------------------------------------------------


def _chat(text: str, **options: Any) -> Task:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if options:
        body["options"] = options
    return Task("chat", MODEL, msgspec.convert(body, ChatRequest))


def test_tokens_are_estimated_from_the_prompts_characters_and_the_answers_cap() -> None:
    assert estimate_tokens(_chat("x" * 400, num_predict=100)) == 100 + 100
    assert estimate_tokens(_chat("x" * 401)) == 101 + DEFAULT_COMPLETION
    assert estimate_tokens(_chat("x" * 8, num_predict=-1)) == 2 + DEFAULT_COMPLETION  # -1: no limit
    embed = Task("embeddings", "e", msgspec.convert({"input": ["a" * 40, "b" * 40]}, EmbeddingsRequest))
    assert estimate_tokens(embed) == 20


# ---- the budget in shared memory ------------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves: ``sleep`` moves it."""

    def __init__(self, now: float = 5_000.25) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limits(state: SharedState, clock: Clock | None = None, **env: str) -> RateLimits:
    settings = load(env).settings
    if clock is None:
        return RateLimits(state, settings)
    return RateLimits(state, settings, clock=clock, sleep=clock.sleep)


def test_a_budget_of_n_calls_admits_n_then_refuses_with_the_time_until_the_oldest_call_leaves() -> None:
    clock = Clock()
    budget = limits(SharedState(2), clock, RATE_LIMIT_RPM="openai=3")
    for _ in range(3):
        budget.admit("openai", MODEL, 10, Deadline(10))
        clock.now += 1.0
    with pytest.raises(OverBudget) as refused:
        budget.admit("openai", MODEL, 10, Deadline(10))  # may wait 5 s at most: half its time
    # The first call's second (5000) leaves the 61-second window at 5061; it is 5003.25 now.
    assert refused.value.retry_after == pytest.approx(5061 - 5003.25)
    assert (refused.value.kind.value, refused.value.counted, refused.value.status) == ("rate_limit", False, None)
    assert "3 calls in the last minute, RPM 3" in refused.value.message
    assert clock.slept == []  # refused without waiting: the wait would not fit
    assert budget.admit("ollama", "llama3.2", 10, Deadline(10)).row is not None  # another provider: no budget


def test_a_call_waits_on_the_host_while_the_wait_leaves_the_job_half_its_time() -> None:
    clock = Clock()
    state = SharedState(2)
    budget = limits(state, clock, RATE_LIMIT_RPM="openai=2")
    budget.admit("openai", MODEL, 1, Deadline(600))
    budget.admit("openai", MODEL, 1, Deadline(600))
    started = clock.now
    beats: list[float] = []
    budget.admit("openai", MODEL, 1, Deadline(600), beat=lambda: beats.append(clock.now))
    assert clock.now >= int(started) + RATE_BUCKETS  # admitted once the first calls' second left the window
    assert len(beats) == len(clock.slept) and max(clock.slept) <= 0.5  # the heartbeat kept fresh meanwhile
    row = find_row(state.ratelimits, "openai")
    assert row is not None and (row.waits, round(row.wait_seconds)) == (1, round(clock.now - started))


def test_no_sixty_second_span_ever_holds_more_than_the_budget() -> None:
    # Given calls arriving at random, fractional times over five minutes, each refused when it does not fit
    clock = Clock(10_000.7)
    budget = limits(SharedState(2), clock, RATE_LIMIT_RPM="openai=20")
    rng = random.Random(7)
    admitted: list[float] = []
    while clock.now < 10_300:
        clock.now += rng.expovariate(1.5)
        try:
            budget.admit("openai", MODEL, 1, Deadline(0.001))
        except OverBudget:
            continue
        admitted.append(clock.now)
    # Then no window of 60 seconds, wherever it starts, holds more than 20 of them
    assert max(sum(1 for t in admitted if start <= t < start + 60) for start in admitted) <= 20
    # and the budget is used: about 20 a minute (one window in 61 s), not far fewer
    assert len(admitted) >= 20 * 300 / 61 - 20


def test_tokens_are_counted_at_the_estimate_then_settled_at_what_the_provider_used() -> None:
    clock = Clock()
    state = SharedState(2)
    budget = limits(state, clock, RATE_LIMIT_TPM="openai=1000")
    with budget.call("openai", _chat("x" * 400, num_predict=500), Deadline(10)) as ticket:
        assert ticket.tokens == 600
        ticket.used = 150  # the provider's usage
    row = find_row(state.ratelimits, "openai")
    assert row is not None and sum(b[2] for b in window(row, int(clock.now))) == 150
    with pytest.raises(OverBudget, match="150 \\+ 900 tokens in a minute, TPM 1000"):
        budget.admit("openai", MODEL, 900, Deadline(1))
    # A call estimated over the whole budget goes once the window is empty, rather than never.
    clock.now += RATE_BUCKETS
    assert budget.admit("openai", MODEL, 50_000, Deadline(1)).tokens == 1000


def test_a_providers_429_holds_the_models_calls_back_as_long_as_it_asked() -> None:
    clock = Clock()
    state = SharedState(2)
    budget = limits(state, clock)  # no budget at all: the provider's word is enough
    with pytest.raises(RateLimited), budget.call("openai", _chat("hi"), Deadline(100)):
        raise RateLimited("POST /chat/completions: Rate limit reached", retry_after=4.0)
    with pytest.raises(OverBudget, match="answered 429"):
        budget.admit("openai", MODEL, 1, Deadline(2))  # 4 s would take more than half its time
    budget.admit("openai", "openai:other-model", 1, Deadline(2))  # another model's limit is its own
    started = clock.now
    budget.admit("openai", MODEL, 1, Deadline(100))  # this one can wait
    assert clock.now - started == pytest.approx(4.0)
    row = find_row(state.ratelimits, "openai")
    assert row is not None and (row.refusals, sum(row.limited)) == (1, 2)  # the 429, and the refusal after it


def test_the_budget_is_shared_by_forked_processes_which_never_exceed_it_together() -> None:
    # Given one shared budget of 25 calls a minute and four processes forked after it was made
    state = SharedState(8)
    per_process: list[int] = []
    readers = []
    for _ in range(4):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: take every call the budget allows for a second and a half
            code = 1
            try:
                os.close(read)
                budget = limits(state, RATE_LIMIT_RPM="openai=25")
                taken, until = 0, time.monotonic() + 1.5
                while time.monotonic() < until:
                    try:
                        budget.admit("openai", MODEL, 1, Deadline(0.01))
                        taken += 1
                    except OverBudget:
                        time.sleep(0.001)
                os.write(write, str(taken).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        readers.append((pid, read))
    for pid, read in readers:
        with os.fdopen(read) as pipe:
            per_process.append(int(pipe.read() or -1))
        assert os.waitpid(pid, 0)[1] == 0
    # Then they took 25 calls together, no more, and each process had its share of the race
    assert sum(per_process) == 25, per_process
    row = find_row(state.ratelimits, "openai")
    assert row is not None and sum(b[1] for b in window(row, int(time.monotonic()))) == 25


def test_status_shows_each_budget_and_its_room() -> None:
    state = SharedState(2)
    settings = load({"RATE_LIMIT_RPM": "openai=10", "RATE_LIMIT_TPM": "openai=5000,anthropic=100"}).settings
    budget = RateLimits(state, settings)
    with budget.call("openai", _chat("x" * 40, num_predict=90), Deadline(10)) as ticket:
        ticket.used = 70
    rows = {row["provider"]: row for row in snapshot(state, settings)}
    assert rows["openai"] | {"waitSeconds": 0} == {
        "provider": "openai",
        "rpm": 10,
        "tpm": 5000,
        "callsLastMinute": 1,
        "tokensLastMinute": 70,
        "callsLeft": 9,
        "tokensLeft": 4930,
        "heldSeconds": {},
        "rateLimited": 0,
        "providerRefusals": 0,
        "waits": 0,
        "waitSeconds": 0,
    }
    assert rows["anthropic"]["tokensLeft"] == 100  # a budget no call used yet is shown too


# ---- settings and the wait's bound ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["openai", "openai=0", "openai=-5", "open ai=3", "openai=1,openai=2", "a=x"])
def test_a_budget_of_another_shape_is_refused_naming_the_variable_and_what_it_takes(value: str) -> None:
    with pytest.raises(SettingError) as refused:
        load({"RATE_LIMIT_RPM": value})
    assert str(refused.value).startswith(f"RATE_LIMIT_RPM={value!r}: expected comma-separated provider=limit pairs")


def test_budgets_for_more_providers_than_the_shared_table_holds_are_refused() -> None:
    many = ",".join(f"p{i}=5" for i in range(MAX_PROVIDERS + 1))
    with pytest.raises(SettingError, match=f"budgets for at most {MAX_PROVIDERS} providers"):
        load({"RATE_LIMIT_TPM": many})


def test_a_rate_limited_job_waits_as_asked_until_its_waits_would_pass_the_bound() -> None:
    settings = load({"RATE_LIMIT_MAX_WAIT": "10000", "QUEUE_DELAY": "2000"}).settings
    first = rate_wait({}, RateLimited("429", retry_after=3.0), settings)
    # Counted as asked; waited up to a tenth more, at random, so that jobs refused together do not return so.
    assert first is not None and first.fields() == {"rateLimits": 1, "rateLimitedMs": 3000}
    assert 3.0 <= first.seconds <= 3.0 * (1 + RETRY_AFTER_JITTER)
    short = rate_wait({"rateLimits": 1}, RateLimited("429", retry_after=0.02), settings)
    assert short is not None and MIN_WAIT <= short.seconds <= MIN_WAIT * (1 + RETRY_AFTER_JITTER)
    # Unsaid: the retry backoff, QUEUE_DELAY doubled per rate limit, half of it random.
    unsaid = rate_wait({"rateLimits": 2, "rateLimitedMs": 1000}, RateLimited("429"), settings)
    assert unsaid is not None and 4.0 <= unsaid.seconds <= 8.0 and unsaid.count == 3
    job = {"rateLimits": 3, "rateLimitedMs": 8000}
    assert rate_wait(job, RateLimited("429", retry_after=2.0), settings) is not None  # 10000: the bound itself
    assert rate_wait(job, RateLimited("429", retry_after=2.5), settings) is None
    assert "rate limited 4 times, 8 s of waiting already" in gave_up(job, RateLimited("429"), settings)
    never = load({"RATE_LIMIT_MAX_WAIT": "0"}).settings
    assert rate_wait({"rateLimitedMs": "forged"}, RateLimited("429", retry_after=1), never) is None


# ---- the service, against an OpenAI-compatible server that rate limits ------------------------------------


class FakeOpenAI:
    """An OpenAI-compatible /v1 over real HTTP that answers each chat call as ``script`` says, then 200."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = []  # (status, headers) of the next answers
        self.calls: list[tuple[float, str]] = []  # (monotonic time, model) of each chat call
        self.always: tuple[int, dict[str, str]] | None = None
        self.error_type = "requests"  # the type of a 429's error (OpenAI's error object)
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {}, {"data": [{"id": "gpt-test"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with fake.lock:
                    fake.calls.append((time.monotonic(), body.get("model", "")))
                    status, headers = fake.always or (fake.script.pop(0) if fake.script else (200, {}))
                if status == 429:
                    error = {"message": "Rate limit reached for requests", "type": fake.error_type}
                    self._send(429, headers, {"error": error})
                    return
                message = {"role": "assistant", "content": "hi"}
                answer = {
                    "model": body.get("model", ""),
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
                }
                self._send(200, {}, answer)

            def _send(self, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.mark.parametrize(
    "headers, wait",
    [
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({}, None),
    ],
    ids=["retry-after", "retry-after-ms", "reset-requests", "unsaid"],
)
@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_the_built_in_providers_raise_a_429_as_rate_limited_with_the_wait_it_asks(
    fake_openai: FakeOpenAI, provider: str, headers: dict[str, str], wait: float | None
) -> None:
    from llm_worker.plugins.ollama import OllamaProvider
    from llm_worker.plugins.openai import OpenAIProvider

    base = fake_openai.url.removesuffix("/v1")
    settings = load({"OPENAI_BASE_URL": fake_openai.url, "OLLAMA_BASE_URL": base}).settings
    made = OpenAIProvider(settings) if provider == "openai" else OllamaProvider(settings)
    fake_openai.always = (429, headers)
    try:
        with pytest.raises(RateLimited) as caught:
            made.chat(made.name + ":gpt-test", _chat("hi").request, Deadline(10), None)  # type: ignore[arg-type]
    finally:
        made.close()
    assert caught.value.retry_after == wait and caught.value.status == 429
    assert len(fake_openai.calls) == 1  # not retried within the call: the job waits, in the delayed set


def test_a_429_that_says_the_account_is_out_of_quota_is_a_provider_error_never_retried(
    fake_openai: FakeOpenAI,
) -> None:
    # Waiting does not lift a billing refusal: parked for each Retry-After, the job would call again and
    # again until RATE_LIMIT_MAX_WAIT, every worker alike (OpenAI's error codes guide: insufficient_quota).
    from llm_worker.plugins.openai import OpenAIProvider

    made = OpenAIProvider(load({"OPENAI_BASE_URL": fake_openai.url}).settings)
    fake_openai.always = (429, {"Retry-After": "1"})
    fake_openai.error_type = "insufficient_quota"
    try:
        with pytest.raises(ProviderError) as caught:
            made.chat("openai:gpt-test", _chat("hi").request, Deadline(10), None)  # type: ignore[arg-type]
    finally:
        made.close()
    assert not isinstance(caught.value, RateLimited)
    assert (caught.value.status, caught.value.retryable, caught.value.kind) == (429, False, ErrorKind.PROVIDER)


def start(service: Any, fake: FakeOpenAI, **env: str) -> Any:
    return service(OPENAI_BASE_URL=fake.url, WORKER_POOLS="llm-chat=2", **env)


def metric(svc: Any, line_start: str) -> float:
    text = urllib3.request("GET", svc.url + "/metrics").data.decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    assert len(values) == 1, (line_start, values)
    return values[0]


def test_a_429_with_retry_after_parks_the_job_that_long_without_spending_an_attempt(
    service: Any, fake_openai: FakeOpenAI, redis_url: str, r: redis.Redis
) -> None:
    # Given a provider that answers the first call 429 "Retry-After: 2", and a fallback model on it
    svc = start(service, fake_openai, FALLBACK_MODELS="openai:gpt-fallback", QUEUE_MAX_ATTEMPTS="3")
    fake_openai.script = [(429, {"Retry-After": "2"})]
    client = client_for(redis_url)
    # When a job runs
    submitted = time.monotonic()
    job = chat(client, model=MODEL)
    result = wait_all(client, [job], timeout=30)[job]
    answered = time.monotonic()
    # Then it is answered after waiting as asked, by its own model, with no attempt spent
    assert result["success"] is True and result["model"] == "gpt-test"
    assert result["retryCount"] == 0 and result["fallbackUsed"] is False
    assert answered - submitted >= 1.9
    assert [model for _, model in fake_openai.calls] == ["gpt-test", "gpt-test"]  # no fallback was tried
    assert fake_openai.calls[1][0] - fake_openai.calls[0][0] >= 1.9
    # and the event says so, the breaker did not count it, and the counters did
    (retried,) = events(r, "llm.request.retried")
    assert (retried["errorType"], retried["retryCount"], retried["rateLimits"]) == ("rate_limit", 0, 1)
    # delayMs: as asked, and up to a tenth more at random (jobs refused together do not return together).
    assert 1900 <= retried["delayMs"] <= 2300 and retried["rateLimitedMs"] == 2000
    status, body = svc.get("/status")
    assert status == 200
    assert all(row["state"] == "closed" and row["consecutiveFailures"] == 0 for row in body["breakers"])
    (openai,) = [row for row in body["rateLimits"] if row["provider"] == "openai"]
    assert (openai["providerRefusals"], openai["rateLimited"]) == (1, 1)
    assert metric(svc, f'llm_worker_rate_limited_total{{model="{MODEL}",provider="openai"}}') == 1
    assert metric(svc, 'llm_worker_rate_limit_refusals_total{provider="openai"}') == 1
    assert metric(svc, f'llm_worker_breaker_opened_total{{model="{MODEL}",provider="openai"}}') == 0


def test_a_job_rate_limited_past_the_bound_fails_with_rate_limit_and_a_dead_letter(
    service: Any, fake_openai: FakeOpenAI, redis_url: str, r: redis.Redis
) -> None:
    # Given a provider that answers every call 429 "Retry-After: 1", and jobs that may wait 2.5 s in all
    start(service, fake_openai, RATE_LIMIT_MAX_WAIT="2500")
    fake_openai.always = (429, {"Retry-After": "1"})
    client = client_for(redis_url)
    submitted = time.monotonic()
    job = chat(client, model=MODEL)
    result = wait_all(client, [job], timeout=30)[job]
    # Then it waited twice (2 s), and the third 429 would have taken it past 2.5 s: it fails, answered
    assert time.monotonic() - submitted >= 1.9
    assert len(fake_openai.calls) == 3
    assert (result["success"], result["errorType"], result["retryCount"]) == (False, "rate_limit", 0)
    assert "RATE_LIMIT_MAX_WAIT (2500 ms)" in result["error"]
    (dead,) = [json.loads(entry) for entry in r.lrange("llm-dead-letter", 0, -1)]
    assert (dead["errorType"], dead["job"]["id"], dead["job"]["rateLimitedMs"]) == ("rate_limit", job, 2000)
    # (events follow the outcome they report: the last ones may land just after the result)
    told = ["llm.request.retried", "llm.request.retried", "llm.request.failed", "llm.request.dead_lettered"]
    eventually(lambda: [e["type"] for e in events(r) if e["type"] != "llm.request.started"] == told, what="events")


def test_an_rpm_budget_of_n_lets_n_calls_out_in_a_minute_and_refuses_the_rest(
    service: Any, fake_openai: FakeOpenAI, redis_url: str, r: redis.Redis
) -> None:
    # Given a budget of 4 calls a minute, and jobs that can wait neither on the host (a 4 s timeout:
    # the window opens again in a minute) nor in the delayed set (RATE_LIMIT_MAX_WAIT 1 s)
    svc = start(service, fake_openai, RATE_LIMIT_RPM="openai=4", RATE_LIMIT_MAX_WAIT="1000")
    client = client_for(redis_url)
    # When ten jobs come at once
    jobs = [chat(client, model=MODEL, timeout=4000) for _ in range(10)]
    results = wait_all(client, jobs, timeout=60)
    # Then the provider saw four calls, and the other six failed with rate_limit, never sent
    assert len(fake_openai.calls) == 4
    assert sorted(res["success"] for res in results.values()) == [False] * 6 + [True] * 4
    refused = [res for res in results.values() if not res["success"]]
    assert all(res["errorType"] == "rate_limit" and "RPM 4" in res["error"] for res in refused)
    assert all(res["retryCount"] == 0 for res in results.values())
    status, body = svc.get("/status")
    (openai,) = [row for row in body["rateLimits"] if row["provider"] == "openai"]
    assert (openai["rpm"], openai["callsLastMinute"], openai["callsLeft"], openai["rateLimited"]) == (4, 4, 0, 6)
    assert metric(svc, 'llm_worker_rate_limit_remaining{kind="calls",provider="openai"}') == 0
    assert metric(svc, 'llm_worker_rate_limit_per_minute{kind="calls",provider="openai"}') == 4
    assert metric(svc, f'llm_worker_rate_limited_total{{model="{MODEL}",provider="openai"}}') == 6
    assert metric(svc, 'llm_worker_rate_limit_refusals_total{provider="openai"}') == 0  # the host kept under it


def test_a_stream_already_shown_is_not_silently_delayed_it_fails_with_rate_limit(
    service: Any, redis_url: str, r: redis.Redis
) -> None:
    # Given a provider that streams a piece of its answer, then is rate limited
    service(LLM_WORKER_PLUGINS="testplugins_ratelimit", WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    job = client.submit(
        "chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, model="ratelimit-midstream"
    )
    result = wait_all(client, [job], timeout=30)[job]
    # Then the reader, who saw "Hello", is told it ended: the job failed, as failures after text do
    assert (result["success"], result["errorType"]) == (False, "rate_limit")
    entries = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(f"llm:stream:{job}")]
    assert [e["event"] for e in entries] == ["chunk", "error"] and entries[0]["content"] == "Hello"
    eventually(lambda: r.llen("llm-dead-letter") == 1, what="the dead letter")
    assert not r.zcard("llm:delayed")


def test_a_budget_for_a_provider_the_host_lacks_stops_start_up_naming_those_it_has(tmp_path: Any) -> None:
    # A typo would limit nothing while the operator believes the host is kept under its limit.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "HOME": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:1/0",  # a run that wrongly starts fails fast
        "RATE_LIMIT_RPM": "ollama=100,opnai=500",
    }
    run = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == exitcodes.USAGE, run.stderr
    assert "RATE_LIMIT_RPM='ollama=100,opnai=500'" in run.stderr and "'opnai'" in run.stderr
    assert "ollama" in run.stderr.split("expected", 1)[1]


def test_a_call_is_counted_at_the_answer_cap_its_provider_will_send() -> None:
    # Anthropic requires max_tokens: without num_predict it sends ANTHROPIC_MAX_TOKENS (4096), and thinking's
    # budget on top; counting such a call at 256 would let a minute's calls overshoot the TPM budget.
    from llm_worker.plugins.anthropic import AnthropicProvider, AnthropicSettings

    provider = AnthropicProvider(AnthropicSettings(api_key="k"))
    plain = _chat("hi")
    thinking = Task("chat", MODEL, msgspec.structs.replace(plain.request, think="high"))
    prompt = estimate_tokens(plain) - DEFAULT_COMPLETION
    assert estimate_tokens(plain, provider.answer_cap) == prompt + 4096
    assert estimate_tokens(thinking, provider.answer_cap) > prompt + 4096
    provider.close()
