"""Redis Sentinel: the master fails over under a running service, and no job is lost; Redis Cluster is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from support import assert_each_answered_once, chat, client_for, eventually, nothing_held, outcomes_written

from llm_worker.devtools.localredis import LocalRedis, LocalSentinelGroup, free_port
from llm_worker.devtools.simulator import Simulator
from llm_worker.queue.client import NotReplicated
from llm_worker.queue.connection import ClusterRefused, connect, refuse_cluster
from llm_worker.settings.config import load


@pytest.fixture
def group(tmp_path: Path) -> Iterator[LocalSentinelGroup]:
    """A master, one replica and three sentinels that fail it over a second after it stops answering."""
    with LocalSentinelGroup(
        tmp_path / "sentinel", replicas=1, sentinels=3, down_after_ms=1000, failover_timeout_ms=3000
    ) as g:
        yield g


def test_a_client_through_sentinels_talks_to_the_master_and_follows_a_failover(group: LocalSentinelGroup) -> None:
    settings = load(group.env).settings
    client = connect(settings, timeout=2.0)
    client.set("where", "first master")
    old = group.master()
    assert old.client().get("where") == b"first master"
    group.wait_watched()
    group.failover()
    new = group.wait_new_master(old.port)
    # The pool asks the sentinels again within a second, without a failed call.
    eventually(
        lambda: client.set("where", "second master") and new.client().get("where") == b"second master",
        timeout=10,
        interval=0.2,
        what="writes reach the new master",
    )


@pytest.mark.parametrize("how", ["killed", "sentinel failover"])
def test_a_master_failing_over_mid_run_loses_no_job(
    service, sim: Simulator, group: LocalSentinelGroup, how: str
) -> None:
    # Given a service that finds its Redis through three sentinels
    sim.config.latency_ms = 60
    svc = service(**group.env, WORKER_POOLS="llm-chat=3")
    group.wait_watched()
    old = group.master()
    # ... busy with jobs that are all on the replica too (a producer that must not lose one waits for a replica)
    client = client_for(group.env["REDIS_URL"], **group.env)
    ids = [chat(client, f"job {n}") for n in range(149)] + [
        chat(client, "job 149", replicas=1, replica_timeout_ms=10_000)
    ]
    pushed = old.client()
    eventually(lambda: outcomes_written(pushed) >= 20, timeout=30, what="work under way")
    # When the master fails over mid-run: it crashes, or an operator moves it
    if how == "killed":
        old.kill()
    else:
        group.failover()
    new = group.wait_new_master(old.port, timeout=30)
    # Then every job has exactly one result on the new master, and nothing stays in hand
    r = new.client()
    eventually(
        lambda: all(r.exists(f"llm:result:{i}") for i in ids),
        timeout=60,
        interval=0.2,
        what="every result on the new master",
    )
    assert all(client.result(i)["success"] for i in ids)  # the producer's client follows the master too
    assert_each_answered_once(r, ids)
    eventually(lambda: nothing_held(r), timeout=10, what="processing lists empty")
    # ... and the service runs on the new master: its workers' heartbeats are there, and it is ready
    eventually(lambda: len(svc.worker_pids(r)) == 3, timeout=10, what="three workers registered on the new master")
    eventually(lambda: svc.get("/health/ready")[0] == 200, timeout=10, what="ready")
    assert "Redis reachable again" in svc.tail(2000)
    assert svc.process.poll() is None  # nobody crash-looped


# ---- Redis Cluster -----------------------------------------------------------------------


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[LocalRedis]:
    directory = tmp_path / "cluster"
    with LocalRedis(
        directory,
        appendonly=False,
        extra=(
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(directory / "nodes.conf"),
            # the bus port defaults to port + 10000, past 65535 for a high free port
            "--cluster-port",
            str(free_port()),
        ),
    ) as node:
        yield node


def test_a_cluster_node_is_refused_and_a_plain_redis_is_not(cluster_node: LocalRedis, r: redis.Redis) -> None:
    with pytest.raises(ClusterRefused, match="REDIS_SENTINELS"):
        refuse_cluster(cluster_node.client())
    refuse_cluster(r)


def test_run_refuses_a_cluster_at_start_with_the_reason(cluster_node: LocalRedis, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "REDIS_URL": cluster_node.url,
        "HEALTH_CHECK_PORT": "0",
        "WORKER_POOLS": "llm-chat=1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert done.returncode == 2, done.stderr
    assert "Redis is a Cluster node (cluster_enabled:1)" in done.stderr
    assert "Traceback" not in done.stderr


def test_submit_waits_for_replicas_and_says_when_too_few_confirmed(tmp_path: Path) -> None:
    with (
        LocalRedis(tmp_path / "master", appendonly=False) as master,
        LocalRedis(
            tmp_path / "replica", appendonly=False, extra=("--replicaof", "127.0.0.1", str(master.port))
        ) as replica,
    ):
        client = client_for(master.url)
        eventually(
            lambda: replica.client().info("replication")["master_link_status"] == "up",
            timeout=20,
            what="replica linked",
        )
        job_id = chat(client, "kept twice", replicas=1, replica_timeout_ms=5000)
        assert replica.client().llen("llm-chat") == 1  # on the replica when submit returned
        with pytest.raises(NotReplicated, match="reached 1 of 2 replicas") as refused:
            chat(client, "wants two", replicas=2, replica_timeout_ms=200)
        assert refused.value.confirmed == 1 and master.client().llen("llm-chat") == 2  # queued all the same
        assert job_id
