"""Chaos drill: the real service under disruption, then proof that every job was answered exactly once.

Starts a private Redis (AOF, ``appendfsync always``), two supervisors with
different WORKER_IDs (two hosts), each with its own simulator, and feeds jobs of every type
(chat, generate, streaming chat, embeddings, batch) for ``--duration`` seconds
while the disruptions of DISRUPTIONS run one at a time, in a shuffled order per
cycle (the first cycle always runs whole, however long it takes). Then it
drains and checks conservation: every job pushed has exactly one terminal
outcome (its result, and for a failure one dead-letter entry; a payload
without an id, one dead-letter entry), none was counted twice in
``llm:stats:<queue>`` (written atomically with each result), and nothing is
left in a queue, a processing list or the delayed set. It prints a report and
exits 0 only when conservation holds.

With ``--sentinel`` Redis is a master with a replica and three sentinels
instead: killing Redis kills the master (a replica is promoted, the old master
returns as its replica), a planned ``SENTINEL FAILOVER`` joins the
disruptions, and the feeder counts a push once a replica holds it (WAIT).

Run it with ``scripts/chaos`` (``--duration SECONDS``, ``--json FILE``, ``--seed N``, ``--sentinel``).
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import msgspec
from chaosdrill.count import drain, report, summarize
from chaosdrill.disruptions import run_schedule
from chaosdrill.drill import (
    CHAT_MODELS,
    EMBED_MODEL,
    HEARTBEAT_MS,
    HOSTS,
    JOB_TIMEOUT_MS,
    MAX_JOB_BYTES,
    MODEL_CACHE_SIZE,
    POOLS,
    TIMEOUT_GRACE_MS,
    Drill,
    Host,
    feed,
)

from llm_worker.devtools.localredis import LocalRedis, LocalSentinelGroup, free_port

# ---- setting up -----------------------------------------------------------------------------------


def steady_port() -> int:
    """A free port outside the kernel's ephemeral range, so that no other process's bind(0) takes it
    while our Redis is down between a kill and its restart."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    return free_port()


@contextmanager
def simulator(args: argparse.Namespace) -> Iterator[str]:
    """The simulator as its own process, slow enough that workers hold jobs when they are hit."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_worker.cli",
            "simulate",
            "--port",
            "0",
            "--slots",
            "8",
            "--latency-ms",
            "150",
            "--token-ms",
            "15",
            "--embed-call-ms",
            "30",
            "--embed-input-ms",
            "2",
            "--load-ms",
            str(args.load_ms),
            "--models",
            ",".join(f"{m}:latest" for m in (*CHAT_MODELS, EMBED_MODEL)),
            "--seed",
            str(args.seed),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        yield proc.stdout.readline().rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def host_env(redis_url: str, sim_url: str, duration: float) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": sim_url,
        "WORKER_POOLS": POOLS,
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning",
        "WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_MS),
        "WORKER_TIMEOUT": str(JOB_TIMEOUT_MS),
        "WORKER_TIMEOUT_GRACE": str(TIMEOUT_GRACE_MS),
        "QUEUE_DELAY": "200",
        "QUEUE_MAX_DELAY": "2000",
        "OLLAMA_MAX_RETRIES": "2",
        "OLLAMA_RETRY_DELAY": "100",
        "CIRCUIT_BREAKER_RESET_TIMEOUT": "2000",
        "OLLAMA_NUM_PARALLEL": "8",  # as the simulator is started (--slots 8)
        "CIRCUIT_BREAKER_MAX_RESET_TIMEOUT": "8000",
        "MAX_JOB_BYTES": str(MAX_JOB_BYTES),
        "RESULT_TTL": str(int(max(7200, 3 * duration))),
        "MODEL_MEMORY_THRESHOLD": "1",
        "HOST_SAMPLE_INTERVAL": "2000",
        "MODEL_AFFINITY": "true",
        "MODEL_CACHE_SIZE": str(MODEL_CACHE_SIZE),
        "MODEL_AFFINITY_MAX_WAIT": "3000",
    }


def drill_once(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    group = None
    if args.sentinel:
        group = LocalSentinelGroup(workdir / "sentinel", replicas=1, sentinels=3, appendonly=True).start()
        group.wait_watched(60)
        store = group.servers[0]
    else:
        store = LocalRedis(workdir / "redis", port=steady_port(), appendfsync="always").start()
    hosts: list[Host] = []
    try:
        with ExitStack() as simulators:
            # Each host has its own Ollama, as on a fleet: what one host loads the other does not hold, so
            # model affinity parks jobs for the host holding their model, and takes them hot, cold or overdue.
            sim_urls = [simulators.enter_context(simulator(args)) for _ in HOSTS]
            hosts = [
                Host(
                    name,
                    {**host_env(store.url, url, args.duration), **(group.env if group else {})},
                    workdir / f"{name}.log",
                )
                for name, url in zip(HOSTS, sim_urls)
            ]
            for host in hosts:
                host.start()
            drill = Drill(
                args,
                workdir,
                store,
                sim_urls,
                hosts,
                random.Random(args.seed),
                f"{random.getrandbits(24):06x}",
                group=group,
            )
            stop = threading.Event()
            feeder = threading.Thread(target=feed, args=(drill, stop), name="feeder", daemon=True)
            feeder.start()
            run_schedule(drill, drill.started + args.duration)
            stop.set()
            feeder.join(60)
            fed = time.monotonic() - drill.started
            drill.sim("DELETE", "/_sim/faults")
            print(f"[{drill.elapsed():7.1f}s] feeding stopped after {len(drill.pushed)} payloads; draining", flush=True)
            drained = drain(drill, args.drain_timeout)
            for host in hosts:
                if host.service is not None:
                    host.service.stop()
            return summarize(drill, fed, drained)
    finally:
        for host in hosts:
            if host.service is not None:
                host.service.stop(timeout=10)
        (group or store).stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration", type=float, default=90.0, help="seconds of jobs and disruptions (default %(default)s)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the job mix and the schedule (default %(default)s)"
    )
    parser.add_argument("--rate", type=float, default=6.0, help="jobs pushed per second (default %(default)s)")
    parser.add_argument(
        "--load-ms", type=int, default=1500, help="the simulator's model load time (default %(default)s)"
    )
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="longest wait for the last outcomes")
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="Redis as a master, a replica and three sentinels: "
        "'kill and restart Redis' kills the master, and a planned failover joins the disruptions",
    )
    parser.add_argument(
        "--workdir",
        help="keep Redis's data and the service logs here (default: a temporary "
        "directory, removed unless conservation breaks or an old master does not rejoin)",
    )
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="llm-worker-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    figures = drill_once(args, workdir)
    figures["workdir"] = str(workdir)
    print(report(figures), flush=True)
    if args.json:
        Path(args.json).write_text(msgspec.json.format(msgspec.json.encode(figures), indent=2).decode())
    holds = figures["conservation"]["holds"]
    # An old master that never rejoined is Redis's business, not a broken drill,
    # but its cause is only in the sentinels' and servers' logs: keep them.
    stuck = [
        d
        for d in figures["disruptions"]
        if "oldMasterReplicaAfterSeconds" in d and d["oldMasterReplicaAfterSeconds"] is None
    ]
    if holds and not stuck and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not holds or stuck:
        why = "conservation broke" if not holds else f"{len(stuck)} old master(s) did not rejoin as a replica in time"
        print(f"{why}: service, Redis and sentinel logs and Redis data kept in {workdir}", flush=True)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
