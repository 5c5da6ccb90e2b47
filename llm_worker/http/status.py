"""The /status document: the host at a glance, from shared memory."""

from __future__ import annotations

import math
import time
from typing import Any

from llm_worker import __version__
from llm_worker.host.backpressure import Reachability, in_flight
from llm_worker.host.breaker import Breakers
from llm_worker.host.layout import Pause, Phase, SlotState
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.procs import worker_id
from llm_worker.host.ratelimit import snapshot as rate_limits
from llm_worker.host.shm import SharedState
from llm_worker.models.fleet import FleetSeen
from llm_worker.protocol.jobs import iso
from llm_worker.settings.config import Settings


def snapshot(
    settings: Settings, state: SharedState, not_ready: str | None, fleet: FleetSeen | None = None
) -> dict[str, Any]:
    header, r = state.header, state.readings
    now = time.monotonic()
    pools = state.pool_names()
    workers = []
    for index, slot in enumerate(state.slots):
        if slot.pid <= 0 or slot.state == SlotState.EMPTY:
            continue
        busy = slot.state == SlotState.BUSY
        workers.append(
            {
                "slot": index,
                "pid": slot.pid,
                "workerId": worker_id(settings.worker.id, slot.pid),
                "pool": pools[slot.pool] if slot.pool < len(pools) else None,
                "state": SlotState(slot.state).name.lower(),
                "jobsDone": slot.jobs_done,
                "jobId": slot.job_id.decode(errors="replace") if busy else None,
                "jobSeconds": round(now - slot.job_started, 3) if busy else None,
                "heartbeatSecondsAgo": round(now - slot.heartbeat, 3),
                "rssBytes": _value(slot.rss_bytes),
                "cpuSeconds": slot.cpu_seconds,
                "paused": Pause(slot.paused).name.lower() if slot.paused else None,
                "pausedBecause": slot.paused_why.decode(errors="replace") if slot.paused else None,
            }
        )
    return {
        "workerId": settings.worker.id,
        "version": __version__,
        "timestamp": iso(),
        "uptime": round(time.time() - header.started, 3),
        "phase": Phase(header.phase).name.lower(),
        "ready": not_ready is None,
        "notReadyBecause": not_ready,
        "pools": {name: _pool(name, header.pool_wanted[i], workers) for i, name in enumerate(pools)},
        "providerCalls": {"inFlight": in_flight(state).calling, "limit": settings.worker.max_in_flight},
        "workers": workers,
        "queues": {
            **{
                name: {"waiting": r.waiting[i], "processing": r.processing[i], "parked": r.parked[i]}
                for i, name in enumerate(pools)
            },
            "delayed": r.delayed,
            "deadLetter": r.dead_letter,
            "sampledSecondsAgo": round(now - r.depths_checked, 1) if r.depths_checked else None,
        },
        "redis": {"up": bool(header.redis_up)},
        "provider": {
            "name": "ollama",
            "url": settings.ollama.base_url,
            "up": bool(r.provider_up),
            "version": r.provider_version.decode(errors="replace") or None,
            "error": r.provider_error.decode(errors="replace") or None,
        },
        "reachability": Reachability(state.providers, state.lock).rows(),
        "models": {
            "loaded": [
                {"name": r.loaded_names[i].value.decode(), "vramBytes": r.loaded_vram[i]} for i in range(r.loaded_count)
            ],
            "labels": state.model_labels(),
            "loading": [
                {"model": m.label, "seconds": round(m.seconds, 1), "why": m.why}
                for m in LoadBoard(state.loads).in_progress(state.model_labels())
            ],
        },
        "affinity": {
            "enabled": settings.models.affinity,
            "maxWaitMs": settings.models.affinity_max_wait,
            **(fleet.document() if fleet is not None else {"hosts": {}, "parked": {}}),
        },
        "breakers": Breakers(state.breakers, state.lock, settings).rows(),
        "rateLimits": rate_limits(state, settings),
        "gpu": {
            "collectorUp": bool(r.gpu_collector_up),
            "error": r.gpu_error.decode(errors="replace") or None,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid.decode(),
                    "name": g.name.decode(),
                    "utilizationRatio": _value(g.utilization_ratio),
                    "memoryUsedBytes": _value(g.memory_used_bytes),
                    "memoryTotalBytes": _value(g.memory_total_bytes),
                    "temperatureCelsius": _value(g.temperature_celsius),
                    "powerWatts": _value(g.power_watts),
                    "ollamaMemoryBytes": _value(g.ollama_memory_bytes),
                }
                for g in r.gpus[: r.gpu_count]
            ],
        },
        "host": {
            "cpuRatio": _value(r.cpu_ratio),
            "load1": _value(r.load1),
            "memoryUsedBytes": _value(r.memory_used_bytes),
            "memoryTotalBytes": _value(r.memory_total_bytes),
        },
    }


def _pool(name: str, wanted: int, workers: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [w for w in workers if w["pool"] == name]
    paused = [w for w in mine if w["paused"]]
    return {
        "wanted": wanted,
        "workers": len(mine),
        # Paused while every worker of the pool is: the jobs wait for other hosts.
        "paused": bool(mine) and len(paused) == len(mine),
        "pausedBecause": paused[0]["pausedBecause"] if paused else None,
    }


def pool_pauses(state: SharedState) -> dict[str, str]:
    """The pools whose every live worker takes no jobs now, with the reason (for readiness)."""
    pools = state.pool_names()
    seen: dict[int, list[str | None]] = {}
    for slot in state.slots:
        if slot.up():
            seen.setdefault(slot.pool, []).append(slot.paused_why.decode(errors="replace") if slot.paused else None)
    return {pools[i]: whys[0] or "" for i, whys in seen.items() if i < len(pools) and all(whys)}


def _value(number: float) -> float | None:
    return None if math.isnan(number) else number
