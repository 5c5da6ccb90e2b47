"""The supervisor's last resort: a bug in its loop stops the service cleanly, and the exit code says so."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from support import chat, client_for, eventually, held_by, nothing_held

from llm_worker import exitcodes
from llm_worker.devtools.harness import Service
from llm_worker.devtools.simulator import Simulator

# `llm-worker run`, whose loop raises when SIGUSR1 arrives: a stand-in for any bug in a handler or a chore.
WITH_A_BUG = """
import signal, sys
from llm_worker.supervisor.arbiter import Arbiter

dispatch = Arbiter.dispatch


def dispatch_with_a_bug(self, signum):
    if signum == signal.SIGUSR1:
        raise RuntimeError("a bug in the supervisor loop")
    dispatch(self, signum)


Arbiter.dispatch = dispatch_with_a_bug
from llm_worker.cli.main import main

sys.exit(main())
"""


@pytest.fixture
def buggy(redis_url: str, sim: Simulator, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = {
        "REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": sim.url,
        "WORKER_ID": f"t{uuid.uuid4().hex[:8]}",
        "WORKER_POOLS": "llm-chat=2",
        "LOG_LEVEL": "info",
        "WORKER_HEARTBEAT_TIMEOUT": "5000",
        "MODEL_MEMORY_THRESHOLD": "1",  # the test machine's own memory must not unload models
    }
    svc = Service(env, log_path=tmp_path / "service.log", command=[sys.executable, "-c", WITH_A_BUG])
    try:
        yield svc.start()
    finally:
        svc.stop()


def test_a_bug_in_the_loop_hands_jobs_back_stops_everything_and_exits_with_supervisor_error(
    buggy: Service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given: two workers, each with a job in hand that would run for 20 s.
    sim.config.latency_ms = 20_000
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(2)]
    host = buggy.env["WORKER_ID"]
    eventually(
        lambda: sum(len(held_by(r, f"{host}:{pid}")) for pid in buggy.worker_pids(r)) == 2, what="two jobs in hand"
    )

    # When: the supervisor loop raises.
    started = time.monotonic()
    buggy.send(signal.SIGUSR1)

    # Then: it stops at once, as QUIT does, and its exit code says it failed.
    assert buggy.wait(15) == exitcodes.SUPERVISOR_ERROR
    assert time.monotonic() - started < 8
    log = buggy.tail(300)
    assert re.search(r"CRITICAL .*the supervisor loop failed", log), log
    assert "Traceback" in log and "RuntimeError: a bug in the supervisor loop" in log
    # The jobs in hand are back in their queue, not counted against them, and no process is left.
    assert r.llen("llm-chat") == 2 and nothing_held(r)
    assert all(r.get(f"llm:crashes:{job_id}") is None for job_id in ids)
    with pytest.raises(ProcessLookupError):
        os.killpg(buggy.pid, 0)
