"""The HTTP process as Kubernetes, Docker, Prometheus and an operator use it."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis
import urllib3
from prometheus_client.parser import text_string_to_metric_families
from support import chat, client_for, eventually, wait_all

from llm_worker.devtools.simulator import Fault, Simulator, SimulatorConfig
from llm_worker.http.app import MAX_BODY, OLLAMA_WAITING, THREADS
from llm_worker.http.liveprobe import FRESH, LiveProbe
from llm_worker.plugin.providers import Health

FAST = {"HOST_SAMPLE_INTERVAL": "200", "OLLAMA_HEALTH_CHECK_INTERVAL": "500"}


def scrape(svc, accept: str | None = None) -> dict[tuple[str, tuple], float]:
    headers = {"Accept": accept} if accept else {}
    text = urllib3.request("GET", svc.url + "/metrics", headers=headers).data.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def count(samples: dict, name: str, **labels: str) -> float:
    """A sample's value, 0 while the series does not exist yet."""
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_health_liveness_readiness_answer_with_the_services_shapes(service) -> None:
    svc = service()
    status, body = svc.get("/health")
    assert status == 200 and body["status"] == "healthy" and body["workerId"] == svc.env["WORKER_ID"]
    assert {"timestamp", "uptime", "version"} <= set(body)
    assert svc.get("/")[1]["status"] == "healthy"
    status, body = svc.get("/health/live")
    assert status == 200 and body["status"] == "alive"
    status, body = svc.get("/health/ready")
    assert status == 200 and body["status"] == "ready"
    assert svc.get("/nope")[0] == 404
    assert urllib3.request("POST", svc.url + "/health").status == 405


def test_not_ready_while_workers_boot_but_live_and_healthy(service) -> None:
    svc = service(
        ready=False, LLM_WORKER_PLUGINS="testplugins", TESTPLUGINS_BOOT_SECONDS="3", WORKER_POOLS="llm-chat=2"
    )
    status, body = eventually(
        lambda: (lambda got: got if got[0] in (200, 503) else None)(_get_or_none(svc, "/health/ready")),
        timeout=20,
        what="the HTTP process up",
    )
    assert status == 503 and body["reason"] == "0 of 2 workers up, 1 needed"
    assert svc.get("/health/live")[0] == 200
    assert svc.get("/status")[1]["workers"][0]["state"] == "booting"
    eventually(lambda: svc.get("/health/ready")[0] == 200, timeout=20, what="ready once booted")


def _get_or_none(svc, path: str):  # type: ignore[no-untyped-def]
    try:
        return svc.get(path)
    except urllib3.exceptions.HTTPError:
        return (None, None)


def test_metrics_exist_at_zero_before_the_first_job(service) -> None:
    svc = service(
        WORKER_POOLS="llm-chat=2,llm-embeddings=1",
        DEFAULT_CHAT_MODEL="llama3.2",
        DEFAULT_EMBEDDING_MODEL="nomic-embed-text",
        **FAST,
    )
    samples = scrape(svc)
    assert value(samples, "llm_worker_dead_letters_trimmed_total") == 0
    for job_type in ("chat", "generate"):
        for outcome in ("completed", "failed", "retried"):
            assert (
                value(
                    samples, "llm_worker_jobs_total", queue="llm-chat", type=job_type, model="llama3.2", outcome=outcome
                )
                == 0
            )
        assert value(samples, "llm_worker_job_duration_seconds_count", queue="llm-chat", type=job_type) == 0
    assert (
        value(
            samples,
            "llm_worker_jobs_total",
            queue="llm-embeddings",
            type="embeddings",
            model="nomic-embed-text",
            outcome="completed",
        )
        == 0
    )
    assert value(samples, "llm_worker_tokens_total", model="llama3.2", kind="prompt") == 0
    assert value(samples, "llm_worker_model_job_duration_seconds_count", model="nomic-embed-text") == 0
    assert value(samples, "llm_worker_workers", pool="llm-chat", state="idle") == 2
    assert value(samples, "llm_worker_workers_wanted", pool="llm-embeddings") == 1
    assert value(samples, "llm_worker_queue_wait_seconds_count", queue="llm-chat") == 0
    assert value(samples, "llm_worker_worker_crashes_total", pool="llm-chat") == 0
    assert value(samples, "llm_worker_fallbacks_total", queue="llm-chat") == 0
    assert value(samples, "llm_worker_cache_hits_total", queue="llm-chat") == 0
    assert value(samples, "llm_worker_jobs_reclaimed_total") == 0
    assert value(samples, "llm_worker_redis_up") == 1
    assert (
        value(
            samples,
            "llm_worker_build_info",
            version=__import__("llm_worker").__version__,
            python=__import__("platform").python_version(),
        )
        == 1
    )
    slots = [dict(labels) for name, labels in samples if name == "llm_worker_worker_resident_memory_bytes"]
    assert sorted(s["pool"] for s in slots) == ["llm-chat", "llm-chat", "llm-embeddings"]
    assert all(name.startswith("llm_worker_") for name, _ in samples)


def test_counters_count_jobs_and_stay_monotonic_across_a_sigkilled_worker(
    service, sim: Simulator, redis_url: str, r: redis.Redis
) -> None:
    svc = service(WORKER_POOLS="llm-chat=2", **FAST)
    client = client_for(redis_url)
    wait_all(client, [chat(client, f"one {n}") for n in range(6)])
    eventually(
        lambda: (
            value(
                scrape(svc),
                "llm_worker_jobs_total",
                queue="llm-chat",
                type="chat",
                model="llama3.2",
                outcome="completed",
            )
            == 6
        ),
        what="six jobs counted",
    )
    before = scrape(svc)
    done = value(before, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="llama3.2", outcome="completed")
    assert done == 6
    assert value(before, "llm_worker_tokens_total", model="llama3.2", kind="completion") > 0
    assert value(before, "llm_worker_job_duration_seconds_count", queue="llm-chat", type="chat") == 6
    assert value(before, "llm_worker_model_job_duration_seconds_count", model="llama3.2") == 6
    assert value(before, "llm_worker_queue_wait_seconds_count", queue="llm-chat") == 6
    killed = svc.worker_pids(r)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    eventually(
        lambda: (lambda now: len(now) == 2 and not set(now) & set(killed))(svc.worker_pids(r)), what="respawned workers"
    )
    after = scrape(svc)
    for key, count in before.items():
        if key[0].endswith(("_total", "_count", "_sum", "_bucket")) and "cpu_seconds" not in key[0]:
            assert after.get(key, 0) >= count, key  # counts of dead workers are kept
    assert value(after, "llm_worker_worker_crashes_total", pool="llm-chat") == 2
    wait_all(client, [chat(client, "after")])
    # The worker counts a job just after its result is written: look again if need be.
    eventually(
        lambda: (
            value(
                scrape(svc),
                "llm_worker_jobs_total",
                queue="llm-chat",
                type="chat",
                model="llama3.2",
                outcome="completed",
            )
            == 7
        ),
        what="the seventh job counted",
    )


def test_failures_retries_and_rejections_are_counted(service, sim: Simulator, redis_url: str, r: redis.Redis) -> None:
    from llm_worker.devtools.simulator import Fault

    svc = service(WORKER_POOLS="llm-chat=1", QUEUE_DELAY="10", QUEUE_MAX_ATTEMPTS="2", OLLAMA_MAX_RETRIES="0", **FAST)
    sim.set_faults([Fault(status=500, message="error reading llama-server response: unexpected EOF")])
    client = client_for(redis_url)
    wait_all(client, [chat(client)])
    r.lpush("llm-chat", b"not a job")
    eventually(lambda: r.llen("llm-dead-letter") == 2, what="two dead letters")
    samples = eventually(
        lambda: (lambda s: s if value(s, "llm_worker_payloads_rejected_total", queue="llm-chat") else None)(
            scrape(svc)
        ),
        what="the rejection counted",
    )
    assert (
        value(samples, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="llama3.2", outcome="retried") == 1
    )
    assert (
        value(samples, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="llama3.2", outcome="failed") == 1
    )
    assert value(samples, "llm_worker_payloads_rejected_total", queue="llm-chat") == 1
    eventually(lambda: value(scrape(svc), "llm_worker_dead_letter_jobs") == 2, what="dead letters sampled")


def test_model_labels_are_bounded_and_the_rest_count_as_other(service, redis_url: str) -> None:
    from llm_worker.host.layout import MAX_MODELS

    svc = service(WORKER_POOLS="llm-chat=2", **FAST)
    client = client_for(redis_url)
    # Thirty models the provider does not have: each job fails, each under its model's label while there is room.
    first = chat(client, model="llama3.2:latest")
    wait_all(client, [first])
    ids = [chat(client, model=f"unknown-{n}") for n in range(30)]
    wait_all(client, ids)

    def counted() -> dict | None:
        samples = scrape(svc)
        failed = {
            dict(labels)["model"]: v
            for (name, labels), v in samples.items()
            if name == "llm_worker_jobs_total" and dict(labels)["outcome"] == "failed" and v
        }
        return samples if sum(failed.values()) == 30 else None

    samples = eventually(counted, what="thirty failures counted")
    models = {dict(labels)["model"] for name, labels in samples if name == "llm_worker_jobs_total"}
    assert len(models) <= MAX_MODELS and "other" in models
    assert value(samples, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="other", outcome="failed") > 0
    assert (
        value(samples, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="llama3.2", outcome="completed")
        == 1
    )


def test_models_outside_allowed_models_are_refused_not_labelled(service, redis_url: str) -> None:
    svc = service(WORKER_POOLS="llm-chat=1", ALLOWED_MODELS="llama3.2,mistral", **FAST)
    client = client_for(redis_url)
    results = wait_all(client, [chat(client, model="llama3.2:latest"), chat(client, model="gemma")])
    assert [r["success"] for r in results.values()] == [True, False]
    # Refused by the allow-list filter: a failed job (validation), counted under "other".
    samples = eventually(
        lambda: (
            lambda s: (
                s
                if count(s, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="other", outcome="failed")
                else None
            )
        )(scrape(svc)),
        what="the refusal counted",
    )
    assert (
        value(samples, "llm_worker_jobs_total", queue="llm-chat", type="chat", model="llama3.2", outcome="completed")
        == 1
    )
    assert not any(dict(labels).get("model") == "gemma" for _, labels in samples)


def test_dead_letters_trimmed_is_the_redis_counter_all_hosts_share(service, r: redis.Redis) -> None:
    r.set("llm:dead-letters-trimmed", 7)  # as the queue's scripts count what QUEUE_REMOVE_ON_FAIL trims
    svc = service(WORKER_POOLS="llm-chat=1")
    assert value(scrape(svc), "llm_worker_dead_letters_trimmed_total") == 7


def test_exposition_negotiates_openmetrics_and_gzip(service) -> None:
    svc = service()
    plain = urllib3.request("GET", svc.url + "/metrics")
    assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    om = urllib3.request("GET", svc.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text") and om.data.decode().endswith(
        "# EOF\n"
    )
    zipped = urllib3.request("GET", svc.url + "/metrics", headers={"Accept-Encoding": "gzip"}, decode_content=False)
    assert zipped.headers["Content-Encoding"] == "gzip" and b"llm_worker_workers" in gzip.decompress(zipped.data)


def test_promtool_accepts_the_exposition(service, redis_url: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed, and CI must check the exposition with it")
        pytest.skip("promtool is not installed (Debian's prometheus package has it)")
    svc = service(**FAST)
    client = client_for(redis_url)
    wait_all(client, [chat(client)])
    text = urllib3.request("GET", svc.url + "/metrics").data
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_readiness_follows_redis_and_drain_while_liveness_holds(service, sim: Simulator, tmp_path) -> None:
    from llm_worker.devtools.localredis import LocalRedis

    with LocalRedis(tmp_path / "own", appendonly=False) as own:
        svc = service(REDIS_URL=own.url, WORKER_POOLS="llm-chat=1", **FAST)
        assert svc.get("/health/ready")[0] == 200
        own.kill()
        eventually(lambda: svc.get("/health/ready")[0] == 503, timeout=15, what="not ready without Redis")
        assert svc.get("/health/ready")[1]["reason"] == "Redis unreachable"
        assert svc.get("/health/live")[0] == 200
        own.start()
        eventually(lambda: svc.get("/health/ready")[0] == 200, timeout=15, what="ready again")
        sim.config.latency_ms = 3000
        chat(client_for(own.url))
        eventually(lambda: svc.get("/status")[1]["workers"][0]["state"] == "busy", what="a job in hand")
        svc.send(signal.SIGTERM)
        eventually(lambda: svc.get("/health/ready")[1].get("reason") == "draining", what="not ready while draining")
        assert svc.get("/health/live")[0] == 200
        assert svc.wait(20) == 0


def test_ollama_down_shows_in_its_health_route_not_in_liveness(service, sim: Simulator) -> None:
    svc = service(**FAST)
    status, body = svc.get("/health/ollama")
    assert status == 200 and body["status"] == "healthy" and body["url"] == sim.url and body["error_details"] is None
    assert body["message"] == "Ollama server is reachable." and body["version"] and body["checkedSecondsAgo"] >= 0
    sim.stop()
    eventually(lambda: svc.get("/health/ollama")[0] == 503, timeout=15, what="Ollama seen down")
    body = svc.get("/health/ollama")[1]
    assert set(body) >= {"status", "message", "url", "error_details"} and body["error_details"]
    assert body["status"] == "unhealthy"
    assert svc.get("/health/live")[0] == 200
    eventually(
        lambda: value(scrape(svc), "llm_worker_provider_up", provider="ollama") == 0, what="the sampler saw it too"
    )


# The sampler's own probe comes every 30 s by default; these tests leave it there
# (or at an hour), so that only the live probe can make /health/ollama follow Ollama.
HOUR = {"OLLAMA_HEALTH_CHECK_INTERVAL": "3600000"}


def versions_asked(sim: Simulator) -> int:
    return sim.stats().requests.get("version", 0)


def concurrently(svc, n: int, timeout: float = 20.0) -> tuple[list[tuple[int, dict]], threading.Event, list[int]]:  # type: ignore[no-untyped-def]
    """Start ``n`` GET /health/ollama at once.

    Returns their answers (filled in as they come), an event set when all have come, and their count (a list of one).
    """
    http = urllib3.PoolManager(maxsize=n, retries=False, timeout=urllib3.Timeout(connect=2, read=timeout))
    start = threading.Barrier(n)
    answers: list[tuple[int, dict]] = []
    finished = [0]
    lock = threading.Lock()
    done = threading.Event()

    def one() -> None:
        start.wait()
        resp = http.request("GET", svc.url + "/health/ollama")
        with lock:
            answers.append((resp.status, resp.json()))
            finished[0] += 1
            if finished[0] == n:
                done.set()

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    return answers, done, finished


def test_ollama_health_is_asked_live_503_soon_after_ollama_stops_and_200_once_back(service, sim: Simulator) -> None:
    svc = service()  # the sampler probes every 30 s: only a live probe sees the stop within the deadline below
    assert svc.get("/health/ollama")[0] == 200
    port = sim.port
    sim.stop()
    _, body = eventually(
        lambda: (lambda got: got if got[0] == 503 else None)(svc.get("/health/ollama")),
        timeout=10,
        interval=0.05,
        what="503 after Ollama stopped",
    )
    assert body["status"] == "unhealthy" and body["url"] == sim.url and "cannot reach" in body["error_details"]
    assert svc.get("/health/live")[0] == 200
    back = Simulator(SimulatorConfig(port=port)).start()
    try:
        eventually(
            lambda: svc.get("/health/ollama")[0] == 200, timeout=10, interval=0.05, what="200 once Ollama is back"
        )
    finally:
        back.stop()


def test_requests_that_arrive_together_share_one_probe(service, sim: Simulator) -> None:
    svc = service(**HOUR)
    assert svc.get("/health/ollama")[0] == 200
    time.sleep(FRESH + 0.2)  # let that answer age, so the burst below needs a probe of its own
    # The burst's one probe hangs 3 s, so every request of the burst arrives while it is in flight.
    sim.set_faults([Fault(kind="hang", endpoints=("version",), seconds=3.0, count=1)])
    before = versions_asked(sim)
    answers, done, _ = concurrently(svc, OLLAMA_WAITING)
    assert done.wait(30), answers
    assert [status for status, _ in answers] == [200] * OLLAMA_WAITING
    assert versions_asked(sim) - before == 1
    assert sim.stats().faults_fired == 1


def test_a_healthcheck_timeout_shorter_than_a_hanging_ollama_answers_503(service, sim: Simulator) -> None:
    svc = service(HEALTHCHECK_TIMEOUT="0.5")
    assert svc.get("/health/ollama")[0] == 200
    sim.set_faults([Fault(kind="hang", endpoints=("version",))])
    _, body = eventually(
        lambda: (lambda got: got if got[0] == 503 else None)(svc.get("/health/ollama")),
        timeout=15,
        what="503 while Ollama hangs",
    )
    assert body["status"] == "unhealthy" and "no answer within 0.5s" in body["error_details"]
    assert svc.get("/health/live")[0] == 200
    sim.clear_faults()
    eventually(lambda: svc.get("/health/ollama")[0] == 200, timeout=15, what="200 once Ollama answers again")


def test_liveness_answers_while_health_ollama_requests_wait_on_a_hanging_ollama(service, sim: Simulator) -> None:
    svc = service(HEALTHCHECK_TIMEOUT="8", **HOUR)
    assert svc.get("/health/ollama")[0] == 200
    time.sleep(FRESH + 0.2)
    sim.set_faults([Fault(kind="hang", endpoints=("version",))])
    before = versions_asked(sim)
    # As many as waitress has threads: OLLAMA_WAITING wait on the probe, the rest get the last answer at once.
    answers, done, finished = concurrently(svc, THREADS)
    eventually(lambda: finished[0] == THREADS - OLLAMA_WAITING, what="the requests past the cap answered")
    assert [status for status, _ in answers] == [200] * (THREADS - OLLAMA_WAITING)
    assert svc.get("/health/live")[0] == 200 and svc.get("/health/ready")[0] == 200
    assert finished[0] == THREADS - OLLAMA_WAITING  # the waiting ones still wait: liveness did not queue behind them
    assert done.wait(30)
    late = answers[THREADS - OLLAMA_WAITING :]
    assert all(status == 503 and "no answer within 8.0s" in body["error_details"] for status, body in late), late
    assert versions_asked(sim) - before == 1


class _Stuck:
    """A provider whose health() ignores its timeout until released (a plugin's bug)."""

    name = "stuck"
    url = "http://stuck.invalid"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def health(self, timeout: float) -> Health:
        self.calls += 1
        self.release.wait(30)
        return Health(ok=True, message="up", url=self.url, version="1")


def test_a_health_probe_that_overruns_holds_no_caller_past_its_timeout() -> None:
    stuck = _Stuck()
    probe = LiveProbe(lambda: [stuck])
    first = probe.check(0.1)
    assert not first.health.ok and "no answer within 0.1s" in first.health.error_details
    second = probe.check(0.1)  # joins the probe still in flight instead of starting one
    assert not second.health.ok and stuck.calls == 1
    stuck.release.set()
    eventually(lambda: probe.last() is not None, what="the overrunning probe's answer")
    answer = probe.check(5.0)
    assert answer.health.ok and answer.provider == "stuck"


def test_status_shows_pools_workers_and_the_job_in_hand(service, sim: Simulator, redis_url: str) -> None:
    sim.config.latency_ms = 2000
    svc = service(WORKER_POOLS="llm-chat=1,llm-embeddings=1", **FAST)
    job = chat(client_for(redis_url))
    body = eventually(
        lambda: (lambda b: b if any(w["jobId"] == job for w in b["workers"]) else None)(svc.get("/status")[1]),
        what="the job in /status",
    )
    running = {"wanted": 1, "workers": 1, "paused": False, "pausedBecause": None}
    assert body["pools"] == {"llm-chat": running, "llm-embeddings": running}
    busy = next(w for w in body["workers"] if w["jobId"] == job)
    assert busy["state"] == "busy" and busy["pool"] == "llm-chat" and busy["jobSeconds"] >= 0
    assert set(body) >= {"queues", "breakers", "models", "gpu", "provider", "redis", "phase", "ready"}


def test_admin_routes_need_the_token_and_are_off_without_one(service, redis_url: str) -> None:
    svc = service(ADMIN_TOKEN="s3cret-token", WORKER_POOLS="llm-chat=1")
    wait_all(client_for(redis_url), [chat(client_for(redis_url))])
    assert urllib3.request("GET", svc.url + "/admin/queue/stats").status == 401
    wrong = urllib3.request("GET", svc.url + "/admin/queue/stats", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
    ok = urllib3.request("GET", svc.url + "/admin/queue/stats", headers={"Authorization": "Bearer s3cret-token"})
    stats = ok.json()
    assert ok.status == 200 and stats["llm-chat"] == {
        "waiting": 0,
        "parked": 0,
        "active": 0,
        "completed": 1,
        "failed": 0,
    }
    for path in ("/health", "/status", "/metrics"):
        assert b"s3cret-token" not in urllib3.request("GET", svc.url + path).data
    off = service(WORKER_POOLS="llm-chat=1")
    assert urllib3.request("GET", off.url + "/admin/queue/stats", headers={"Authorization": "Bearer x"}).status == 404


def test_a_request_body_past_the_limit_is_refused_before_it_is_read(service) -> None:
    svc = service(ADMIN_TOKEN="s3cret-token", WORKER_POOLS="llm-chat=1")
    host, port = svc.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        # A megabyte announced, a kilobyte sent: without the limit waitress waits for
        # (and buffers) the rest, up to its default of a gigabyte.
        conn.sendall(
            b"POST /admin/breakers/reset?key=x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-token\r\n"
            b"Content-Length: 1048576\r\n\r\n" + b"x" * 1024
        )
        status_line = conn.makefile("rb").readline()
    assert status_line.split()[1] == b"413", status_line
    small = urllib3.request(
        "POST",
        svc.url + "/admin/breakers/reset?key=ollama:llama3.2",
        body=b"x" * (MAX_BODY // 2),
        headers={"Authorization": "Bearer s3cret-token"},
    )
    assert small.status != 413
    assert urllib3.request("GET", svc.url + "/health/live").status == 200
