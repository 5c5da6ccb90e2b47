"""What the supervisor refuses at start: a Redis older than 6.2, a WORKER_ID a live host holds."""

from __future__ import annotations

import socket
import sys
import uuid
from pathlib import Path

import pytest
import redis
from conftest import settings_for
from support import eventually

from llm_worker import exitcodes
from llm_worker.devtools.harness import Service
from llm_worker.devtools.simulator import Simulator
from llm_worker.queue.connection import RedisTooOld, redis_too_old, refuse_old_redis
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo

# ---- Redis's version -----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["6.0.16", "5.0.7", "4.0.9", "6.1.99"])
def test_a_redis_older_than_6_2_is_named_with_what_is_needed(version: str) -> None:
    why = redis_too_old({"redis_version": version, "redis_mode": "standalone"})
    assert why is not None and f"Redis {version} is too old" in why and "6.2" in why and "BLMOVE" in why


@pytest.mark.parametrize("version", ["6.2.0", "6.2.14", "7.0.15", "7.2.4", "8.0.0", "255.255.255", "", "weird"])
def test_a_redis_of_6_2_or_newer_or_of_a_version_we_cannot_read_passes(version: str) -> None:
    assert redis_too_old({"redis_version": version}) is None


class FakeInfo:
    """A client whose INFO answers as the given server would (or is forbidden, as an ACL may)."""

    def __init__(self, answer: dict[str, str] | None) -> None:
        self.answer = answer
        self.sections: list[str] = []

    def info(self, section: str) -> dict[str, str]:
        self.sections.append(section)
        if self.answer is None:
            raise redis.ResponseError("NOPERM this user has no permissions to run the 'info' command")
        return self.answer


def test_refuse_old_redis_reads_info_server_and_raises_for_an_old_one() -> None:
    client = FakeInfo({"redis_version": "6.0.16"})
    with pytest.raises(RedisTooOld, match="6.0.16"):
        refuse_old_redis(client)  # type: ignore[arg-type]
    assert client.sections == ["server"]
    refuse_old_redis(FakeInfo({"redis_version": "7.2.4"}))  # type: ignore[arg-type]
    refuse_old_redis(FakeInfo(None))  # type: ignore[arg-type]  # INFO forbidden: we cannot tell, and pass


def test_the_test_redis_itself_passes(r: redis.Redis) -> None:
    refuse_old_redis(r)


# `llm-worker run` against the real test Redis, whose INFO server says 6.0.16: the start path
# of a real supervisor, with only the version Redis reports replaced (no redis-server older than
# 6.2 is at hand, and a real one would not run the rest of the suite anyway).
OLD_REDIS = """
import sys
import redis

info = redis.Redis.info


def info_of_an_old_redis(self, section=None, *args, **kwargs):
    answer = info(self, section, *args, **kwargs)
    if section == "server":
        answer["redis_version"] = "6.0.16"
    return answer


redis.Redis.info = info_of_an_old_redis
from llm_worker.cli.main import main

sys.exit(main())
"""


def test_run_against_a_redis_older_than_6_2_stops_at_once_with_exit_2_and_forks_nothing(
    redis_url: str, sim: Simulator, tmp_path: Path, r: redis.Redis
) -> None:
    env = {
        "REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": sim.url,
        "WORKER_ID": f"t{uuid.uuid4().hex[:8]}",
        "WORKER_POOLS": "llm-chat=2",
        "LOG_LEVEL": "info",
    }
    svc = Service(env, log_path=tmp_path / "service.log", command=[sys.executable, "-c", OLD_REDIS])
    try:
        svc.start(ready=False)
        assert svc.wait(20) == exitcodes.USAGE
    finally:
        svc.stop()
    log = svc.tail(50)
    assert "refusing to start: Redis 6.0.16 is too old" in log and "6.2 or newer" in log, log
    assert "booting" not in log and "Traceback" not in log, log
    assert r.hlen("llm:workers") == 0


# ---- one WORKER_ID, one live supervisor ----------------------------------------------------------


def test_a_second_supervisor_with_the_same_worker_id_is_refused_naming_it_and_the_live_host(
    service, r: redis.Redis
) -> None:
    first = service(WORKER_POOLS="llm-chat=2")
    host = first.env["WORKER_ID"]
    pids = eventually(lambda: first.worker_pids(r) if len(first.worker_pids(r)) == 2 else None, what="two workers")

    second = service(ready=False, WORKER_ID=host, WORKER_POOLS="llm-chat=1")
    assert second.wait(20) == exitcodes.USAGE
    log = second.tail(50)
    assert f"WORKER_ID='{host}' is in use by a live supervisor on host {socket.gethostname()}" in log, log
    assert f"supervisor pid {first.pid}" in log and all(str(pid) in log for pid in pids), log
    assert "booting" not in log, log

    # The first runs on, untouched: same workers, still serving.
    assert first.process is not None and first.process.poll() is None
    assert first.worker_pids(r) == pids
    assert first.get("/health/ready")[0] == 200


def test_a_host_whose_supervisor_was_killed_starts_again_under_its_worker_id(service, r: redis.Redis) -> None:
    first = service(WORKER_POOLS="llm-chat=2", WORKER_HEARTBEAT_TIMEOUT="60000")
    host = first.env["WORKER_ID"]
    eventually(lambda: len(first.worker_pids(r)) == 2, what="two workers")
    first.kill_all()  # SIGKILL to the whole group: a host that died, its heartbeats still live for a minute

    # On the same machine a gone pid is proof enough: no need to wait out the heartbeats.
    again = service(WORKER_ID=host, WORKER_POOLS="llm-chat=2", WORKER_HEARTBEAT_TIMEOUT="60000")
    eventually(lambda: len(again.worker_pids(r)) == 2, what="two workers again")
    assert "refusing to start" not in again.tail(200)


def test_a_worker_id_held_by_another_machine_is_refused_until_its_heartbeats_expire(
    service, redis_url: str, r: redis.Redis
) -> None:
    # Another machine's supervisor registered a worker under our WORKER_ID, as Housekeeping
    # does (registry entry and heartbeat key), then died: its heartbeat lasts 1.5 s more.
    host = f"t{uuid.uuid4().hex[:8]}"
    rq = ReliableQueue(r, settings_for({"REDIS_URL": redis_url}))
    other = WorkerInfo(queue="llm-chat", host=host, hostname="gpu-7.example", pid=4242, since="")
    rq.register(f"{host}:4242", other, ttl_ms=1500)

    refused = service(ready=False, WORKER_ID=host, WORKER_POOLS="llm-chat=1", WORKER_HEARTBEAT_TIMEOUT="1000")
    assert refused.wait(20) == exitcodes.USAGE
    assert f"WORKER_ID='{host}' is in use by a live supervisor on host gpu-7.example" in refused.tail(50)

    eventually(lambda: not r.exists(rq.keys.heartbeat(f"{host}:4242")), what="its heartbeat to expire", timeout=10)
    svc = service(WORKER_ID=host, WORKER_POOLS="llm-chat=1", WORKER_HEARTBEAT_TIMEOUT="1000")
    eventually(lambda: len(svc.worker_pids(r)) == 1, what="its worker")
    assert "refusing to start" not in svc.tail(200)
