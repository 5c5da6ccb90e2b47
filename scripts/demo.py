"""A tour of llm-worker: the real service, a private Redis, and Ollama or its simulator.

Starts redis-server (AOF on) in a temporary directory, uses the Ollama at
OLLAMA_BASE_URL (or localhost:11434) when one answers and the simulator
otherwise, runs ``llm-worker run`` as a real process tree, and then, as a
producer would: streams a chat, runs a generate, an embeddings and a batch
job, sends a malformed payload, SIGKILLs a busy worker to show its job come
back, reads health and metrics, and drains the service with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import msgspec
import urllib3

from llm_worker.devtools.harness import Service
from llm_worker.devtools.localredis import LocalRedis
from llm_worker.queue.client import Client
from llm_worker.settings.config import load

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def real_ollama(url: str) -> tuple[str, str] | None:
    """A chat and an embedding model of a real Ollama at ``url``, or None if none answers."""
    try:
        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=0.5, read=2))
        tags = msgspec.json.decode(http.request("GET", url + "/api/tags").data).get("models", [])
    except (urllib3.exceptions.HTTPError, msgspec.DecodeError, AttributeError):
        return None
    names = [m["name"] for m in tags]
    if not names:
        return None
    embed = next((n for n in names if "embed" in n), names[0])
    chat = next((n for n in names if "embed" not in n), names[0])
    return chat, embed


def _describe(kind: str, shape: dict) -> str:  # type: ignore[type-arg]
    """One line of what a job's response holds."""
    if kind == "generate":
        return repr(shape.get("response", "")[:60])
    if kind == "embeddings":
        return f"{len(shape.get('embeddings', []))} vectors of {len(shape.get('embeddings', [[]])[0])}"
    return f"{[x['success'] for x in shape.get('results', [])]}"


def start_simulator(stack: ExitStack) -> str:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_worker.cli",
            "simulate",
            "--port",
            "0",
            "--latency-ms",
            "300",
            "--token-ms",
            "60",
            "--reply-tokens",
            "16",
            "--embed-call-ms",
            "20",
            "--models",
            "llama3.2,nomic-embed-text",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stack.callback(lambda: (proc.terminate(), proc.wait(5)))
    assert proc.stdout is not None
    return proc.stdout.readline().rsplit(" ", 1)[-1].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the service running until Ctrl-C at the end")
    args = parser.parse_args()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llm-worker-demo-")))
        say("A private Redis with append-only persistence")
        store = stack.enter_context(LocalRedis(workdir / "redis", appendonly=True))
        print(f"redis-server at {store.url} (data in {workdir / 'redis'})")

        ollama = os.environ.get("OLLAMA_BASE_URL", "http://127.0.0.1:11434").rstrip("/")
        models = real_ollama(ollama)
        if models:
            say(f"A real Ollama answers at {ollama}: using {models[0]} and {models[1]}")
        else:
            ollama = start_simulator(stack)
            models = ("llama3.2", "nomic-embed-text")
            say(f"No Ollama answers; the simulator stands in at {ollama} (300 ms to the first token, 60 ms a token)")
            print(
                f"{DIM}(it answers with the question's words, then counts: the protocol is real, the text is not;"
                f" docs/simulator.md){RESET}"
            )
        chat_model, embed_model = models

        say("llm-worker run: a supervisor, its worker pools and the HTTP process")
        env = {
            "REDIS_URL": store.url,
            "OLLAMA_BASE_URL": ollama,
            "WORKER_ID": "demo-host",
            "WORKER_POOLS": "llm-chat=2,llm-embeddings=1,llm-batch=1,llm-priority=1",
            "DEFAULT_CHAT_MODEL": chat_model,
            "DEFAULT_EMBEDDING_MODEL": embed_model,
            "LOG_LEVEL": "info",
            "OLLAMA_HEALTH_CHECK_INTERVAL": "1000",
            "HOST_SAMPLE_INTERVAL": "500",
        }
        svc = Service(env, log_path=workdir / "llm-worker.log").start()
        stack.callback(svc.stop)
        r = store.client()
        print(f"supervisor pid {svc.pid}, workers {svc.worker_pids(r)}, HTTP on {svc.url}")
        print(f"{DIM}(its log: {workdir / 'llm-worker.log'}){RESET}")
        client = Client.from_settings(load(env).settings)

        say("A streaming chat job: the tokens arrive through llm:stream:<id>")
        job = client.submit(
            "chat",
            {"messages": [{"role": "user", "content": "Why is the sky blue?"}], "stream": True},
            model=chat_model,
            correlation_id="demo-1",
        )
        print(f"LPUSH llm-chat job {job}\n  ", end="")
        for piece in client.stream(job, timeout=120):
            print(piece, end="", flush=True)
        result = client.wait(job, 10) or {}
        print(
            f"\n  result: success={result.get('success')} tokens={result.get('tokensUsed')} "
            f"processingTime={result.get('processingTime')} ms worker={result.get('workerId')}"
        )

        say("generate, embeddings and batch jobs, each answered by its own pool")
        ids = {
            "generate": client.submit("generate", {"prompt": "Write a haiku about queues."}, model=chat_model),
            "embeddings": client.submit("embeddings", {"input": ["first text", "second text"]}, model=embed_model),
            "batch": client.submit(
                "batch",
                {
                    "requests": [
                        {"type": "chat", "request": {"messages": [{"role": "user", "content": "Say hi"}]}},
                        {"type": "embeddings", "model": embed_model, "request": {"input": "a third text"}},
                    ]
                },
                model=chat_model,
            ),
        }
        for kind, job_id in ids.items():
            res = client.wait(job_id, 120) or {}
            shape = res.get("response") or {}
            detail = _describe(kind, shape)
            print(f"  {kind:<10} success={res.get('success')} by {res.get('workerId')}: {detail}")

        say("Bad input loses nothing: a payload that is not a job goes to the dead-letter list")
        r.lpush(
            "llm-chat",
            b'{"id": "demo-bad", "type": "chat", "userId": "u", "request": {"messages": [{"role": "wizard"}]}}',
        )
        res = client.wait("demo-bad", 10) or {}
        print(f"  result: {res.get('errorType')}: {res.get('error')}")
        print(f"  LLEN llm-dead-letter = {r.llen('llm-dead-letter')}")

        say("A worker SIGKILLed mid-job: its job goes back to the queue and runs again")
        slow = [
            client.submit("chat", {"messages": [{"role": "user", "content": f"a long answer {n}"}]}, model=chat_model)
            for n in range(2)
        ]
        victim = _busy_worker(svc, r)
        if victim:
            pid, held = victim
            os.kill(pid, signal.SIGKILL)
            print(f"  killed worker {pid} while it held job {held}")
        for job_id in slow:
            res = client.wait(job_id, 120) or {}
            print(f"  job {job_id}: success={res.get('success')} by {res.get('workerId')}")
        print(f"  workers now: {svc.worker_pids(r)} (the slot was respawned)")

        say("Health, readiness and metrics, from shared memory")
        for path in ("/health", "/health/ready"):
            status, body = svc.get(path)
            print(f"  GET {path} -> {status} {msgspec.json.encode(body).decode()}")
        time.sleep(1.5)  # one more turn of the sampler: queue depths, loaded models
        metrics = urllib3.request("GET", svc.url + "/metrics").data.decode()
        shown = (
            "llm_worker_jobs_total",
            "llm_worker_workers{",
            "llm_worker_jobs_reclaimed",
            "llm_worker_worker_crashes",
            "llm_worker_dead_letter_jobs",
            "llm_worker_redis_up",
            "llm_worker_provider_up",
            "llm_worker_models_loaded",
            "llm_worker_gpu_collector_up",
        )
        for line in metrics.splitlines():
            if line.startswith(shown) and not line.endswith(" 0.0") or line.startswith(shown[5:]):
                print(f"  {line}")
        print(f"  ... and {len(metrics.splitlines())} lines in all at {svc.url}/metrics")

        say("llm-worker queues")
        subprocess.run([sys.executable, "-m", "llm_worker.cli", "queues"], env={**os.environ, **env}, check=False)

        if args.keep:
            say(f"The service keeps running: {svc.url}/health, REDIS_URL={store.url}. Ctrl-C to drain and stop.")
            try:
                svc.wait(None)  # type: ignore[arg-type]
            except KeyboardInterrupt:
                pass
        say("SIGTERM: the supervisor drains (jobs in hand finish) and exits 0")
        svc.send(signal.SIGTERM)
        print(f"  exit code {svc.wait(60)}")
    return 0


def _busy_worker(svc: Service, r) -> tuple[int, str] | None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in svc.worker_pids(r):
            held = r.lrange(f"llm:processing:{svc.env['WORKER_ID']}:{pid}", 0, -1)
            if held:
                return pid, msgspec.json.decode(held[0])["id"]
        time.sleep(0.01)
    return None


if __name__ == "__main__":
    sys.exit(main())
