"""Security review: what leaves the host, to whom, and over what.

The admin token (constant-time comparison, 401 without it, routes off when it
is unset) is tested in test_http.py; masked settings in test_config.py; the
payload size limit before decoding in test_jobs.py; the systemd unit's
exposure in test_systemd_unit.py. Here: no prompt, completion or secret in
any route, log line or event; Redis over TLS; Redis ACL users with the least
privilege the README documents; the container image's user.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import urllib3
from support import client_for, wait_all

from llm_worker.devtools.localredis import LocalRedis, free_port, redis_server_binary
from llm_worker.devtools.simulator import Simulator

ROOT = Path(__file__).parent.parent
PROMPT = "tell me about the zebra-4f1d7 sanctuary"
SECRETS = {"REDIS_PASSWORD": "redis-pw-9c2e", "ADMIN_TOKEN": "admin-token-51ab", "OPENAI_API_KEY": "sk-key-77d0"}
# The ACL the README documents for llm-worker's Redis user (keep the two the same).
ACL = ["on", "~llm:*", "~llm-*", "resetchannels", "+@all", "-@dangerous", "+info", "+ping"]


def _every_route(svc: Any, token: str) -> dict[str, str]:
    http = urllib3.PoolManager()
    out = {}
    for path in (
        "/",
        "/health",
        "/health/live",
        "/health/ready",
        "/health/ollama",
        "/status",
        "/metrics",
        "/dashboard/data",
    ):
        out[path] = http.request("GET", svc.url + path).data.decode(errors="replace")
    for path in ("/admin/queue/stats", "/admin/breakers", "/dashboard/data"):
        got = http.request("GET", svc.url + path, headers={"Authorization": f"Bearer {token}"}).data.decode()
        out[f"{path} with the token"] = got
    return out


def test_no_prompt_completion_or_secret_in_routes_logs_or_events(service, sim: Simulator, tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis", password=SECRETS["REDIS_PASSWORD"]) as store:
        svc = service(
            REDIS_URL=f"redis://127.0.0.1:{store.port}/0",
            WORKER_POOLS="llm-chat=1,llm-embeddings=1",
            OPENAI_BASE_URL=sim.url + "/v1",
            LOG_LEVEL="debug",
            **SECRETS,
        )
        client = client_for(store.url)
        ids = [
            client.submit("chat", {"messages": [{"role": "user", "content": PROMPT}]}, model="llama3.2"),
            client.submit(
                "chat", {"messages": [{"role": "user", "content": PROMPT}], "stream": True}, model="llama3.2"
            ),
            client.submit("embeddings", {"input": PROMPT}, model="nomic-embed-text"),
            client.submit("chat", {"messages": [{"role": "wizard", "content": PROMPT}]}, model="llama3.2"),
        ]
        results = wait_all(client, ids)
        completion = results[ids[0]]["response"]["message"]["content"]
        assert len(completion) > 10
        time.sleep(1.5)  # let the sampler publish queue depths and the manager what is loaded
        exposed = {**_every_route(svc, SECRETS["ADMIN_TOKEN"]), "log": svc.tail(100_000)}
        exposed["events"] = "\n".join(str(fields) for _, fields in store.client().xrange("llm:events"))
        for where, text in exposed.items():
            assert "zebra-4f1d7" not in text, f"prompt text in {where}"
            assert completion not in text, f"completion text in {where}"
            for name, secret in SECRETS.items():
                assert secret not in text, f"{name} in {where}"
        assert "jobId" in exposed["events"] and "llm_worker_jobs_total" in exposed["/metrics"]  # they did say things


# ---- Redis over TLS ----------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path):  # type: ignore[no-untyped-def]
    """redis-server serving only TLS, with a certificate from a CA of our own."""
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=60)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=llm-worker test CA",
    )
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=localhost"
    )
    (certs / "san").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "2",
        "-extfile",
        "san",
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "redis.crt",
            "--tls-key-file",
            "redis.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(certs),
        ],
        cwd=certs,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=2).ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    yield url, port
    proc.kill()
    proc.wait(10)


def test_jobs_run_over_rediss_and_an_untrusted_certificate_stops_start_up(service, tls_redis, tmp_path: Path) -> None:
    url, port = tls_redis
    service(REDIS_URL=url, WORKER_POOLS="llm-chat=1")
    client = client_for(url)
    job = client.submit("chat", {"messages": [{"role": "user", "content": "over TLS"}]}, model="llama3.2")
    assert wait_all(client, [job])[job]["success"]
    # Without our CA the server's certificate is not trusted: start-up says so, no job is touched.
    proc = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", "queues"],
        env={**_clean_env(), "REDIS_URL": f"rediss://127.0.0.1:{port}/0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "certificate verify failed" in proc.stderr and "Traceback" not in proc.stderr


def test_jobs_run_over_a_unix_socket_and_its_password_is_never_shown(service, tmp_path: Path) -> None:
    # A socket's path must fit in sun_path (108 bytes); pytest's tmp_path may not.
    sock_dir = Path(tempfile.mkdtemp(prefix="llmw-", dir="/tmp"))
    sock = sock_dir / "redis.sock"
    password = "unix-pw-4e1b"
    try:
        with LocalRedis(
            tmp_path / "redis",
            appendonly=False,
            password=password,
            extra=("--unixsocket", str(sock), "--unixsocketperm", "700"),
        ):
            svc = service(REDIS_URL=f"unix://{sock}", REDIS_PASSWORD=password, WORKER_POOLS="llm-chat=1")
            client = client_for(f"unix://{sock}", REDIS_PASSWORD=password)
            job = client.submit("chat", {"messages": [{"role": "user", "content": "over a socket"}]}, model="llama3.2")
            assert wait_all(client, [job])[job]["success"]
            shown = subprocess.run(
                [sys.executable, "-m", "llm_worker.cli", "check-config"],
                capture_output=True,
                text=True,
                env={**_clean_env(), "REDIS_URL": f"unix://{sock}?password={password}&db=0"},
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            assert f"unix://{sock}?password=***&db=0" in shown.stdout
            assert password not in svc.tail(2000) + shown.stdout + shown.stderr
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "OLLAMA_", "WORKER_"))}


# ---- Redis ACL users ----------------------------------------------------------------------


def test_an_acl_user_with_the_documented_least_privilege_runs_everything(service, tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as store:
        admin = store.client()
        admin.execute_command("ACL", "SETUSER", "llm-worker", ">acl-pw-31", *ACL)
        admin.execute_command(
            "ACL", "SETUSER", "producer", "on", ">prod-pw", "~llm:*", "~llm-*", "+@all", "-@dangerous"
        )
        svc = service(
            REDIS_URL=f"redis://127.0.0.1:{store.port}/0",
            REDIS_USERNAME="llm-worker",
            REDIS_PASSWORD="acl-pw-31",
            WORKER_POOLS="llm-chat=1,llm-embeddings=1,llm-batch=1",
        )
        client = client_for(f"redis://producer:prod-pw@127.0.0.1:{store.port}/0")
        ids = [
            client.submit("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, model="llama3.2"),
            client.submit("embeddings", {"input": ["a", "b"]}, model="nomic-embed-text"),
            client.submit("batch", {"requests": [{"type": "generate", "request": {"prompt": "x"}}]}, model="llama3.2"),
            client.submit("chat", {"messages": [{"role": "wizard", "content": "x"}]}, model="llama3.2"),
        ]
        results = wait_all(client, ids)
        assert [r["success"] for r in results.values()] == [True, True, True, False]
        assert svc.get("/health/ready")[0] == 200
        log = svc.tail(2000)
        assert "NOPERM" not in log and "Traceback" not in log
        assert "cannot read Redis persistence settings (CONFIG is not allowed)" in log  # -@dangerous: said, not fatal


def test_a_redis_user_without_the_rights_it_needs_stops_start_up_with_the_reason(tmp_path: Path) -> None:
    from llm_worker.devtools.harness import Service

    with LocalRedis(tmp_path / "redis") as store:
        store.client().execute_command("ACL", "SETUSER", "reader", "on", ">ro-pw", "~*", "+@read", "+ping", "+info")
        svc = Service(
            {
                "REDIS_URL": f"redis://reader:ro-pw@127.0.0.1:{store.port}/0",
                "WORKER_POOLS": "llm-chat=1",
                "OLLAMA_BASE_URL": "http://127.0.0.1:9",
            },
            log_path=tmp_path / "svc.log",
        )
        svc.start(ready=False)
        code = svc.wait(60)
        assert code in (2, 3), svc.tail(50)
        assert re.search(r"NOPERM|no permissions", svc.tail(200)), svc.tail(50)
        assert "Traceback" not in svc.tail(200)


def test_credentials_revoked_mid_job_stop_the_host_with_the_reason_and_the_job_is_not_a_crash(
    service, sim: Simulator, tmp_path: Path
) -> None:
    sim.config.latency_ms = 1500
    with LocalRedis(tmp_path / "redis") as store:
        admin = store.client()
        admin.execute_command("ACL", "SETUSER", "llm-worker", ">acl-pw-31", *ACL)
        svc = service(
            REDIS_URL=f"redis://127.0.0.1:{store.port}/0",
            REDIS_USERNAME="llm-worker",
            REDIS_PASSWORD="acl-pw-31",
            WORKER_POOLS="llm-chat=1",
            WORKER_BOOT_RETRIES="2",
        )
        client = client_for(f"redis://llm-worker:acl-pw-31@127.0.0.1:{store.port}/0")
        job = client.submit("chat", {"messages": [{"role": "user", "content": "hi"}]}, model="llama3.2")
        deadline = time.monotonic() + 20
        while not any(admin.llen(k) for k in admin.scan_iter("llm:processing:*")):
            assert time.monotonic() < deadline, svc.tail(50)
            time.sleep(0.02)
        # The job is in hand, its call under way: the password changes and every session of the user ends.
        admin.execute_command("ACL", "SETUSER", "llm-worker", "resetpass", ">new-pw-32")
        admin.execute_command("CLIENT", "KILL", "USER", "llm-worker")
        code = svc.wait(60)
        log = svc.tail(400)
        assert code == 3, log
        assert "Redis refused the worker while it ran" in log and "workers cannot boot" in log, log
        assert "worker died" not in log and "Traceback" not in log, log
        # The innocent job is not counted as a crash, and it is not lost: in a processing list or queued again.
        assert not admin.exists(f"llm:crashes:{job}")
        held = [p for k in admin.scan_iter("llm:processing:*") for p in admin.lrange(k, 0, -1)]
        assert any(job.encode() in p for p in held + admin.lrange("llm-chat", 0, -1)), log


# ---- the container --------------------------------------------------------------------------


def test_the_container_image_runs_as_an_unprivileged_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final = dockerfile.rsplit("\nFROM ", 1)[1]  # the runtime stage
    user = re.search(r"^USER\s+(\S+)", final, re.M)
    assert user is not None and user.group(1) not in ("root", "0"), "the runtime stage must drop root"
    assert re.search(r"useradd --system --uid (\d+)", final) and "/usr/sbin/nologin" in final
    # Nothing runs as root after the switch, and the entrypoint is the service itself.
    assert final.index("USER ") > max(final.rfind("RUN "), 0)
    assert 'ENTRYPOINT ["llm-worker"]' in final
