"""Chaos drill: the real service under disruption, then proof that every job was answered exactly once.

Starts a private Redis (AOF, ``appendfsync always``), the simulator and two
supervisors with different WORKER_IDs (two hosts), and feeds jobs of every type
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
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
import redis
import urllib3

from llm_worker.harness import Service
from llm_worker.jobs import iso
from llm_worker.config import load
from llm_worker.localredis import LocalRedis, LocalSentinelGroup, free_port
from llm_worker.queue import connect
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
DEAD_LETTER = "llm-dead-letter"
PUSHED = "chaos:pushed"  # the drill's own hash: which keys were pushed (pushes are retried after a lost reply)
QUEUE_OF = {"chat": "llm-chat", "generate": "llm-chat", "stream": "llm-chat", "embeddings": "llm-embeddings",
            "batch": "llm-batch"}
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
    sim_url: str
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

    def sim(self, method: str, path: str, body: object = None) -> Any:
        data = msgspec.json.encode(body) if body is not None else None
        resp = urllib3.request(method, self.sim_url + path, body=data, headers={"Content-Type": "application/json"},
                               timeout=10)
        return msgspec.json.decode(resp.data) if resp.data else None

    def busy_workers(self) -> list[tuple[Host, str]]:
        r = self.r
        return [(host, wid) for host in self.hosts for wid in host.worker_ids(r) if r.llen(f"llm:processing:{wid}")]


# ---- jobs ---------------------------------------------------------------------------------------


def make_job(kind: str, key: str, rng: random.Random) -> bytes:
    words = f"chaos job {key} number {rng.randrange(10**6)}"
    chat = {"messages": [{"role": "user", "content": words}]}
    embed = {"input": [words, "a shared sentence"] if rng.random() < 0.5 else words}
    request: dict[str, Any] = {
        "chat": chat, "stream": {**chat, "stream": True}, "generate": {"prompt": words}, "embeddings": embed,
        "batch": {"requests": [{"type": "chat", "request": chat}, {"type": "generate", "request": {"prompt": words}},
                               {"type": "embeddings", "model": EMBED_MODEL, "request": embed}]},
    }[kind]
    job = {"id": key, "type": "chat" if kind == "stream" else kind, "userId": "chaos", "correlationId": key,
           "model": EMBED_MODEL if kind == "embeddings" else CHAT_MODEL, "request": request, "createdAt": iso()}
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


# ---- disruptions: each runs to its end and returns what it did ------------------------------------


def wait_gone(r: redis.Redis, keys: list[str], since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until none of ``keys`` exists (the lists were recovered); None on timeout."""
    while time.monotonic() - since < timeout:
        if not keys or not r.exists(*keys):
            return round(time.monotonic() - since, 3)
        time.sleep(0.02)
    return None


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_workers(drill: Drill) -> dict[str, Any]:
    """SIGKILL two random workers, busy ones first; time until what they held is back in a queue."""
    r = drill.r
    busy = drill.busy_workers()
    idle = [(h, w) for h in drill.hosts for w in h.worker_ids(r) if (h, w) not in busy]
    drill.rng.shuffle(busy)
    drill.rng.shuffle(idle)
    victims = (busy + idle)[:2]
    held = [w for _, w in victims if r.llen(f"llm:processing:{w}")]
    killed_at = time.monotonic()
    for _, worker_id in victims:
        os.kill(int(worker_id.rsplit(":", 1)[1]), signal.SIGKILL)
    seconds = wait_gone(r, [f"llm:processing:{w}" for w in held], killed_at, 30)
    if held:
        drill.reclaims.append({"what": "worker SIGKILLed", "workers": held, "seconds": seconds})
    return {"workers": [w for _, w in victims], "holding": held, "reclaimSeconds": seconds}


def stop_worker(drill: Drill) -> dict[str, Any]:
    """SIGSTOP a busy worker and leave it: its supervisor must kill it past its job's timeout and recover its job."""
    r = drill.r
    deadline = time.monotonic() + 10
    while not (busy := drill.busy_workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not busy:
        return {"skipped": "no busy worker within 10 s"}
    _, worker_id = drill.rng.choice(busy)
    pid = int(worker_id.rsplit(":", 1)[1])
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    limit = (JOB_TIMEOUT_MS + TIMEOUT_GRACE_MS) / 1000 + SUPERVISOR_KILL_GRACE + 20
    try:
        while not process_gone(pid) and time.monotonic() - stopped_at < limit:
            time.sleep(0.05)
        killed = round(time.monotonic() - stopped_at, 2) if process_gone(pid) else None
        seconds = wait_gone(r, [f"llm:processing:{worker_id}"], stopped_at, limit)
    finally:
        if not process_gone(pid):
            os.kill(pid, signal.SIGCONT)  # never leave a stopped process behind
    drill.reclaims.append({"what": "worker stopped past its job's timeout", "workers": [worker_id], "seconds": seconds})
    return {"worker": worker_id, "killedAfterSeconds": killed, "reclaimSeconds": seconds}


def _jobs_held_by_host(r: redis.Redis, host: Host) -> dict[str, int]:
    return {key.decode(): int(r.llen(key)) for key in r.scan_iter(f"llm:processing:{host.name}:*") if r.llen(key)}


def _wait_until_host_holds_jobs(drill: Drill, host: Host) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while not (held := _jobs_held_by_host(drill.r, host)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return held


def kill_host(drill: Drill) -> dict[str, Any]:
    """SIGKILL a whole supervisor with its workers; the other host must recover its jobs; then start it again."""
    host = drill.hosts[sum(h.starts for h in drill.hosts) % 2]  # take turns
    other = next(h for h in drill.hosts if h is not host)
    _wait_until_host_holds_jobs(drill, host)
    assert host.service is not None
    killed_at = time.monotonic()
    host.service.kill_all()
    # What it holds now that it is dead: a job it acknowledged between the look and the kill is not a recovery.
    held = _jobs_held_by_host(drill.r, host)
    seconds = wait_gone(drill.r, list(held), killed_at, 3 * HEARTBEAT_MS / 1000 + 30)
    recovery = {"host": host.name, "recoveredBy": other.name, "jobsHeld": sum(held.values()), "workersHolding": len(held),
                "seconds": seconds, "heartbeatTimeoutSeconds": HEARTBEAT_MS / 1000, "how": "killed",
                "withinExpiry": within_expiry(seconds)}
    if held:
        drill.host_recoveries.append(recovery)
        drill.reclaims.append({"what": "host SIGKILLed", "workers": [k.rsplit("processing:", 1)[1] for k in held],
                               "seconds": seconds})
    restart_at = time.monotonic()
    host.start()
    return {**recovery, "restartSeconds": round(time.monotonic() - restart_at, 1)}


def within_expiry(seconds: float | None) -> bool:
    """Recovered once the dead host's heartbeats expired and another host's next sweep ran (0.5 s for a busy machine)."""
    return seconds is not None and seconds <= HEARTBEAT_MS / 1000 + SWEEP + 0.5


def freeze_host(drill: Drill) -> dict[str, Any]:
    """SIGSTOP a whole host past its heartbeat expiry, then SIGCONT it.

    The other host recovers its jobs while it is frozen; when it wakes, its
    workers finish jobs that are no longer theirs, and the fence must drop
    those outcomes.
    """
    host = drill.hosts[drill.rng.randrange(2)]
    _wait_until_host_holds_jobs(drill, host)
    assert host.service is not None
    group = host.service.pid
    frozen_at = time.monotonic()
    os.killpg(group, signal.SIGSTOP)
    try:
        held = _jobs_held_by_host(drill.r, host)  # once frozen, as kill_host does
        seconds = wait_gone(drill.r, list(held), frozen_at, 3 * HEARTBEAT_MS / 1000 + 30)
    finally:
        os.killpg(group, signal.SIGCONT)
    recovery = {"host": host.name, "recoveredBy": next(h.name for h in drill.hosts if h is not host),
                "jobsHeld": sum(held.values()), "workersHolding": len(held), "seconds": seconds,
                "heartbeatTimeoutSeconds": HEARTBEAT_MS / 1000, "how": "frozen", "withinExpiry": within_expiry(seconds)}
    if held:
        drill.host_recoveries.append(recovery)
    return recovery


def restart_redis(drill: Drill) -> dict[str, Any]:
    """SIGKILL Redis, keep it down a moment, start it again on the same port and AOF.

    With Sentinel: SIGKILL the master; a replica is promoted, and the old
    master comes back as its replica.
    """
    if drill.group is not None:
        return _fail_over(drill, planned=False)
    outage = round(drill.rng.uniform(0.5, 3.0), 1)
    drill.redis.kill()
    time.sleep(outage)
    drill.redis.start()
    return {"downSeconds": outage}


def planned_failover(drill: Drill) -> dict[str, Any]:
    """SENTINEL FAILOVER: the master is demoted while it still takes writes, a replica promoted."""
    assert drill.group is not None
    return _fail_over(drill, planned=True)


def _fail_over(drill: Drill, planned: bool) -> dict[str, Any]:
    group = drill.group
    assert group is not None
    group.wait_watched(60)  # a failover needs the sentinels to know each other and the replica
    old = group.master()
    began = time.monotonic()
    if planned:
        group.failover()
    else:
        old.kill()
    new = group.wait_new_master(old.port, timeout=60)
    seconds = round(time.monotonic() - began, 2)
    if not planned:
        old.start()  # stale, until the sentinels make it a replica of the new master
    deadline = time.monotonic() + 60
    while not _in_sync_replica(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"oldMaster": old.port, "newMaster": new.port, "failoverSeconds": seconds,
            "oldMasterReplicaAfterSeconds": round(time.monotonic() - began, 1) if _in_sync_replica(old) else None}


def _in_sync_replica(server: LocalRedis) -> bool:
    try:
        info = server.client().info("replication")
    except redis.RedisError:
        return False
    return info.get("role") == "slave" and info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")


def _provider_fault(drill: Drill, *faults: dict[str, Any], hold: float = 2.5) -> dict[str, Any]:
    drill.sim("POST", "/_sim/faults", {"faults": list(faults)})
    time.sleep(hold)
    drill.sim("DELETE", "/_sim/faults")
    return {"faults": list(faults), "seconds": hold}


def provider_500(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"status": 500, "reason": "runner", "probability": 0.5})


def provider_503(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"status": 503, "reason": "busy", "probability": 0.6})


def provider_hangs(drill: Drill) -> dict[str, Any]:
    """Requests held with no answer: only the job's own deadline frees the worker."""
    return _provider_fault(drill, {"kind": "hang", "probability": 0.3})


def streams_cut(drill: Drill) -> dict[str, Any]:
    return _provider_fault(drill, {"kind": "cut", "after_chunks": 2, "probability": 0.5})


def slow_loads(drill: Drill) -> dict[str, Any]:
    """Unload every model, as an evicting Ollama would: the next requests wait for a (slow) load."""
    loaded = [m["name"] for m in drill.sim("GET", "/api/ps")["models"]]
    for name in loaded:
        drill.sim("POST", "/api/generate", {"model": name, "keep_alive": 0})
    time.sleep(2.0)
    return {"unloaded": loaded, "loadSeconds": drill.args.load_ms / 1000}


def malformed_payloads(drill: Drill) -> dict[str, Any]:
    """Payloads that are not runnable jobs; each must be dead-lettered, and answered when it names an id."""
    client = drill.producer()
    variants: list[tuple[str, bool, Callable[[str], bytes]]] = [
        ("not JSON", False, lambda k: f"not json at all {k}".encode()),
        ("binary", False, lambda k: b"\xff\xfe\x00 binary " + k.encode()),
        ("array", False, lambda k: msgspec.json.encode([k, 1, 2])),
        ("no id", False, lambda k: msgspec.json.encode({"no": "id", "tag": k})),
        ("unusable id", False, lambda k: msgspec.json.encode({"id": f"bad id/{k}", "type": "chat"})),
        ("bad role", True, lambda k: msgspec.json.encode({"id": k, "type": "chat", "userId": "chaos", "model": CHAT_MODEL,
                                                          "request": {"messages": [{"role": "wizard", "content": "x"}]}})),
        ("unknown type", True, lambda k: msgspec.json.encode({"id": k, "type": "dance", "userId": "chaos", "request": {}})),
        ("oversized", True, lambda k: b'{"id": "' + k.encode() + b'", "type": "chat", "request": {"messages": [{"role": '
                                      b'"user", "content": "' + b"x" * (MAX_JOB_BYTES + 100) + b'"}]}}'),
    ]
    for name, has_id, build in variants:
        key = drill.next_key()
        queue = drill.rng.choice(list(set(QUEUE_OF.values())))
        drill.push(client, Pushed(key, f"malformed:{name}", has_id), queue, build(key))
    return {"payloads": len(variants)}


DISRUPTIONS: list[tuple[str, Callable[[Drill], dict[str, Any]]]] = [
    ("kill workers", kill_workers),
    ("stop a worker past its timeout", stop_worker),
    ("kill a host and restart it", kill_host),
    ("freeze a host past its heartbeat expiry", freeze_host),
    ("kill and restart Redis", restart_redis),
    ("provider answers 500", provider_500),
    ("provider answers 503", provider_503),
    ("provider hangs", provider_hangs),
    ("provider cuts streams", streams_cut),
    ("slow model loads", slow_loads),
    ("malformed payloads", malformed_payloads),
]


def disruptions(drill: Drill) -> list[tuple[str, Callable[[Drill], dict[str, Any]]]]:
    """DISRUPTIONS, and with Sentinel a planned failover too ("kill and restart Redis" then kills the master)."""
    return list(DISRUPTIONS) + ([("planned Sentinel failover", planned_failover)] if drill.group is not None else [])


def run_schedule(drill: Drill, until: float) -> None:
    """Every disruption once per cycle, shuffled, with short gaps; the first cycle always completes."""
    cycle = 0
    while cycle == 0 or time.monotonic() < until:
        order = disruptions(drill)
        drill.rng.shuffle(order)
        for name, disrupt in order:
            if cycle and time.monotonic() >= until:
                return
            at = drill.elapsed()
            began = time.monotonic()
            record = {"name": name, "at": at, **disrupt(drill), "took": round(time.monotonic() - began, 1)}
            drill.disruptions.append(record)
            print(f"[{at:7.1f}s] {name}: {_brief(record)}", flush=True)
            time.sleep(drill.rng.uniform(1.0, 2.5))
        cycle += 1


def _brief(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("name", "at", "faults"))


# ---- the count ------------------------------------------------------------------------------------


def leftovers(r: redis.Redis) -> dict[str, int]:
    """Jobs anywhere but answered: waiting in a queue, held in a processing list, parked as a retry."""
    return {"queued": sum(int(r.llen(q)) for q in set(QUEUE_OF.values())),
            "processing": sum(int(r.llen(k)) for k in r.scan_iter("llm:processing:*")),
            "delayed": int(r.zcard("llm:delayed"))}


def drain(drill: Drill, timeout: float) -> float | None:
    """Wait until nothing is queued, held or delayed and every due result is written; seconds taken."""
    r = drill.r
    began = time.monotonic()
    due = [p.key for p in drill.pushed if p.has_id]
    while time.monotonic() - began < timeout:
        try:
            if not any(leftovers(r).values()):
                pipe = r.pipeline(transaction=False)
                for key in due:
                    pipe.exists(f"llm:result:{key}")
                if all(pipe.execute()):
                    return round(time.monotonic() - began, 1)
        except redis.RedisError:
            pass
        time.sleep(0.5)
    return None


def _results(r: redis.Redis, keys: list[str]) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for start in range(0, len(keys), 1000):
        chunk = keys[start:start + 1000]
        blobs = r.mget([f"llm:result:{k}" for k in chunk])
        out.update({k: msgspec.json.decode(b) if b is not None else None for k, b in zip(chunk, blobs)})
    return out


def _dead_letters(r: redis.Redis) -> tuple[Counter[str], list[str]]:
    """Dead-letter entries per pushed key, and entries that name no key of ours."""
    per_key: Counter[str] = Counter()
    strangers = []
    for blob in r.lrange(DEAD_LETTER, 0, -1):
        entry = msgspec.json.decode(blob)
        job = entry.get("job")
        key = job.get("id") if isinstance(job, dict) and isinstance(job.get("id"), str) else None
        if key is None or not TAG.fullmatch(key):
            found = TAG.search(entry.get("raw") or blob.decode(errors="replace"))
            key = found.group() if found else None
        if key is None:
            strangers.append(blob.decode(errors="replace")[:200])
        else:
            per_key[key] += 1
    return per_key, strangers


def _stream_ends(r: redis.Redis, key: str) -> list[bytes]:
    return [fields[b"event"] for _, fields in r.xrange(f"llm:stream:{key}") if fields[b"event"] in (b"done", b"error")]


def check(drill: Drill) -> dict[str, Any]:
    """Conservation: one terminal outcome per job pushed, none twice, nothing left behind."""
    r = drill.r
    pushed = list(drill.pushed)
    results = _results(r, [p.key for p in pushed if p.has_id])
    dead, strangers = _dead_letters(r)
    lost, twice, mismatched, streams = [], [], [], []
    outcomes: Counter[str] = Counter()
    per_host: Counter[str] = Counter()
    for p in pushed:
        if not p.has_id:
            if dead[p.key] == 0:
                lost.append(p.key)
            elif dead[p.key] > 1:
                twice.append(p.key)
            outcomes["dead-lettered without an id"] += 1
            continue
        result = results[p.key]
        if result is None:
            lost.append(p.key)
            continue
        per_host[str(result.get("workerId") or "?").split(":")[0]] += 1
        outcomes["completed" if result["success"] else f"failed ({result.get('errorType')})"] += 1
        if dead[p.key] != (0 if result["success"] else 1):
            mismatched.append(f"{p.key}: {'success' if result['success'] else 'failure'} with {dead[p.key]} dead letters")
        if p.kind == "stream":
            ends = _stream_ends(r, p.key)
            if ends != [b"done" if result["success"] else b"error"]:
                streams.append(f"{p.key}: success={result['success']} stream ends {ends}")
    counted = sum(int(v) for key in r.scan_iter("llm:stats:*") for v in r.hvals(key))
    answered = sum(1 for p in pushed if p.has_id and results[p.key] is not None)
    left = leftovers(r)
    holds = (not lost and not twice and counted == answered and not mismatched and not strangers and not streams
             and not any(left.values()))
    return {"holds": holds, "lost": len(lost), "answeredTwice": len(twice) + max(0, counted - answered),
            "outcomesCounted": counted, "jobsAnswered": answered, "leftovers": left,
            "deadLettersNotMatchingOutcome": len(mismatched), "unknownDeadLetters": len(strangers),
            "streamsNotEndingAsTheirResult": len(streams), "outcomes": dict(outcomes.most_common()),
            "answeredPerHost": dict(sorted(per_host.items())),
            "examples": {"lost": lost[:20], "twice": twice[:20], "mismatched": mismatched[:20],
                         "unknownDeadLetters": strangers[:5], "streams": streams[:20]}}


def service_log_figures(drill: Drill) -> dict[str, Any]:
    """What the supervisors and workers logged: fenced outcomes, worker deaths, recoveries, per host."""
    figures: dict[str, Any] = {"duplicatesSuppressed": 0, "workerDeaths": 0, "workersKilledForHanging": 0,
                               "recoveries": 0, "jobsRequeued": 0, "jobsCrashDeadLettered": 0, "perHost": {}}
    for host in drill.hosts:
        mine = Counter()
        for entry in host.log():
            message = str(entry.get("message", ""))
            if message.startswith("job no longer ours"):
                mine["duplicatesSuppressed"] += 1
            elif message == "worker died":
                mine["workerDeaths"] += 1
            elif message.startswith("killing worker:"):
                mine["workersKilledForHanging"] += 1
            elif message == "recovered jobs of a dead worker":
                mine["recoveries"] += 1
                mine["jobsRequeued"] += int(entry.get("requeued", 0))
                mine["jobsCrashDeadLettered"] += int(entry.get("deadLettered", 0))
                if not str(entry.get("deadWorker", "")).startswith(host.name + ":"):
                    mine["recoveredForAnotherHost"] += 1
        figures["perHost"][host.name] = {**mine, "starts": host.starts}
        for name, value in mine.items():
            if name in figures:
                figures[name] += value
    return figures


# ---- the report -----------------------------------------------------------------------------------


def report(figures: dict[str, Any]) -> str:
    c, logs, cfg = figures["conservation"], figures["serviceLogs"], figures["config"]
    pushed = figures["pushed"]
    kinds = ", ".join(f"{k} {v}" for k, v in pushed["byKind"].items() if not k.startswith("malformed"))
    reclaims = [x for x in figures["reclaims"] if x["seconds"] is not None]
    slowest = max(reclaims, key=lambda x: x["seconds"]) if reclaims else None
    by_what: dict[str, float] = {}
    for x in reclaims:
        by_what[x["what"]] = max(by_what.get(x["what"], 0.0), x["seconds"])
    lines = [
        f"chaos drill: {figures['seconds']:.0f} s of jobs, seed {cfg['seed']}, {len(HOSTS)} hosts x ({POOLS}), "
        + ("Redis Sentinel (a master and a replica with AOF, three sentinels)" if cfg.get("redis") == "sentinel"
           else "Redis AOF appendfsync always")
        + f", WORKER_HEARTBEAT_TIMEOUT {HEARTBEAT_MS} ms, WORKER_TIMEOUT {JOB_TIMEOUT_MS} ms",
        f"jobs pushed: {pushed['jobs']} ({kinds}) + {pushed['malformed']} malformed payloads "
        f"({pushed['malformedWithId']} naming an id)",
        "outcomes: " + ", ".join(f"{v} {k}" for k, v in c["outcomes"].items()),
        f"conservation: {c['lost']} lost, {c['answeredTwice']} answered twice "
        f"({c['outcomesCounted']} outcomes counted for {c['jobsAnswered']} jobs answered), "
        f"left behind {c['leftovers']}, {c['deadLettersNotMatchingOutcome']} dead letters not matching their outcome, "
        f"{c['unknownDeadLetters']} unknown dead letters, {c['streamsNotEndingAsTheirResult']} streams not ending as their result"
        f"; drained in {figures['drainSeconds']} s",
        f"duplicates suppressed (outcomes dropped by the fence): {logs['duplicatesSuppressed']}",
        "answered per host: " + ", ".join(f"{h} {n}" for h, n in c["answeredPerHost"].items()),
        f"crashes: {figures['kills']['workersSigkilled']} workers SIGKILLed, {figures['kills']['workersStopped']} stopped "
        f"past their timeout, {figures['kills']['hostsKilled']} hosts killed, {figures['kills']['hostsFrozen']} frozen, "
        f"Redis killed {figures['kills']['redisKilled']} times; supervisors logged {logs['workerDeaths']} worker deaths, "
        f"{logs['workersKilledForHanging']} killed for hanging",
        f"reclaims: {logs['recoveries']} recoveries, {logs['jobsRequeued']} jobs requeued, "
        f"{logs['jobsCrashDeadLettered']} dead-lettered as crashed; slowest reclaim "
        + (f"{slowest['seconds']:.2f} s ({slowest['what']})" if slowest else "none measured")
        + ("; slowest by cause: " + ", ".join(f"{w} {s:.2f} s" for w, s in by_what.items()) if by_what else ""),
    ]
    for rec in figures["hostRecoveries"]:
        lines.append(f"host {rec['how']}: {rec['host']} holding {rec['jobsHeld']} jobs; recovered by {rec['recoveredBy']} "
                     + (f"after {rec['seconds']:.1f} s" if rec["seconds"] is not None else "NOT within the wait")
                     + f" (WORKER_HEARTBEAT_TIMEOUT {rec['heartbeatTimeoutSeconds']:.1f} s + one sweep of {SWEEP:.1f} s: "
                     + ("within it" if rec["withinExpiry"] else "LATE") + ")")
    counts = Counter(d["name"] for d in figures["disruptions"])
    lines.append("disruptions: " + ", ".join(f"{name} x{n}" for name, n in counts.items()))
    lines.append("CONSERVATION HOLDS" if c["holds"] else f"CONSERVATION BROKEN: {c['examples']}")
    return "\n".join(lines)


def summarize(drill: Drill, fed: float, drained: float | None) -> dict[str, Any]:
    by_kind = Counter(p.kind for p in drill.pushed)
    names = Counter(d["name"] for d in drill.disruptions)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {"seed": drill.args.seed, "duration": drill.args.duration, "rate": drill.args.rate, "hosts": list(HOSTS),
                   "pools": POOLS, "heartbeatTimeoutMs": HEARTBEAT_MS, "workerTimeoutMs": JOB_TIMEOUT_MS,
                   "redis": "sentinel" if drill.group else "single"},
        "seconds": round(fed, 1), "drainSeconds": drained,
        "pushed": {"jobs": sum(n for k, n in by_kind.items() if not k.startswith("malformed")),
                   "malformed": sum(n for k, n in by_kind.items() if k.startswith("malformed")),
                   "malformedWithId": sum(1 for p in drill.pushed if p.kind.startswith("malformed") and p.has_id),
                   "byKind": dict(by_kind.most_common())},
        "conservation": check(drill), "serviceLogs": service_log_figures(drill),
        "kills": {"workersSigkilled": sum(len(d.get("workers", [])) for d in drill.disruptions if d["name"] == "kill workers"),
                  "workersStopped": sum(1 for d in drill.disruptions if d["name"].startswith("stop") and "worker" in d),
                  "hostsKilled": names["kill a host and restart it"],
                  "hostsFrozen": names["freeze a host past its heartbeat expiry"],
                  "redisKilled": names["kill and restart Redis"]},
        "reclaims": drill.reclaims, "hostRecoveries": drill.host_recoveries, "disruptions": drill.disruptions,
    }


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
    proc = subprocess.Popen([sys.executable, "-m", "llm_worker.cli", "simulate", "--port", "0", "--slots", "8",
                             "--latency-ms", "150", "--token-ms", "15", "--embed-call-ms", "30", "--embed-input-ms", "2",
                             "--load-ms", str(args.load_ms), "--seed", str(args.seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    try:
        yield proc.stdout.readline().rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def host_env(redis_url: str, sim_url: str, duration: float) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url, "OLLAMA_BASE_URL": sim_url, "WORKER_POOLS": POOLS, "LOG_FORMAT": "json",
        "LOG_LEVEL": "warning", "WORKER_HEARTBEAT_TIMEOUT": str(HEARTBEAT_MS), "WORKER_TIMEOUT": str(JOB_TIMEOUT_MS),
        "WORKER_TIMEOUT_GRACE": str(TIMEOUT_GRACE_MS), "QUEUE_DELAY": "200", "QUEUE_MAX_DELAY": "2000",
        "OLLAMA_MAX_RETRIES": "2", "OLLAMA_RETRY_DELAY": "100", "CIRCUIT_BREAKER_RESET_TIMEOUT": "2000",
        "CIRCUIT_BREAKER_MAX_RESET_TIMEOUT": "8000", "MAX_JOB_BYTES": str(MAX_JOB_BYTES),
        "RESULT_TTL": str(int(max(7200, 3 * duration))), "MODEL_MEMORY_THRESHOLD": "1", "HOST_SAMPLE_INTERVAL": "2000",
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
        with simulator(args) as sim_url:
            env = {**host_env(store.url, sim_url, args.duration), **(group.env if group else {})}
            hosts = [Host(name, env, workdir / f"{name}.log") for name in HOSTS]
            for host in hosts:
                host.start()
            drill = Drill(args, workdir, store, sim_url, hosts, random.Random(args.seed), f"{random.getrandbits(24):06x}",
                          group=group)
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
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of jobs and disruptions (default %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--seed", type=int, default=1, help="seed of the job mix and the schedule (default %(default)s)")
    parser.add_argument("--rate", type=float, default=6.0, help="jobs pushed per second (default %(default)s)")
    parser.add_argument("--load-ms", type=int, default=1500, help="the simulator's model load time (default %(default)s)")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="longest wait for the last outcomes")
    parser.add_argument("--sentinel", action="store_true", help="Redis as a master, a replica and three sentinels: "
                        "'kill and restart Redis' kills the master, and a planned failover joins the disruptions")
    parser.add_argument("--workdir", help="keep Redis's data and the service logs here (default: a temporary "
                                          "directory, removed unless conservation breaks or an old master does not rejoin)")
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
    stuck = [d for d in figures["disruptions"] if "oldMasterReplicaAfterSeconds" in d
             and d["oldMasterReplicaAfterSeconds"] is None]
    if holds and not stuck and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not holds or stuck:
        why = "conservation broke" if not holds else f"{len(stuck)} old master(s) did not rejoin as a replica in time"
        print(f"{why}: service, Redis and sentinel logs and Redis data kept in {workdir}", flush=True)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
