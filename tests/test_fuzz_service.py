"""Fuzzed payloads pushed into a running service: every one ends once, and no worker dies.

The decoder's fuzz tests (test_fuzz_jobs.py) check each refusal in process.
This one pushes a few hundred of the same kinds of payloads (random bytes,
random JSON, valid jobs with parts broken or bytes damaged, and valid jobs of
every type and option the schema allows) into the queue of a
real service with real workers against the simulator, and checks what a
producer and an operator see: each payload has exactly one terminal outcome
(a success counted in the queue's statistics, or one dead-letter entry), every
refusal's reason is readable, nothing is left in a queue, a processing list or
the delayed set, and the workers that started are the workers still running.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import eventually, nothing_held
from test_fuzz_jobs import JSON, MAX_REASON, VALID_JOBS, mutated_jobs

COUNT = 240


def sample(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` values of a strategy, the same ones on every run."""
    found: list[Any] = []

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        found.append(value)

    collect()
    return found[:n]


def damaged(job: dict[str, Any], n: int) -> bytes:
    """A valid job's bytes with one byte changed, one cut off, or one repeated."""
    raw = bytearray(msgspec.json.encode(job))
    at = n * 7919 % len(raw)
    how = n % 3
    if how == 0:
        raw[at] = (raw[at] + 1 + n % 254) % 256
    elif how == 1:
        del raw[at:]
    else:
        raw[at:at] = raw[at : at + 1] * 3
    return bytes(raw)


def runnable(job: dict[str, Any]) -> dict[str, Any]:
    """A generated valid job on the host's default models (the simulator knows those), with time to run."""
    job = {k: v for k, v in job.items() if k not in ("model", "timeout")}
    if job["type"] == "batch":
        items = [{k: v for k, v in item.items() if k != "model"} for item in job["request"]["requests"]]
        job["request"] = {**job["request"], "requests": items}
    return job


def payloads() -> list[bytes]:
    fifth = COUNT // 5
    out = [msgspec.json.encode(v) for v in sample(JSON, fifth)]
    out += sample(st.binary(max_size=300), fifth)
    out += [msgspec.json.encode(v) for v in sample(mutated_jobs(), fifth)]
    out += [damaged(job, n) for n, job in enumerate(sample(VALID_JOBS, fifth))]
    out += [msgspec.json.encode(runnable(job)) for job in sample(VALID_JOBS, fifth)]
    return out


def terminal(r: redis.Redis) -> int:
    completed = sum(int(r.hget(key, "completed") or 0) for key in r.scan_iter("llm:stats:*"))
    return completed + int(r.llen("llm-dead-letter"))


def test_fuzzed_payloads_each_end_once_and_no_worker_dies(service, r: redis.Redis) -> None:
    svc = service(
        WORKER_POOLS="llm-chat=2",
        MAX_JOB_BYTES="65536",
        DEFAULT_CHAT_MODEL="llama3.2",
        DEFAULT_EMBEDDING_MODEL="nomic-embed-text",
        QUEUE_DELAY="50",
        QUEUE_MAX_DELAY="200",
        QUEUE_MAX_ATTEMPTS="2",
        OLLAMA_MAX_RETRIES="0",
        LOG_LEVEL="info",
    )
    pids = svc.worker_pids(r)
    pushed = payloads()
    for start in range(0, len(pushed), 50):
        r.lpush("llm-chat", *pushed[start : start + 50])

    eventually(
        lambda: (
            terminal(r) >= len(pushed) and nothing_held(r) and not r.llen("llm-chat") and not r.zcard("llm:delayed")
        ),
        timeout=120,
        interval=0.2,
        what="every payload ended",
    )
    assert terminal(r) == len(pushed)  # exactly one outcome each
    completed = sum(int(r.hget(key, "completed") or 0) for key in r.scan_iter("llm:stats:*"))
    # Both roads were taken: broken payloads refused, and jobs that survived their damage run.
    why = Counter(msgspec.json.decode(blob)["error"][:70] for blob in r.lrange("llm-dead-letter", 0, -1))
    assert completed >= COUNT // 10 and r.llen("llm-dead-letter") >= COUNT // 2, (completed, why.most_common(12))

    for blob in r.lrange("llm-dead-letter", 0, -1):
        entry = msgspec.json.decode(blob)
        reason = entry["error"]
        assert isinstance(reason, str) and reason.strip() and reason.isprintable() and len(reason) <= MAX_REASON, entry
        assert "Traceback" not in reason and " object at 0x" not in reason, reason
    assert svc.worker_pids(r) == pids, "a worker died or was replaced"
    log = svc.tail(200_000)
    assert "Traceback" not in log and "worker died" not in log and "unexpected error" not in log.lower()
    assert svc.process.poll() is None
