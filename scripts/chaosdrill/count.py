"""The count after the drill: conservation, what the service logged, and the report."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from typing import Any

import msgspec
import redis

from chaosdrill.drill import DEAD_LETTER, HEARTBEAT_MS, HOSTS, JOB_TIMEOUT_MS, POOLS, QUEUE_OF, SWEEP, TAG, Drill

# ---- the count ------------------------------------------------------------------------------------


def leftovers(r: redis.Redis) -> dict[str, int]:
    """Jobs anywhere but answered: waiting in a queue, held in a processing list, parked for a host that holds
    their model (model affinity), delayed as a retry."""
    return {
        "queued": sum(int(r.llen(q)) for q in set(QUEUE_OF.values())),
        "processing": sum(int(r.llen(k)) for k in r.scan_iter("llm:processing:*")),
        "parked": sum(int(r.llen(k)) for k in r.scan_iter("llm:parked:*#*")),
        "delayed": int(r.zcard("llm:delayed")),
    }


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
        chunk = keys[start : start + 1000]
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
            mismatched.append(
                f"{p.key}: {'success' if result['success'] else 'failure'} with {dead[p.key]} dead letters"
            )
        if p.kind == "stream":
            ends = _stream_ends(r, p.key)
            if ends != [b"done" if result["success"] else b"error"]:
                streams.append(f"{p.key}: success={result['success']} stream ends {ends}")
    counted = sum(int(v) for key in r.scan_iter("llm:stats:*") for v in r.hvals(key))
    answered = sum(1 for p in pushed if p.has_id and results[p.key] is not None)
    left = leftovers(r)
    holds = (
        not lost
        and not twice
        and counted == answered
        and not mismatched
        and not strangers
        and not streams
        and not any(left.values())
    )
    return {
        "holds": holds,
        "lost": len(lost),
        "answeredTwice": len(twice) + max(0, counted - answered),
        "outcomesCounted": counted,
        "jobsAnswered": answered,
        "leftovers": left,
        "deadLettersNotMatchingOutcome": len(mismatched),
        "unknownDeadLetters": len(strangers),
        "streamsNotEndingAsTheirResult": len(streams),
        "outcomes": dict(outcomes.most_common()),
        "answeredPerHost": dict(sorted(per_host.items())),
        "examples": {
            "lost": lost[:20],
            "twice": twice[:20],
            "mismatched": mismatched[:20],
            "unknownDeadLetters": strangers[:5],
            "streams": streams[:20],
        },
    }


def service_log_figures(drill: Drill) -> dict[str, Any]:
    """What the supervisors and workers logged: fenced outcomes, worker deaths, recoveries, per host."""
    figures: dict[str, Any] = {
        "duplicatesSuppressed": 0,
        "workerDeaths": 0,
        "workersKilledForHanging": 0,
        "recoveries": 0,
        "jobsRequeued": 0,
        "jobsCrashDeadLettered": 0,
        "perHost": {},
    }
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
        + (
            "Redis Sentinel (a master and a replica with AOF, three sentinels)"
            if cfg.get("redis") == "sentinel"
            else "Redis AOF appendfsync always"
        )
        + f", WORKER_HEARTBEAT_TIMEOUT {HEARTBEAT_MS} ms, WORKER_TIMEOUT {JOB_TIMEOUT_MS} ms",
        f"jobs pushed: {pushed['jobs']} ({kinds}) + {pushed['malformed']} malformed payloads "
        f"({pushed['malformedWithId']} naming an id)",
        "outcomes: " + ", ".join(f"{v} {k}" for k, v in c["outcomes"].items()),
        f"conservation: {c['lost']} lost, {c['answeredTwice']} answered twice "
        f"({c['outcomesCounted']} outcomes counted for {c['jobsAnswered']} jobs answered), "
        f"left behind {c['leftovers']}, {c['deadLettersNotMatchingOutcome']} dead letters not matching their outcome, "
        f"{c['unknownDeadLetters']} unknown dead letters, {c['streamsNotEndingAsTheirResult']} streams not "
        "ending as their result"
        f"; drained in {figures['drainSeconds']} s",
        f"duplicates suppressed (outcomes dropped by the fence): {logs['duplicatesSuppressed']}",
        "model affinity (from the events): "
        + ", ".join(f"{n} {how}" for how, n in figures.get("affinity", {}).items())
        + " (parked: left for the host holding their model; hot, cold, overdue: parked jobs taken, and why)",
        "answered per host: " + ", ".join(f"{h} {n}" for h, n in c["answeredPerHost"].items()),
        f"crashes: {figures['kills']['workersSigkilled']} workers SIGKILLed, "
        f"{figures['kills']['workersStopped']} stopped "
        f"past their timeout, {figures['kills']['hostsKilled']} hosts killed, {figures['kills']['hostsFrozen']} "
        "frozen, "
        f"Redis killed {figures['kills']['redisKilled']} times; supervisors logged {logs['workerDeaths']} "
        "worker deaths, "
        f"{logs['workersKilledForHanging']} killed for hanging",
        f"reclaims: {logs['recoveries']} recoveries, {logs['jobsRequeued']} jobs requeued, "
        f"{logs['jobsCrashDeadLettered']} dead-lettered as crashed; slowest reclaim "
        + (f"{slowest['seconds']:.2f} s ({slowest['what']})" if slowest else "none measured")
        + ("; slowest by cause: " + ", ".join(f"{w} {s:.2f} s" for w, s in by_what.items()) if by_what else ""),
    ]
    for rec in figures["hostRecoveries"]:
        lines.append(
            f"host {rec['how']}: {rec['host']} holding {rec['jobsHeld']} jobs; recovered by {rec['recoveredBy']} "
            + (f"after {rec['seconds']:.1f} s" if rec["seconds"] is not None else "NOT within the wait")
            + f" (WORKER_HEARTBEAT_TIMEOUT {rec['heartbeatTimeoutSeconds']:.1f} s + one sweep of {SWEEP:.1f} s: "
            + ("within it" if rec["withinExpiry"] else "LATE")
            + ")"
            + (
                f"; late outcomes dropped by the fence on waking: {rec['lateOutcomesDropped']}"
                if "lateOutcomesDropped" in rec
                else ""
            )
        )
    counts = Counter(d["name"] for d in figures["disruptions"])
    lines.append("disruptions: " + ", ".join(f"{name} x{n}" for name, n in counts.items()))
    lines.append("CONSERVATION HOLDS" if c["holds"] else f"CONSERVATION BROKEN: {c['examples']}")
    return "\n".join(lines)


def affinity_moves(r: redis.Redis) -> dict[str, int]:
    """Model affinity's moves, from the events (telemetry: a Redis restart may have lost a few): jobs parked for
    a host holding their model, and parked jobs taken, by why (hot, cold, overdue)."""
    moves: Counter[str] = Counter()
    try:
        for _, fields in r.xrange("llm:events"):
            kind = fields[b"type"]
            if kind == b"llm.request.parked":
                moves["parked"] += 1
            elif kind == b"llm.request.started" and b'"affinity"' in fields[b"data"]:
                moves[str(msgspec.json.decode(fields[b"data"]).get("affinity"))] += 1
    except redis.RedisError:
        pass
    return {how: moves[how] for how in ("parked", "hot", "cold", "overdue")}


def summarize(drill: Drill, fed: float, drained: float | None) -> dict[str, Any]:
    by_kind = Counter(p.kind for p in drill.pushed)
    names = Counter(d["name"] for d in drill.disruptions)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {
            "seed": drill.args.seed,
            "duration": drill.args.duration,
            "rate": drill.args.rate,
            "hosts": list(HOSTS),
            "pools": POOLS,
            "heartbeatTimeoutMs": HEARTBEAT_MS,
            "workerTimeoutMs": JOB_TIMEOUT_MS,
            "redis": "sentinel" if drill.group else "single",
        },
        "seconds": round(fed, 1),
        "drainSeconds": drained,
        "pushed": {
            "jobs": sum(n for k, n in by_kind.items() if not k.startswith("malformed")),
            "malformed": sum(n for k, n in by_kind.items() if k.startswith("malformed")),
            "malformedWithId": sum(1 for p in drill.pushed if p.kind.startswith("malformed") and p.has_id),
            "byKind": dict(by_kind.most_common()),
        },
        "conservation": check(drill),
        "serviceLogs": service_log_figures(drill),
        "kills": {
            "workersSigkilled": sum(
                len(d.get("workers", [])) for d in drill.disruptions if d["name"] == "kill workers"
            ),
            "workersStopped": sum(1 for d in drill.disruptions if d["name"].startswith("stop") and "worker" in d),
            "hostsKilled": names["kill a host and restart it"],
            "hostsFrozen": names["freeze a host past its heartbeat expiry"],
            "redisKilled": names["kill and restart Redis"],
        },
        "affinity": affinity_moves(drill.r),
        "reclaims": drill.reclaims,
        "hostRecoveries": drill.host_recoveries,
        "disruptions": drill.disruptions,
    }
