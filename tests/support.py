"""Helpers for end-to-end tests: submit jobs, wait for them, count their outcomes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable

import msgspec
import redis

from llm_worker.queue.client import Client
from llm_worker.settings.config import load


def client_for(redis_url: str, **env: str) -> Client:
    return Client.from_settings(load({"REDIS_URL": redis_url, **env}).settings)


def chat(client: Client, text: str = "Why is the sky blue?", model: str = "llama3.2", **kw: object) -> str:
    return client.submit("chat", {"messages": [{"role": "user", "content": text}]}, model=model, **kw)  # type: ignore[arg-type]


def wait_all(client: Client, ids: Iterable[str], timeout: float = 30.0) -> dict[str, dict]:
    """Every job's result; fail naming the missing ones after ``timeout``."""
    deadline = time.monotonic() + timeout
    results: dict[str, dict] = {}
    for job_id in ids:
        result = client.wait(job_id, timeout=max(0.1, deadline - time.monotonic()))
        assert result is not None, f"job {job_id} has no result after {timeout}s"
        results[job_id] = result
    return results


def events(r: redis.Redis, kind: str | None = None) -> list[dict]:
    out = []
    for _, fields in r.xrange("llm:events"):
        if kind is None or fields[b"type"].decode() == kind:
            out.append({"type": fields[b"type"].decode(), **msgspec.json.decode(fields[b"data"])})
    return out


def terminal_outcomes(r: redis.Redis) -> Counter[str]:
    """How many terminal outcome events each job id got (completed, or failed for good)."""
    return Counter(e["jobId"] for e in events(r) if e["type"] in ("llm.request.completed", "llm.request.failed"))


def outcomes_written(r: redis.Redis) -> int:
    """Terminal outcomes written, all queues: counted in the same transaction as each result."""
    return sum(int(v) for key in r.scan_iter("llm:stats:*") for v in r.hvals(key))


def assert_each_answered_once(r: redis.Redis, ids: Iterable[str]) -> None:
    """Every job has its result, and there were exactly as many outcomes as jobs (none twice).

    Call with every job the test pushed. The outcome count is written with each
    result, atomically, so it is exact even across Redis restarts; events are
    telemetry and may miss one there, but never show a job twice.
    """
    ids = list(ids)
    for job_id in ids:
        assert r.exists(f"llm:result:{job_id}"), f"job {job_id} has no result"
        assert r.llen(f"llm:done:{job_id}") <= 1  # a waiter BLPOPs the marker
    assert outcomes_written(r) == len(set(ids)), f"{outcomes_written(r)} outcomes for {len(set(ids))} jobs"
    counts = terminal_outcomes(r)
    assert all(counts[job_id] <= 1 for job_id in ids), {j: c for j, c in counts.items() if c > 1}


def nothing_held(r: redis.Redis) -> bool:
    return not any(r.llen(key) for key in r.scan_iter("llm:processing:*"))


def eventually(
    check: Callable[[], object], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def held_by(r: redis.Redis, worker_id: str) -> list[str]:
    return [msgspec.json.decode(raw)["id"] for raw in r.lrange(f"llm:processing:{worker_id}", 0, -1)]
