"""The /status document: the host at a glance, from shared memory."""

from __future__ import annotations

import math
import time
from typing import Any

from llm_worker import __version__
from llm_worker.host.backpressure import Reachability, bound_for, in_flight
from llm_worker.host.breaker import Breakers
from llm_worker.host.endpoints import Endpoint, EndpointTable
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
    endpoints = EndpointTable(state.providers, state.lock).all()
    calls = bound_for(state)
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
        "provider": _provider(settings, state, endpoints),
        "endpoints": [_endpoint(state, e, calls) for e in endpoints],
        "reachability": Reachability(state.providers, state.lock).rows(),
        "models": {
            "loaded": [
                {"name": name, "vramBytes": vram, "endpoint": e.name}
                for e in endpoints
                for name, vram in _loaded(state, e.index)
            ],
            "labels": state.model_labels(),
            "loading": [
                {"model": m.label, "seconds": round(m.seconds, 1), "why": m.why, "endpoint": endpoints[m.endpoint].name}
                for m in LoadBoard(state.loads).in_progress(state.model_labels())
                if m.endpoint < len(endpoints)
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


def _provider(settings: Settings, state: SharedState, endpoints: list[Endpoint]) -> dict[str, Any]:
    """Ollama as the sampler last probed it: up when any of its endpoints answered (``endpoints`` says which)."""
    rows = [state.providers.rows[e.index] for e in endpoints if e.provider == "ollama"]
    up = [row for row in rows if row.healthy]
    shown = up[0] if up else (rows[0] if rows else None)
    return {
        "name": "ollama",
        "url": settings.ollama.base_url,
        "up": bool(up),
        "version": (shown.version.decode(errors="replace") or None) if shown is not None else None,
        "error": "; ".join(row.health_error.decode(errors="replace") for row in rows if not row.healthy and row.checked)
        or None,
    }


def _endpoint(state: SharedState, e: Endpoint, calls: dict[tuple[int, int], int]) -> dict[str, Any]:
    """One endpoint: where it is, whether it answers, what it holds and how busy it is."""
    row = state.providers.rows[e.index]
    block = state.loads.endpoints[e.index]
    return {
        "endpoint": e.name,
        "provider": e.provider,
        "url": e.url or None,
        "up": bool(row.healthy) if row.checked else None,  # the sampler's last probe; None: not probed
        "reachable": not row.down,  # the workers' calls connect
        "version": row.version.decode(errors="replace") or None,
        "error": (row.error if row.down else row.health_error).decode(errors="replace") or None,
        "callsInFlight": in_flight(state, provider=e.index).provider,
        "workersBound": sum(n for (endpoint, _), n in calls.items() if endpoint == e.index),  # calling, or on the way
        "cacheSize": block.cache_size or None,  # the model manager's, when it keeps this endpoint's models
        "modelsLoaded": [name for name, _ in _loaded(state, e.index)],
    }


def _loaded(state: SharedState, endpoint: int) -> list[tuple[str, float]]:
    """What the model manager last saw loaded on an endpoint: (name, VRAM bytes)."""
    block = state.loads.endpoints[endpoint]
    return [(block.loaded_names[i].value.decode(), block.loaded_vram[i]) for i in range(block.loaded_count)]


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
