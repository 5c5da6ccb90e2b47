"""Redis killed and restarted under a running service: with AOF, every job completes once."""

from __future__ import annotations

import time
from pathlib import Path

from support import assert_each_answered_once, chat, client_for, eventually, nothing_held

from llm_worker.devtools.localredis import LocalRedis
from llm_worker.devtools.simulator import Simulator


def test_redis_killed_and_restarted_mid_run_loses_no_job(service, sim: Simulator, tmp_path: Path) -> None:
    # Given a service over a Redis with append-only persistence, busy with jobs
    sim.config.latency_ms = 40
    with LocalRedis(tmp_path / "aof", appendonly=True) as store:
        svc = service(REDIS_URL=store.url, WORKER_POOLS="llm-chat=3")
        client = client_for(store.url)
        ids = [chat(client, f"job {n}") for n in range(120)]
        eventually(lambda: store.client().llen("llm-chat") < 100, what="work under way")
        # When Redis is SIGKILLed mid-run and comes back two seconds later
        store.kill()
        time.sleep(2)
        store.start()
        # Then every job gets exactly one result, and nothing stays in hand
        client = client_for(store.url)
        r = store.client()
        eventually(lambda: all(r.exists(f"llm:result:{i}") for i in ids), timeout=60, what="every result")
        assert all(client.result(i)["success"] for i in ids)
        assert_each_answered_once(r, ids)
        eventually(lambda: nothing_held(r), timeout=10, what="processing lists empty")
        assert "Redis reachable again" in svc.tail(400)
        assert svc.process.poll() is None  # nobody crash-looped
