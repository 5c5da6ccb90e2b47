"""The command line as a user runs it: real `python -m llm_worker.cli` processes, real Redis, a running service."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from support import client_for, eventually

from llm_worker.devtools.simulator import Fault, Simulator
from llm_worker.settings import config

TESTS = Path(__file__).parent
REPLY = "Why is the sky blue? 6 7 8 9 10 11 12"  # the simulator echoes the prompt, then counts to 12
DEAD = "llm-dead-letter"
# What the user's shell may have set must not leak into a test: only what the test says counts.
OURS = {d.env for d in config.declarations()} | {"LLM_WORKER_PLUGINS", "LLM_WORKER_DISABLE_PLUGINS"}

Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def cli(redis_url: str) -> Cli:
    """Run ``llm-worker ARGS`` against this test's Redis; env vars given as keywords, stdin as text."""

    def run(*args: str, stdin: str = "", timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in OURS}
        environ["REDIS_URL"] = redis_url
        environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))  # testplugins
        environ.update(env)
        return subprocess.run(
            [sys.executable, "-m", "llm_worker.cli", *args],
            env=environ,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port that refuses connections: bound, never listening."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


def result_of(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    return msgspec.json.decode(proc.stdout)


def counts(stdout: str) -> dict[str, int]:
    """``queues``' lines as {name: count}."""
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(.+?)\s+(\d+) (?:waiting|waiting to retry|dead letters|in hand)", line)
        assert match, f"unexpected line {line!r}"
        found[match.group(1)] = int(match.group(2))
    return found


def dead_job(job_id: str, queue: str = "llm-chat") -> bytes:
    return msgspec.json.encode(
        {
            "job": {"id": job_id, "type": "chat", "userId": "u", "model": "llama3.2", "request": {}},
            "queue": queue,
            "error": "boom",
            "errorType": "model",
            "failedAt": "2026-01-01T00:00:00.000Z",
            "attempts": 1,
            "workerId": "w:1",
        }
    )


def no_traceback(proc: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


# ---- submit -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, check",
    [
        (
            ["--type", "chat", "--model", "llama3.2", "--prompt", "Why is the sky blue?"],
            lambda r: (
                r["response"]["message"] == {"role": "assistant", "content": REPLY}
                and r["response"]["doneReason"] == "stop"
            ),
        ),
        (
            ["--type", "generate", "--model", "llama3.2", "--prompt", "Once upon a time", "--system", "be brief"],
            lambda r: r["response"]["response"] == "Once upon a time 5 6 7 8 9 10 11 12" and r["promptTokens"] == 6,
        ),
        (
            ["--type", "embeddings", "--model", "nomic-embed-text", "--input", "a", "--input", "b c"],
            lambda r: [len(v) for v in r["response"]["embeddings"]] == [16, 16] and r["promptTokens"] == 3,
        ),
        # Options reach Ollama: num_predict cuts the reply short there.
        (
            [
                "--model",
                "llama3.2",
                "--prompt",
                "Why is the sky blue?",
                "--option",
                "temperature=0",
                "--option",
                "num_predict=3",
            ],
            lambda r: (
                r["response"]["message"]["content"] == "Why is the"
                and r["response"]["doneReason"] == "length"
                and r["completionTokens"] == 3
            ),
        ),
    ],
    ids=["chat", "generate", "embeddings", "chat-options"],
)
def test_submit_prints_the_result_json_and_exits_0(
    service, cli: Cli, args: list[str], check: Callable[[dict], bool]
) -> None:
    service(WORKER_POOLS="llm-chat=1,llm-embeddings=1")
    proc = cli("submit", *args, "--wait", "60")
    assert proc.returncode == 0, proc.stderr
    result = result_of(proc)
    assert result["success"] is True and result["error"] is None
    assert check(result), result


def test_submit_stream_prints_the_text_as_it_streams_and_exits_0(service, cli: Cli, r: redis.Redis) -> None:
    service(WORKER_POOLS="llm-chat=1")
    proc = cli("submit", "--model", "llama3.2", "--prompt", "Why is the sky blue?", "--stream", "--wait", "60")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == REPLY + "\n"  # the text alone, not the result JSON
    [stream_key] = r.keys("llm:stream:*")
    entries = [fields for _, fields in r.xrange(stream_key)]
    assert b"".join(e[b"content"] for e in entries if e[b"event"] == b"chunk").decode() == REPLY
    assert entries[-1] == {b"event": b"done"}


def test_submit_of_a_job_that_fails_exits_1_with_its_failure_result(service, cli: Cli) -> None:
    service(WORKER_POOLS="llm-chat=1")
    proc = cli("submit", "--model", "missing-model", "--prompt", "hello", "--wait", "60")
    assert proc.returncode == 1, proc.stderr
    result = result_of(proc)
    assert result["success"] is False and result["errorType"] == "model"
    assert "missing-model" in result["error"] and "not found" in result["error"]

    streamed = cli("submit", "--model", "missing-model", "--prompt", "hello", "--stream", "--wait", "60")
    assert streamed.returncode == 1 and "failed: model:" in streamed.stderr and "not found" in streamed.stderr
    assert no_traceback(streamed)


def test_submit_no_wait_prints_only_the_job_id_of_the_job_it_queued(cli: Cli, r: redis.Redis) -> None:
    proc = cli(
        "submit",
        "--model",
        "llama3.2",
        "--prompt",
        "hi",
        "--system",
        "be brief",
        "--no-wait",
        "--option",
        "temperature=0",
        "--option",
        "num_predict=3",
        "--option",
        'stop=["x"]',
        "--correlation-id",
        "corr-7",
        "--timeout-ms",
        "5000",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", job_id) and proc.stdout == job_id + "\n"
    [queued] = [msgspec.json.decode(raw) for raw in r.lrange("llm-chat", 0, -1)]
    assert queued["id"] == job_id and queued["type"] == "chat" and queued["model"] == "llama3.2"
    assert queued["request"] == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"temperature": 0, "num_predict": 3, "stop": ["x"]},
    }
    assert (queued["correlationId"], queued["timeout"]) == ("corr-7", 5000)


def test_an_option_value_that_is_not_json_is_no_traceback(cli: Cli) -> None:
    proc = cli("submit", "--model", "llama3.2", "--prompt", "hi", "--no-wait", "--option", "stop=now")
    assert no_traceback(proc), proc.stderr
    assert proc.returncode in (0, 2)  # sent as text, or refused with a message


# ---- queues ---------------------------------------------------------------------------


def test_queues_prints_the_depth_of_every_queue_the_delayed_set_and_dead_letters(cli: Cli, r: redis.Redis) -> None:
    r.lpush("llm-chat", "a", "b")
    r.lpush("llm-priority", "c", "d", "e")
    r.zadd("llm:delayed", {"x": 1, "y": 2})
    r.lpush(DEAD, dead_job("gone"))
    r.lpush("llm:processing:host-a:4711", "held")
    proc = cli("queues")
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == {
        "llm-chat": 2,
        "llm-embeddings": 0,
        "llm-batch": 0,
        "llm-priority": 3,
        "llm:delayed": 2,
        DEAD: 1,
        "processing host-a:4711": 1,
    }


def test_queues_follows_the_configured_names(cli: Cli, r: redis.Redis) -> None:
    r.lpush("my-chat", "a")
    r.lpush("extra", "b", "c")
    r.zadd("app:delayed", {"x": 1})
    r.lpush("my-dead", dead_job("gone"))
    proc = cli(
        "queues",
        "depths",
        QUEUE_CHAT_NAME="my-chat",
        WORKER_POOLS="my-chat=1,extra=1",
        QUEUE_EXTRA_NAMES="extra",
        REDIS_KEY_PREFIX="app:",
        DEAD_LETTER_QUEUE_NAME="my-dead",
    )
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == {
        "my-chat": 1,
        "llm-embeddings": 0,
        "llm-batch": 0,
        "llm-priority": 0,
        "extra": 2,
        "app:delayed": 1,
        "my-dead": 1,
    }


def test_queues_dead_lists_what_workers_dead_lettered(service, cli: Cli, r: redis.Redis, redis_url: str) -> None:
    service(WORKER_POOLS="llm-chat=1")
    r.lpush("llm-chat", b"this is not json")
    job_id = client_for(redis_url).submit(
        "chat", {"messages": [{"role": "user", "content": "hi"}]}, model="missing-model"
    )
    eventually(lambda: r.llen(DEAD) == 2, timeout=30, what="both payloads dead-lettered")

    proc = cli("queues", "dead")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    [job_line] = [line for line in lines if job_id in line]
    assert re.match(r"\d{4}-\d\d-\d\dT", job_line) and " model " in job_line and "not found" in job_line
    [raw_line] = [line for line in lines if "(not a job)" in line]
    assert " validation " in raw_line and "not JSON" in raw_line
    assert len(cli("queues", "dead", "--limit", "1").stdout.splitlines()) == 1


def test_queues_requeue_moves_dead_jobs_back_and_clears_their_old_results(
    service, cli: Cli, r: redis.Redis, redis_url: str, sim: Simulator
) -> None:
    # Given two jobs that failed for good (Ollama said not found) and a payload that was never a job
    sim.set_faults([Fault(reason="not_found", count=2)])
    svc = service(WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    first, second = (
        client.submit(
            "chat", {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}, model="llama3.2", job_id=name
        )
        for name in ("job-first", "job-second")
    )
    r.lpush("llm-chat", b"{not json")
    eventually(lambda: r.llen(DEAD) == 3, timeout=30, what="three dead letters")
    assert client.result(first)["errorType"] == "model" and client.result(second)["errorType"] == "model"
    svc.stop()  # nothing takes the requeued jobs before we look at the queue

    # When one is requeued by id
    proc = cli("queues", "requeue", first)
    # Then it is back in its queue, afresh, and its failure result is gone
    assert (proc.returncode, proc.stdout) == (0, "requeued 1 job(s)\n"), proc.stderr
    [queued] = [msgspec.json.decode(raw) for raw in r.lrange("llm-chat", 0, -1)]
    assert queued["id"] == first and queued["retryCount"] == 0
    assert not r.exists(f"llm:result:{first}", f"llm:done:{first}")
    assert r.exists(f"llm:result:{second}") and r.llen(DEAD) == 2

    unknown = cli("queues", "requeue", "no-such-job")
    assert (unknown.returncode, unknown.stdout) == (1, "requeued 0 job(s)\n")
    assert f"no dead letter of job 'no-such-job' in {DEAD}" in unknown.stderr, unknown.stderr
    neither = cli("queues", "requeue")
    assert neither.returncode == 2 and "JOB_ID, or --all" in neither.stderr

    # When the rest are requeued, the payload that was not a job stays, and says why
    rest = cli("queues", "requeue", "--all")
    assert (rest.returncode, rest.stdout) == (0, "requeued 1 job(s)\n"), rest.stderr
    assert "not requeued: a payload that was not a job" in rest.stderr
    assert [msgspec.json.decode(raw)["id"] for raw in r.lrange("llm-chat", 0, -1)] == [second, first]
    assert not r.exists(f"llm:result:{second}")
    [left] = [msgspec.json.decode(raw) for raw in r.lrange(DEAD, 0, -1)]
    assert left["raw"] == "{not json"

    # And a waiting producer gets the new answer, not the old failure
    service(WORKER_POOLS="llm-chat=1")
    for job_id in (first, second):
        result = client.wait(job_id, timeout=30)
        assert result is not None and result["success"], result


def test_queues_purge_with_yes_deletes_the_queue(cli: Cli, r: redis.Redis) -> None:
    r.lpush("llm-chat", "a", "b", "c")
    r.lpush(DEAD, dead_job("x"))
    proc = cli("queues", "purge", "llm-chat", "--yes")
    assert (proc.returncode, proc.stdout) == (0, "purged 3 job(s) from llm-chat\n"), proc.stderr
    assert not r.exists("llm-chat") and r.llen(DEAD) == 1
    assert cli("queues", "purge", DEAD, "--yes").stdout == f"purged 1 job(s) from {DEAD}\n"
    assert not r.exists(DEAD)
    nameless = cli("queues", "purge", "--yes")
    assert nameless.returncode == 2 and "which queue" in nameless.stderr
    # A known queue that is empty purges nothing, and says so.
    assert cli("queues", "purge", "llm-batch", "--yes").stdout == "purged 0 job(s) from llm-batch\n"


def test_queues_purge_of_no_queue_says_so_exits_1_and_deletes_nothing(cli: Cli, r: redis.Redis) -> None:
    r.set("llm:result:j1", "{}")
    for name in ("no-such-queue", "llm:result:j1"):  # nothing there, or a key that is no queue
        proc = cli("queues", "purge", name, "--yes")
        assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
        assert f"no queue named {name!r}" in proc.stderr and "llm-chat" in proc.stderr and no_traceback(proc)
    assert r.get("llm:result:j1") == b"{}"
    r.lpush("old-queue", "a")  # a list no setting names any more is still a queue
    assert cli("queues", "purge", "old-queue", "--yes").stdout == "purged 1 job(s) from old-queue\n"


def test_queues_purge_asks_and_purges_only_when_the_name_is_typed(cli: Cli, r: redis.Redis) -> None:
    r.lpush("llm-chat", "a", "b")
    refused = cli("queues", "purge", "llm-chat", stdin="llm-batch\n")
    assert refused.returncode == 1 and "Type its name to confirm" in refused.stdout and "not purged" in refused.stdout
    assert r.llen("llm-chat") == 2
    confirmed = cli("queues", "purge", "llm-chat", stdin="llm-chat\n")
    assert confirmed.returncode == 0 and "purged 2 job(s) from llm-chat" in confirmed.stdout
    assert not r.exists("llm-chat")


def test_queues_purge_with_no_answer_on_stdin_refuses_without_a_traceback(cli: Cli, r: redis.Redis) -> None:
    r.lpush("llm-chat", "a")
    proc = cli("queues", "purge", "llm-chat", stdin="")
    assert r.llen("llm-chat") == 1
    assert no_traceback(proc), proc.stderr
    assert proc.returncode == 1 and "not purged" in proc.stdout


# ---- plugins --------------------------------------------------------------------------


def test_plugins_lists_ollama_with_its_source_and_hook(cli: Cli) -> None:
    proc = cli("plugins")
    assert proc.returncode == 0, proc.stderr
    [row] = [line.split() for line in proc.stdout.splitlines() if line.startswith("ollama ")]
    assert row[0] == "ollama" and row[-1] == "llm_worker_providers"
    assert row[1] == "llm-worker"  # the distribution it comes from, then its version (or "(source tree)")


def test_plugins_lists_extra_plugins_and_says_which_are_disabled(cli: Cli) -> None:
    proc = cli("plugins", LLM_WORKER_PLUGINS="testplugins", LLM_WORKER_DISABLE_PLUGINS="ollama")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert rows["testplugins"][0] == "LLM_WORKER_PLUGINS" and "llm_worker_providers," in rows["testplugins"]
    assert rows["ollama"] == ["(disabled", "by", "LLM_WORKER_DISABLE_PLUGINS)"]


# ---- bad settings ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, env, named",
    [
        (
            ["submit", "--prompt", "hi"],
            {"OLLAMA_MAX_RETRIES": "99"},
            "OLLAMA_MAX_RETRIES='99': expected an integer from 0 to 20",
        ),
        (["submit", "--prompt", "hi", "--no-wait"], {"QUEUE_CHAT_NAME": "bad name!"}, "QUEUE_CHAT_NAME='bad name!'"),
        (["submit", "--prompt", "hi", "--redis-port", "abc"], {}, "--redis-port='abc': expected an integer"),
        (
            ["submit", "--prompt", "hi", "--config", "/nonexistent/llm-worker.toml"],
            {},
            "--config='/nonexistent/llm-worker.toml'",
        ),
        (["queues"], {"REDIS_URL": "http://localhost:6379"}, "REDIS_URL='http://localhost:6379': expected a redis://"),
        (["queues", "dead"], {"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud': expected one of debug"),
        (["queues", "requeue", "--all"], {"DEAD_LETTER_QUEUE_NAME": "llm-chat"}, "DEAD_LETTER_QUEUE_NAME='llm-chat'"),
        (["queues", "purge", "llm-chat", "--yes"], {"WORKER_POOLS": "llm-chat=many"}, "WORKER_POOLS='llm-chat=many'"),
    ],
    ids=[
        "submit-range",
        "submit-pattern",
        "submit-flag",
        "submit-config-file",
        "queues-url",
        "dead-choice",
        "requeue-consistency",
        "purge-pools",
    ],
)
def test_a_bad_setting_exits_2_naming_it_without_a_traceback_and_does_nothing(
    cli: Cli, r: redis.Redis, args: list[str], env: dict[str, str], named: str
) -> None:
    r.lpush("llm-chat", "keep me")
    proc = cli(*args, **env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("llm-worker: bad setting: ") and named in proc.stderr, proc.stderr
    assert no_traceback(proc) and proc.stdout == ""
    assert r.lrange("llm-chat", 0, -1) == [b"keep me"]


def test_submit_help_shows_the_job_flags_first_and_the_setting_flags_on_request(cli: Cli) -> None:
    proc = cli("submit", "--help")
    assert proc.returncode == 0, proc.stderr
    usage, _, rest = proc.stdout.partition("\n\n")
    assert usage.startswith("usage: llm-worker submit [-h] [--type") and "REDIS_URL" not in proc.stdout
    options = rest[rest.index("options:") :].splitlines()
    assert options[1].split()[:2] == ["-h,", "--help"] and options[2].split()[0] == "--type"
    text = " ".join(proc.stdout.split())
    for flag, said in (
        ("--type", "the job's type"),
        ("--model", "the model (default: DEFAULT_CHAT_MODEL"),
        ("--correlation-id ID", "an id of your own"),
    ):
        assert f"{flag} " in text and said in text, flag
    assert "llm-worker submit --help-settings" in " ".join(proc.stdout.split())
    full = cli("submit", "--help-settings")
    assert full.returncode == 0 and full.stdout.startswith("usage: llm-worker submit [-h] [--type")
    assert "--redis-url VALUE" in full.stdout and "REDIS_URL: " in full.stdout
    assert full.stdout.index("--correlation-id") < full.stdout.index("--redis-url VALUE")


def test_queues_help_describes_each_action_and_hides_the_setting_flags(cli: Cli) -> None:
    proc = cli("queues", "--help")
    assert proc.returncode == 0 and "WORKER_POOLS" not in proc.stdout, proc.stderr
    for action in ("depths", "dead", "requeue", "purge"):
        assert any(line.split()[:1] == [action] and len(line.split()) > 3 for line in proc.stdout.splitlines())
    assert "--help-settings" in proc.stdout
    assert "--worker-pools VALUE" in cli("queues", "--help-settings").stdout


def test_check_config_refuses_a_pool_of_an_undeclared_queue_naming_the_known_ones(cli: Cli) -> None:
    proc = cli("check-config", WORKER_POOLS="llm-chatt=2")
    assert proc.returncode == 2 and proc.stdout == "" and no_traceback(proc), proc.stderr
    assert proc.stderr.startswith("llm-worker: bad setting: WORKER_POOLS='{\"llm-chatt\":2}'"), proc.stderr
    for known in ("llm-chat", "llm-embeddings", "llm-batch", "llm-priority", "QUEUE_EXTRA_NAMES"):
        assert known in proc.stderr
    declared = cli("check-config", WORKER_POOLS="llm-chatt=2", QUEUE_EXTRA_NAMES="llm-chatt")
    assert declared.returncode == 0 and "llm-chatt=2" in declared.stdout, declared.stderr


def test_plugins_with_a_plugin_that_does_not_import_exits_2_naming_it(cli: Cli) -> None:
    proc = cli("plugins", LLM_WORKER_PLUGINS="no_such_plugin_module")
    assert no_traceback(proc), proc.stderr
    assert proc.returncode == 2 and "no_such_plugin_module" in proc.stderr


@pytest.mark.parametrize("args", [["queues"], ["submit", "--prompt", "hi", "--no-wait"]], ids=["queues", "submit"])
def test_an_unreachable_redis_is_a_one_line_message_not_a_traceback(
    cli: Cli, closed_port: int, args: list[str]
) -> None:
    proc = cli(*args, REDIS_URL=f"redis://127.0.0.1:{closed_port}/0", timeout=60)
    assert no_traceback(proc), proc.stderr
    assert proc.returncode in (1, 2) and f"127.0.0.1:{closed_port}" in proc.stderr
