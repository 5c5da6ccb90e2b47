"""The reliable queue's scripts against a real Redis: fencing, retries, dead letters, recovery."""

from __future__ import annotations

import re
import time

import msgspec
import pytest
import redis
from conftest import settings_for

from llm_worker.protocol.jobs import DeadLetter, Result
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo, retry_delay
from llm_worker.queue.scripts import PRELUDE, SIGNATURES, source

WID = "host-a:100"


def job(job_id: str, **more: object) -> bytes:
    return msgspec.json.encode(
        {
            "id": job_id,
            "type": "chat",
            "userId": "u",
            "model": "m",
            "correlationId": "c-" + job_id,
            "request": {"messages": [{"role": "user", "content": "hi"}]},
            **more,
        }
    )


@pytest.fixture
def rq(redis_url: str, r: redis.Redis) -> ReliableQueue:
    return ReliableQueue(r, settings_for({"REDIS_URL": redis_url, "JOB_MAX_CRASHES": "2"}))


def ok(job_id: str) -> Result:
    return Result(
        job_id=job_id, success=True, response={"message": {"role": "assistant", "content": "x"}}, completed_at="t"
    )


def test_take_moves_the_oldest_job_into_the_workers_processing_list(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm-chat", job("a"), job("b"))
    assert rq.take("llm-chat", WID, 0.1) == job("a")
    assert r.lrange("llm:processing:" + WID, 0, -1) == [job("a")]
    assert r.lrange("llm-chat", 0, -1) == [job("b")]


def test_complete_writes_result_done_marker_and_counts_then_acks(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm-chat", job("a"))
    raw = rq.take("llm-chat", WID, 0.1)
    assert rq.complete(WID, raw, ok("a"), queue="llm-chat").ours
    assert r.llen("llm:processing:" + WID) == 0
    assert msgspec.json.decode(r.get("llm:result:a"))["success"] is True
    assert r.lrange("llm:done:a", 0, -1) == [b"ok"]
    assert 0 < r.ttl("llm:result:a") <= 3600 and 0 < r.ttl("llm:done:a") <= 3600
    assert r.hgetall("llm:stats:llm-chat") == {b"completed": b"1"}


def test_a_job_recovered_from_its_worker_is_never_answered_by_it(rq: ReliableQueue, r: redis.Redis) -> None:
    # Given a worker holding a job that the supervisor then recovers (presumed dead)
    r.lpush("llm-chat", job("a"))
    raw = rq.take("llm-chat", WID, 0.1)
    assert rq.recover(WID, "llm-chat", crashed=False) == (1, 0)
    # When the stopped worker wakes and finishes it
    assert rq.complete(WID, raw, ok("a")).ours is False
    # Then nothing is written: the job is back in its queue for another worker
    assert r.get("llm:result:a") is None and r.llen("llm:done:a") == 0
    assert r.lrange("llm-chat", 0, -1) == [raw]


def test_finishing_a_job_can_take_the_next_one_in_the_same_round_trip(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm-chat", job("a"), job("b"))
    raw = rq.take("llm-chat", WID, 0.1)
    done = rq.complete(WID, raw, ok("a"), take_from="llm-chat")
    assert done == (True, job("b"))
    assert r.lrange("llm:processing:" + WID, 0, -1) == [job("b")]  # held reliably, like a BLMOVE
    assert rq.complete(WID, job("b"), ok("b"), take_from="llm-chat") == (True, None)  # empty queue
    # A fenced-out finish still takes work: the worker is alive and idle.
    r.lpush("llm-chat", job("c"))
    assert rq.complete(WID, job("a"), ok("a"), take_from="llm-chat") == (False, job("c"))


def test_the_done_marker_holds_one_status_even_if_the_key_had_one(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm:done:a", "stale")
    r.lpush("llm-chat", job("a"))
    rq.complete(WID, rq.take("llm-chat", WID, 0.1), ok("a"))
    assert r.lrange("llm:done:a", 0, -1) == [b"ok"]


def test_retry_parks_the_new_payload_until_due_then_promote_serves_it_next(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm-chat", job("a"))
    raw = rq.take("llm-chat", WID, 0.1)
    r.lpush("llm-chat", job("queued"))
    retried = job("a", retryCount=1)
    assert rq.retry_later(WID, raw, "llm-chat", retried, time.time() + 60).ours
    assert r.llen("llm:processing:" + WID) == 0 and r.zcard("llm:delayed") == 1
    assert r.get("llm:result:a") is None  # a retry is not an outcome
    assert rq.promote_due() == 0
    assert rq.promote_due(now=time.time() + 61) == 1
    assert r.zcard("llm:delayed") == 0
    assert r.rpop("llm-chat") == retried  # at the serving end, before the job that waited


def test_a_delayed_entry_without_a_queue_is_dead_lettered_not_lost(rq: ReliableQueue, r: redis.Redis) -> None:
    r.zadd("llm:delayed", {"no-queue-here": 1})
    assert rq.promote_due() == 1
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry["raw"] == "no-queue-here" and "names no queue" in entry["error"]


def test_dead_letter_keeps_the_job_and_writes_its_failure_result(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm-chat", job("a"))
    raw = rq.take("llm-chat", WID, 0.1)
    entry = DeadLetter(
        job=msgspec.Raw(raw),
        queue="llm-chat",
        error="boom",
        error_type="provider",
        failed_at="t",
        worker_id=WID,
        attempts=3,
    )
    failure = Result(job_id="a", success=False, error="boom", error_type="provider", completed_at="t")
    assert rq.dead_letter(WID, raw, entry, failure, stream="error").ours
    stored = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert stored["job"]["id"] == "a" and stored["errorType"] == "provider" and stored["attempts"] == 3
    assert r.lrange("llm:done:a", 0, -1) == [b"failed"]
    (last,) = r.xrange("llm:stream:a")
    assert last[1] == {b"event": b"error", b"error": b"boom"}


def test_recovery_counts_crashes_and_dead_letters_at_the_limit(rq: ReliableQueue, r: redis.Redis) -> None:
    # JOB_MAX_CRASHES is 2 here: the first crash requeues, the second dead-letters.
    for expected in [(1, 0), (0, 1)]:
        r.rpush("llm-chat", job("a"))
        rq.take("llm-chat", WID, 0.1)
        assert rq.recover(WID, "llm-chat", crashed=True) == expected
        r.delete("llm-chat")
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry["job"]["id"] == "a" and entry["errorType"] == "crashed" and entry["attempts"] == 2
    result = msgspec.json.decode(r.get("llm:result:a"))
    assert result["errorType"] == "crashed" and result["success"] is False and result["correlationId"] == "c-a"
    assert r.lrange("llm:done:a", 0, -1) == [b"failed"]


def test_a_crashed_jobs_result_dead_letter_and_events_are_whole(redis_url: str, r: redis.Redis) -> None:
    # Each is rendered in Python with slots that the script fills in: none may be left.
    rq = ReliableQueue(r, settings_for({"REDIS_URL": redis_url, "JOB_MAX_CRASHES": "1"}))
    r.lpush("llm:processing:" + WID, job("a", retryCount=2))
    assert rq.recover(WID, "llm-chat", crashed=True) == (0, 1)
    result = msgspec.json.decode(r.get("llm:result:a"), type=Result)
    reason = "job was in hand of 1 workers that died (JOB_MAX_CRASHES 1)"
    assert (result.job_id, result.error, result.model, result.requested_model) == ("a", reason, "m", "m")
    assert (result.retry_count, result.correlation_id, result.worker_id) == (2, "c-a", WID)
    assert b"startedAt" not in r.get("llm:result:a")  # no worker took it for the last time
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry == {
        "queue": "llm-chat",
        "error": reason,
        "errorType": "crashed",
        "failedAt": result.completed_at,
        "workerId": WID,
        "job": msgspec.json.decode(job("a", retryCount=2)),
        "attempts": 1,
    }
    events = [(f[b"type"], msgspec.json.decode(f[b"data"])) for _, f in r.xrange("llm:events")]
    assert [t for t, _ in events] == [b"llm.request.failed", b"llm.request.dead_lettered"]
    assert events[0][1] == {
        "jobId": "a",
        "workerId": WID,
        "timestamp": result.completed_at,
        "queue": "llm-chat",
        "error": reason,
        "errorType": "crashed",
        "attempts": 1,
    }


def test_handing_back_uncounted_never_dead_letters(rq: ReliableQueue, r: redis.Redis) -> None:
    for _ in range(5):
        r.rpush("llm-chat", job("a"))
        rq.take("llm-chat", WID, 0.1)
        assert rq.recover(WID, "llm-chat", crashed=False) == (1, 0)
        r.delete("llm-chat")
    assert r.llen("llm-dead-letter") == 0 and not r.exists("llm:crashes:a")


def test_recovery_keeps_order_oldest_served_first(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm:processing:" + WID, job("old"), job("new"))  # the list's head is the newest
    rq.recover(WID, "llm-chat", crashed=False)
    assert [msgspec.json.decode(r.rpop("llm-chat"))["id"] for _ in range(2)] == ["old", "new"]


def test_a_payload_that_is_not_json_crashing_workers_is_dead_lettered_raw(rq: ReliableQueue, r: redis.Redis) -> None:
    for _ in range(2):
        r.lpush("llm:processing:" + WID, b"\xff not json")
        rq.recover(WID, "llm-chat", crashed=True)
    entry = msgspec.json.decode(r.lindex("llm-dead-letter", 0))
    assert entry["raw"].endswith("not json") and entry["errorType"] == "crashed"


def test_a_payload_over_max_job_bytes_is_recovered_without_being_decoded(redis_url: str, r: redis.Redis) -> None:
    # Only an id that leads it is read, as a worker reads it (jobs.job_id_of): the
    # script must not decode megabytes inside Redis, nor answer an id read past them.
    rq = ReliableQueue(r, settings_for({"REDIS_URL": redis_url, "JOB_MAX_CRASHES": "1", "MAX_JOB_BYTES": "1024"}))
    padding = "x" * 2048
    leading = job("big-1", note=padding)
    nested = msgspec.json.encode({"type": "chat", "request": {"messages": [{"content": padding}]}, "id": "late-id"})
    assert leading.startswith(b'{"id":"big-1"') and len(leading) > 1024
    for raw in (leading, nested):
        r.lpush("llm:processing:" + WID, raw)
        assert rq.recover(WID, "llm-chat", crashed=True) == (0, 1)
    entries = [msgspec.json.decode(e) for e in r.lrange("llm-dead-letter", 0, -1)]
    assert all("raw" in e and e["errorType"] == "crashed" for e in entries)
    result = msgspec.json.decode(r.get("llm:result:big-1"))
    assert (result["jobId"], result["errorType"], result["model"], result["correlationId"]) == (
        "big-1",
        "crashed",
        None,
        None,
    )
    assert not r.exists("llm:result:late-id")


def test_a_crashed_job_with_an_id_no_worker_accepts_gets_no_result_key(redis_url: str, r: redis.Redis) -> None:
    rq = ReliableQueue(r, settings_for({"REDIS_URL": redis_url, "JOB_MAX_CRASHES": "1"}))
    for bad in ("", "a b", "x" * 129, "ü"):
        r.lpush("llm:processing:" + WID, job(bad))
        assert rq.recover(WID, "llm-chat", crashed=True) == (0, 1)
    assert r.llen("llm-dead-letter") == 4
    assert not [key for key in r.scan_iter("llm:result:*")]


def test_another_hosts_worker_is_recovered_only_once_its_heartbeat_expired(rq: ReliableQueue, r: redis.Redis) -> None:
    info = WorkerInfo(queue="llm-chat", host="host-a", hostname="h", pid=100, since="t")
    rq.register(WID, info, ttl_ms=60_000)
    r.lpush("llm:processing:" + WID, job("a"))
    assert rq.recover(WID, "llm-chat", crashed=True, only_if_expired=True) == (-1, 0)
    assert r.llen("llm:processing:" + WID) == 1
    r.delete("llm:worker:" + WID)
    assert rq.recover(WID, "llm-chat", crashed=True, only_if_expired=True) == (1, 0)
    assert rq.registered() == {}


def test_reconcile_primitives_forget_and_hand_back(rq: ReliableQueue, r: redis.Redis) -> None:
    r.lpush("llm:processing:" + WID, job("answered"), job("lost"))
    assert rq.forget(WID, job("answered"))
    assert rq.hand_back(WID, job("lost"), "llm-chat")
    assert r.llen("llm:processing:" + WID) == 0 and r.lrange("llm-chat", 0, -1) == [job("lost")]


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_each_script_names_its_keys_and_args_once_in_the_order_python_passes_them(name: str) -> None:
    keys, args = SIGNATURES[name]
    text = source(name)
    named = re.findall(r"^local (\w+) = .*?\b(KEYS|ARGV)\[(\d+)\]", text, re.M)
    rest = re.findall(r"^local (\w+) = \{unpack\(ARGV, (\d+)\)\}", text, re.M)
    assert [n for n, kind, _ in named if kind == "KEYS"] == list(keys._fields)
    assert [n for n, kind, _ in named if kind == "ARGV"] + [n for n, _ in rest] == list(args._fields)
    assert [int(i) for _, kind, i in named if kind == "KEYS"] == list(range(1, len(keys._fields) + 1))
    assert [int(i) for _, kind, i in named if kind == "ARGV"] + [int(i) for _, i in rest] == list(
        range(1, len(args._fields) + 1)
    )
    # Nowhere else: the body reads only the names.
    code = re.sub(r"--.*", "", text)
    assert code.count("KEYS") == len(keys._fields) and code.count("ARGV") == len(args._fields)
    assert "KEYS" not in re.sub(r"--.*", "", source(PRELUDE)) and "ARGV" not in re.sub(r"--.*", "", source(PRELUDE))


def test_retry_delay_grows_exponentially_with_equal_jitter_and_is_capped() -> None:
    s = settings_for({"QUEUE_DELAY": "1000", "QUEUE_MAX_DELAY": "5000"})
    for retry, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (10, 5.0)]:
        delays = [retry_delay(s, retry) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # jittered, not constant
    fixed = settings_for({"QUEUE_DELAY": "1000", "QUEUE_BACKOFF_TYPE": "fixed"})
    assert all(0.5 <= retry_delay(fixed, n) <= 1.0 for n in range(6))


def test_queue_stats_count_what_registered_workers_hold_and_skip_an_entry_not_ours(
    redis_url: str, r: redis.Redis
) -> None:
    from llm_worker.queue.admin import QueueAdmin

    settings = settings_for({"REDIS_URL": redis_url})
    info = WorkerInfo(queue="llm-chat", host="host-a", hostname="h", pid=100, since="t")
    r.hset("llm:workers", mapping={WID: msgspec.json.encode(info), "hand-edited": b"{not json", "old": b'{"queue": 5}'})
    r.lpush("llm:processing:" + WID, job("a"))
    r.lpush("llm:processing:hand-edited", job("b"))
    stats = QueueAdmin(r, settings).stats()  # was a 500 from /admin/queue/stats
    assert stats["llm-chat"]["active"] == 1


def _dead_letter(rq: ReliableQueue, r: redis.Redis, job_id: str) -> None:
    r.lpush("llm-chat", job(job_id))
    raw = rq.take("llm-chat", WID, 0.1)
    entry = DeadLetter(
        job=msgspec.Raw(raw), queue="llm-chat", error="bad", error_type="validation", failed_at="t", worker_id=WID
    )
    assert rq.dead_letter(WID, raw, entry, None).ours


def test_queue_remove_on_fail_keeps_the_newest_dead_letters_and_counts_the_trimmed(
    redis_url: str, r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for({"REDIS_URL": redis_url, "QUEUE_REMOVE_ON_FAIL": "5", "JOB_MAX_CRASHES": "1"})
    rq = ReliableQueue(r, settings)
    with caplog.at_level("WARNING", logger="llm_worker.queue"):
        for n in range(12):  # a flood past the bound, through finish.lua
            _dead_letter(rq, r, f"j{n}")
    assert r.llen("llm-dead-letter") == 5
    kept = [msgspec.json.decode(raw)["job"]["id"] for raw in r.lrange("llm-dead-letter", 0, -1)]
    assert kept == ["j11", "j10", "j9", "j8", "j7"]  # the newest, newest first
    assert int(r.get("llm:dead-letters-trimmed")) == 7
    lines = [rec for rec in caplog.records if "QUEUE_REMOVE_ON_FAIL=5" in rec.getMessage()]
    assert len(lines) == 1 and "trimmed the 1 oldest" in lines[0].getMessage()  # once a minute, not per trim
    # recover.lua and promote.lua push dead letters too, and trim the same way.
    r.lpush("llm:processing:" + WID, job("crashed"))
    assert rq.recover(WID, "llm-chat", crashed=True) == (0, 1)
    r.zadd("llm:delayed", {"no-queue-here": 0})
    assert rq.promote_due() == 1
    assert r.llen("llm-dead-letter") == 5 and int(r.get("llm:dead-letters-trimmed")) == 9
    assert b"no-queue-here" in r.lindex("llm-dead-letter", 0)
    assert msgspec.json.decode(r.lindex("llm-dead-letter", 1))["job"]["id"] == "crashed"


def test_queue_remove_on_fail_zero_keeps_every_dead_letter(redis_url: str, r: redis.Redis) -> None:
    rq = ReliableQueue(r, settings_for({"REDIS_URL": redis_url, "QUEUE_REMOVE_ON_FAIL": "0"}))
    for n in range(12):
        _dead_letter(rq, r, f"j{n}")
    assert r.llen("llm-dead-letter") == 12 and r.get("llm:dead-letters-trimmed") is None
