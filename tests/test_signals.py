"""Signals to the supervisor, as an operator or systemd sends them."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import redis
import urllib3
from support import chat, client_for, eventually, held_by, nothing_held, wait_all

from llm_worker.devtools.localredis import LocalRedis
from llm_worker.devtools.simulator import Simulator


def _held_ids(svc, r: redis.Redis) -> set[str]:
    host = svc.env["WORKER_ID"]
    return {job for pid in svc.worker_pids(r) for job in held_by(r, f"{host}:{pid}")}


def test_term_drains_jobs_in_hand_takes_no_new_ones_and_exits_zero(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    sim.config.latency_ms = 1500
    svc = service(WORKER_POOLS="llm-chat=2")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(4)]
    in_hand = eventually(lambda: _held_ids(svc, r) if len(_held_ids(svc, r)) == 2 else None, what="two jobs in hand")
    svc.send(signal.SIGTERM)
    assert svc.wait(15) == 0
    for job_id in ids:
        result = client.result(job_id)
        assert (result is not None and result["success"]) == (job_id in in_hand)
    assert r.llen("llm-chat") == 2  # the waiting ones stay for other hosts
    assert nothing_held(r)


def test_a_drain_that_runs_out_of_time_hands_jobs_back_uncounted(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    sim.config.latency_ms = 20_000
    svc = service(WORKER_POOLS="llm-chat=2", WORKER_GRACEFUL_TIMEOUT="500")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(2)]
    eventually(lambda: len(_held_ids(svc, r)) == 2, what="two jobs in hand")
    started = time.monotonic()
    svc.send(signal.SIGTERM)
    assert svc.wait(15) == 0
    assert time.monotonic() - started < 8
    assert r.llen("llm-chat") == 2 and nothing_held(r)
    assert all(r.get(f"llm:crashes:{job_id}") is None for job_id in ids)  # not the jobs' fault


def test_quit_stops_at_once_and_hands_jobs_back(service, sim: Simulator, redis_url: str, r: redis.Redis) -> None:
    sim.config.latency_ms = 20_000
    svc = service(WORKER_POOLS="llm-chat=2")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(2)]
    eventually(lambda: len(_held_ids(svc, r)) == 2, what="two jobs in hand")
    started = time.monotonic()
    svc.send(signal.SIGQUIT)
    assert svc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert r.llen("llm-chat") == 2 and nothing_held(r)
    assert all(r.get(f"llm:crashes:{job_id}") is None for job_id in ids)


def test_ctrl_c_drains_and_a_second_ctrl_c_stops_at_once(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    sim.config.latency_ms = 20_000
    svc = service(WORKER_POOLS="llm-chat=1")
    chat(client_for(redis_url))
    eventually(lambda: len(_held_ids(svc, r)) == 1, what="a job in hand")
    svc.send(signal.SIGINT)
    time.sleep(0.3)
    assert svc.process.poll() is None  # draining: the job in hand may finish
    svc.send(signal.SIGINT)
    assert svc.wait(10) == 0
    assert r.llen("llm-chat") == 1 and nothing_held(r)


def test_hup_rereads_the_config_file_and_replaces_workers_one_by_one(
    service, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    config = tmp_path / "llm-worker.toml"
    config.write_text('[worker]\npools = { "llm-chat" = 2 }\n')
    svc = service(args=("--config", str(config)))  # the file wins over the test's WORKER_POOLS
    old = set(svc.worker_pids(r))
    assert len(old) == 2
    client = client_for(redis_url)
    config.write_text('[worker]\npools = { "llm-chat" = 3 }\n')
    svc.send(signal.SIGHUP)
    ids = [chat(client, f"during reload {n}") for n in range(20)]

    def replaced() -> set[int] | None:
        pids = set(svc.worker_pids(r))
        return pids if len(pids) == 3 and not pids & old else None

    eventually(replaced, timeout=30, what="three new workers and none of the old")
    assert all(res["success"] for res in wait_all(client, ids, timeout=30).values())
    assert nothing_held(r)


def test_a_reload_with_a_bad_setting_keeps_the_running_settings(
    service, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    config = tmp_path / "llm-worker.toml"
    config.write_text('[worker]\npools = { "llm-chat" = 1 }\n')
    svc = service(args=("--config", str(config)))
    pids = svc.worker_pids(r)
    config.write_text('[worker]\nconcurrency = "lots"\n')
    svc.send(signal.SIGHUP)
    eventually(lambda: "reload refused" in svc.tail(50), what="the refusal logged")
    assert "worker.concurrency" in svc.tail(50)
    assert svc.worker_pids(r) == pids and svc.process.poll() is None


def test_hups_that_rename_a_pool_over_and_over_never_fill_the_pool_table(
    service, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    # The host's pool table has 16 rows: a pool renamed by HUP must take the row of one gone, not a new one.
    config = tmp_path / "llm-worker.toml"

    def declare(extra: str) -> None:
        config.write_text(f'[queue]\nextra = ["{extra}"]\n\n[worker]\npools = {{ "llm-chat" = 1, "{extra}" = 1 }}\n')

    declare("extra-0")
    svc = service(args=("--config", str(config)))
    for n in range(1, 21):
        current = {"llm-chat", f"extra-{n}"}
        declare(f"extra-{n}")
        svc.send(signal.SIGHUP)

        def settled(current: set[str] = current) -> dict | None:
            try:
                status = svc.get("/status")[1]
            except (OSError, urllib3.exceptions.HTTPError):  # the HTTP process restarts on each reload
                return None
            served = [w["pool"] for w in status["workers"]]  # type: ignore[union-attr]
            return status if set(served) == current and len(served) == 2 else None

        status = eventually(settled, timeout=30, what=f"the workers of {sorted(current)} alone")
        assert current <= set(status["pools"]) and len(status["pools"]) <= 16, status["pools"]
        assert svc.process.poll() is None
    log = svc.tail(5000)
    assert "more than 16 pools" not in log and "reload refused" not in log and "Traceback" not in log, log
    job = chat(client_for(redis_url), queue="extra-20")
    assert wait_all(client_for(redis_url), [job])[job]["success"]


def test_ttin_adds_and_ttou_removes_a_chat_worker(service, redis_url: str, r: redis.Redis) -> None:
    svc = service(WORKER_POOLS="llm-chat=1")
    assert len(svc.worker_pids(r)) == 1
    svc.send(signal.SIGTTIN)
    eventually(lambda: len(svc.worker_pids(r)) == 2, what="two chat workers")
    svc.send(signal.SIGTTOU)
    eventually(lambda: len(svc.worker_pids(r)) == 1, what="one chat worker")
    job = chat(client_for(redis_url))
    assert wait_all(client_for(redis_url), [job])[job]["success"]


def test_workers_that_redis_refuses_stop_the_supervisor_with_the_reason(service, tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "locked", appendonly=False, password="right") as locked:
        svc = service(ready=False, REDIS_URL=locked.url.replace(":right@", ":wrong@"), WORKER_BOOT_RETRIES="3")
        assert svc.wait(60) == 3
        log = svc.tail(200)
        assert "workers cannot boot" in log and "Redis refused us" in log
        assert "Traceback" not in log


def test_term_to_the_whole_process_group_drains_as_cleanly_as_term_to_the_supervisor(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # `timeout 90 llm-worker run`, systemd's KillMode=control-group, `kill -- -PGID`: every process gets TERM.
    sim.config.latency_ms = 1500
    svc = service(WORKER_POOLS="llm-chat=2")
    client = client_for(redis_url)
    ids = [chat(client, f"job {n}") for n in range(2)]
    eventually(lambda: len(_held_ids(svc, r)) == 2, what="two jobs in hand")
    os.killpg(svc.pid, signal.SIGTERM)
    assert svc.wait(15) == 0
    assert all(client.result(job_id)["success"] for job_id in ids)  # type: ignore[index]
    assert nothing_held(r)
    log = svc.tail(300)
    assert "died" not in log and "ERROR" not in log and "Traceback" not in log, log
    assert re.search(r"INFO .* http process stopped: killed by SIGTERM", log), log


def test_the_log_names_each_worker_booting_and_a_drained_one_as_stopped_not_dead(
    service, redis_url: str, r: redis.Redis
) -> None:
    svc = service(WORKER_POOLS="llm-chat=2")
    pids = eventually(lambda: svc.worker_pids(r) if len(svc.worker_pids(r)) == 2 else None, what="two workers")
    svc.send(signal.SIGTERM)
    assert svc.wait(15) == 0
    log = svc.tail(300)
    for pid in pids:  # type: ignore[union-attr]
        assert re.search(rf"INFO .* booting worker with pid {pid} .*kind=worker queue=llm-chat", log), log
        assert re.search(rf"INFO .* worker stopped: exited with 0 .*worker=\S+:{pid} .*reason=drain", log), log
    assert re.search(r"INFO .* booting http process with pid \d+", log), log
    assert re.search(r"INFO .* booting models process with pid \d+", log), log
    assert "deadWorker" not in log and "died" not in log, log


def test_term_to_the_whole_group_during_a_model_load_still_drains_the_job_waiting_for_it(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    # Given: a job waiting for its model, which the model manager is loading (3 s).
    sim.config.load_ms = 3000
    svc = service(WORKER_POOLS="llm-chat=1")
    client = client_for(redis_url)
    job = chat(client, "wait for me")
    eventually(lambda: svc.get("/status")[1]["models"]["loading"], timeout=10, what="the load under way")
    # When: the whole process group gets TERM: the model manager dies with its load, and a drain starts no
    # new one.
    os.killpg(svc.pid, signal.SIGTERM)
    # Then: the waiting worker sees its manager gone and lets Ollama load the model for its call, so the job
    # is answered and the drain ends well within WORKER_GRACEFUL_TIMEOUT (30 s), not killed at its end.
    assert svc.wait(25) == 0
    result = client.result(job)
    assert result is not None and result["success"], result
    assert "SIGKILL" not in svc.tail(300)
