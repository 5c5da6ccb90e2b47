"""The drill's settings, its hosts and its state, and the feeder that pushes jobs of every type."""

from __future__ import annotations

import argparse
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis
import urllib3

from llm_worker.devtools.harness import Service
from llm_worker.devtools.localredis import LocalRedis, LocalSentinelGroup
from llm_worker.protocol.jobs import iso
from llm_worker.queue.connection import connect
from llm_worker.settings.config import load
from llm_worker.supervisor.housekeeping import SWEEP_PERIOD

HOSTS = ("host-a", "host-b")
POOLS = "llm-chat=2,llm-embeddings=1,llm-batch=1"
HEARTBEAT_MS = 5000  # WORKER_HEARTBEAT_TIMEOUT; other hosts look for expired heartbeats every SWEEP seconds
SWEEP = min(HEARTBEAT_MS / 5000, SWEEP_PERIOD)
JOB_TIMEOUT_MS = 8000  # WORKER_TIMEOUT: what a hung provider call or a stopped worker costs at most
TIMEOUT_GRACE_MS = 1000
SUPERVISOR_KILL_GRACE = 2.0  # the arbiter's SIGTERM-to-SIGKILL grace for a hung worker
MAX_JOB_BYTES = 65536
CHAT_MODEL, EMBED_MODEL = "llama3.2", "nomic-embed-text"
# Chat jobs name one of these: with the hosts' MODEL_CACHE_SIZE below their number (and the embedding
# model's), model affinity parks jobs for the host holding their model, and loads and evicts.
CHAT_MODELS = (CHAT_MODEL, "qwen3", "mistral")
MODEL_CACHE_SIZE = 3
DEAD_LETTER = "llm-dead-letter"
PUSHED = "chaos:pushed"  # the drill's own hash: which keys were pushed (pushes are retried after a lost reply)
QUEUE_OF = {
    "chat": "llm-chat",
    "generate": "llm-chat",
    "stream": "llm-chat",
    "embeddings": "llm-embeddings",
    "batch": "llm-batch",
}
MIX = {"chat": 35, "generate": 15, "stream": 15, "embeddings": 25, "batch": 10}
TAG = re.compile(r"chaos-[0-9a-f]{6}-\d{6}")

# Push a payload once, even when the reply to an earlier try was lost in a Redis kill.
PUSH_ONCE = """
if redis.call('HSETNX', KEYS[2], ARGV[2], '1') == 1 then redis.call('LPUSH', KEYS[1], ARGV[1]) end
return 1
"""


@dataclass(frozen=True)
class Pushed:
    key: str  # the job id, or the tag inside a payload that has no usable id
    kind: str  # chat, generate, stream, embeddings, batch, or malformed:<variant>
    has_id: bool  # a result is due (every job with a valid id, malformed or not)


@dataclass
class Host:
    """One supervisor with its workers: a host of its own, as far as Redis can tell."""

    name: str
    env: dict[str, str]
    log_path: Path
    service: Service | None = None
    starts: int = 0

    def start(self) -> None:
        self.service = Service({**self.env, "WORKER_ID": self.name}, log_path=self.log_path).start(timeout=120)
        self.starts += 1

    def worker_ids(self, r: redis.Redis) -> list[str]:
        assert self.service is not None
        return [f"{self.name}:{pid}" for pid in self.service.worker_pids(r)]

    def log(self) -> Iterator[dict[str, Any]]:
        for line in self.log_path.read_bytes().splitlines() if self.log_path.exists() else []:
            try:
                entry = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(entry, dict):
                yield entry


@dataclass
class Drill:
    args: argparse.Namespace
    workdir: Path
    redis: LocalRedis
    sim_urls: list[str]  # each host's simulator, in the order of hosts
    hosts: list[Host]
    rng: random.Random
    run: str  # a tag shared by every key of this run
    started: float = field(default_factory=time.monotonic)
    pushed: list[Pushed] = field(default_factory=list)
    disruptions: list[dict[str, Any]] = field(default_factory=list)
    reclaims: list[dict[str, Any]] = field(default_factory=list)
    host_recoveries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    serial: int = 0
    group: LocalSentinelGroup | None = None  # --sentinel: Redis is a master, a replica and three sentinels

    @property
    def r(self) -> redis.Redis:
        """A client of the master now."""
        return (self.group.master() if self.group else self.redis).client()

    def producer(self) -> redis.Redis:
        """A producer's client: with Sentinel, one that follows the master as llm-worker's do."""
        if self.group:
            return connect(load(self.group.env).settings, timeout=2.0)
        return redis.Redis.from_url(self.redis.url, socket_timeout=2, socket_connect_timeout=2)

    def next_key(self) -> str:
        with self.lock:
            self.serial += 1
            return f"chaos-{self.run}-{self.serial:06d}"

    def push(self, client: redis.Redis, item: Pushed, queue: str, payload: bytes) -> None:
        """LPUSH the payload once, retrying through a Redis outage.

        With Sentinel, a push counts once a replica holds it too (WAIT), as a
        producer that must not lose one does: a master killed before it
        replicated loses the push and its marker, and it is pushed again.
        """
        script = client.register_script(PUSH_ONCE)
        while True:
            try:
                script(keys=[queue, PUSHED], args=[payload, item.key])
                if self.group is None or client.wait(1, 1000) >= 1:
                    break
            except redis.RedisError:
                pass
            time.sleep(0.1)
        with self.lock:
            self.pushed.append(item)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def sim(self, method: str, path: str, body: object = None) -> list[Any]:
        """Send the same request to every host's simulator (a fault is the provider's, on every host); the
        answers, in the order of hosts."""
        data = msgspec.json.encode(body) if body is not None else None
        answers = []
        for url in self.sim_urls:
            resp = urllib3.request(
                method, url + path, body=data, headers={"Content-Type": "application/json"}, timeout=10
            )
            answers.append(msgspec.json.decode(resp.data) if resp.data else None)
        return answers

    def busy_workers(self) -> list[tuple[Host, str]]:
        r = self.r
        return [(host, wid) for host in self.hosts for wid in host.worker_ids(r) if r.llen(f"llm:processing:{wid}")]


# ---- jobs ---------------------------------------------------------------------------------------


def make_job(kind: str, key: str, rng: random.Random) -> bytes:
    words = f"chaos job {key} number {rng.randrange(10**6)}"
    chat = {"messages": [{"role": "user", "content": words}]}
    embed = {"input": [words, "a shared sentence"] if rng.random() < 0.5 else words}
    request: dict[str, Any] = {
        "chat": chat,
        "stream": {**chat, "stream": True},
        "generate": {"prompt": words},
        "embeddings": embed,
        "batch": {
            "requests": [
                {"type": "chat", "request": chat},
                {"type": "generate", "request": {"prompt": words}},
                {"type": "embeddings", "model": EMBED_MODEL, "request": embed},
            ]
        },
    }[kind]
    job = {
        "id": key,
        "type": "chat" if kind == "stream" else kind,
        "userId": "chaos",
        "correlationId": key,
        "model": EMBED_MODEL if kind == "embeddings" else rng.choice(CHAT_MODELS),
        "request": request,
        "createdAt": iso(),
    }
    return msgspec.json.encode(job)


def feed(drill: Drill, stop: threading.Event) -> None:
    """Push jobs of every kind at --rate per second until ``stop``; an outage delays, never bursts."""
    client = drill.producer()
    rng = random.Random(drill.args.seed + 1)
    kinds, weights = list(MIX), list(MIX.values())
    due = time.monotonic()
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        key = drill.next_key()
        drill.push(client, Pushed(key, kind, True), QUEUE_OF[kind], make_job(kind, key, rng))
        due = max(due + 1 / drill.args.rate, time.monotonic() - 1)
        stop.wait(max(0.0, due - time.monotonic()))
