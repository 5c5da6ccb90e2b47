"""The fleet benchmark: model affinity against first in, first out, in one run.

Three hosts, each a real ``llm-worker run`` with its own simulator that keeps
at most 2 of 6 models loaded, loads a model in 1 s and serves 2 requests of
a model at once, 40 ms each. 300 chat jobs spread evenly over the 6 models
(m1, m2, ..., m6, m1, ...) are pushed at once to one shared Redis; the run
ends when every job is answered. Measured per mode: wall time and jobs/s,
model loads (the simulators' own counts), and each job's wait (queued to
taken, from its result's startedAt) at p50/p99/max. Both modes run on the
same machine one after the other; ``--only fleet`` runs this part alone.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from llm_worker.devtools.localredis import LocalRedis

MODELS = [f"m{i}" for i in range(1, 7)]
HOSTS = ("host-a", "host-b", "host-c")
SIM_ARGS = (
    "--models",
    ",".join(MODELS),
    "--max-loaded",
    "2",
    "--load-ms",
    "1000",
    "--num-parallel",
    "2",
    "--latency-ms",
    "40",
    "--keep-alive",
    "1h",  # the simulator evicts only to make room, as Ollama with OLLAMA_KEEP_ALIVE long
)
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_mode(workdir: Path, affinity: bool, jobs: int, workers: int) -> dict[str, Any]:
    """One fleet, one mode: push ``jobs`` at once, wait for every answer, return the figures."""
    from bench import _sim_stats, service, simulator  # scripts/bench.py: one way to start each part

    mode = "affinity" if affinity else "fifo"
    with LocalRedis(workdir / f"redis-fleet-{mode}") as store, ExitStack() as stack:
        sims = [stack.enter_context(simulator(*SIM_ARGS)) for _ in HOSTS]
        for host, url in zip(HOSTS, sims):
            stack.enter_context(
                service(
                    store.url,
                    url,
                    f"llm-chat={workers}",
                    workdir,
                    WORKER_ID=host,
                    MODEL_AFFINITY="true" if affinity else "false",
                    MODEL_CACHE_SIZE="2",
                    OLLAMA_NUM_PARALLEL="2",
                    MODEL_PRELOAD_ENABLED="false",
                    MODEL_MANAGER_INTERVAL="1000",
                )
            )
        r = store.client()
        ids = [uuid.uuid4().hex for _ in range(jobs)]
        payloads = [
            msgspec.json.encode(
                {"id": job_id, "type": "chat", "userId": "bench", "model": MODELS[i % len(MODELS)], "request": CHAT}
            )
            for i, job_id in enumerate(ids)
        ]
        pushed_wall = time.time()
        start = time.perf_counter()
        # LPUSH of many values: the first value is served first (workers take from the right).
        r.lpush("llm-chat", *payloads)
        until = time.monotonic() + 600
        for job_id in ids:
            while r.blpop([f"llm:done:{job_id}"], timeout=1) is None:
                if time.monotonic() > until:
                    raise RuntimeError(f"job {job_id} unanswered after 600 s ({mode})")
        seconds = time.perf_counter() - start
        results = [msgspec.json.decode(blob) for blob in r.mget([f"llm:result:{i}" for i in ids])]
        failed = sum(1 for res in results if not res.get("success"))
        waits = sorted(max(0.0, _iso_seconds(res["startedAt"]) - pushed_wall) for res in results)
        loads = sum(sum(_sim_stats(url)["loads"].values()) for url in sims)
        return {
            "mode": mode,
            "jobs": jobs,
            "failed": failed,
            "seconds": round(seconds, 2),
            "jobs_per_s": round(jobs / seconds, 1),
            "loads": loads,
            "wait_p50_s": round(statistics.median(waits), 2),
            "wait_p99_s": round(waits[int(0.99 * (len(waits) - 1))], 2),
            "wait_max_s": round(waits[-1], 2),
        }


def fleet(workdir: Path, jobs: int = 300, workers: int = 4) -> dict[str, Any]:
    """Both modes, first in first out first; the ratios the target is stated in."""
    fifo = run_mode(workdir, False, jobs, workers)
    print(_line(fifo), flush=True)
    affinity = run_mode(workdir, True, jobs, workers)
    print(_line(affinity), flush=True)
    return {
        "setup": f"3 hosts x {workers} chat workers; each simulator keeps 2 of 6 models, loads in 1 s, "
        "2 slots a model, 40 ms a request; MODEL_CACHE_SIZE=2",
        "fifo": fifo,
        "affinity": affinity,
        "throughput_ratio": round(affinity["jobs_per_s"] / fifo["jobs_per_s"], 2),
        "loads_ratio": round(affinity["loads"] / max(1, fifo["loads"]), 3),
    }


def _line(m: dict[str, Any]) -> str:
    return (
        f"fleet, {m['mode']:>8}: {m['jobs']} jobs in {m['seconds']:.1f} s = {m['jobs_per_s']:.1f} jobs/s, "
        f"{m['loads']} model loads, wait p50 {m['wait_p50_s']:.2f} s, p99 {m['wait_p99_s']:.2f} s, "
        f"max {m['wait_max_s']:.2f} s, {m['failed']} failed"
    )


def chart(figures: dict[str, Any], path: Path) -> bool:
    """Throughput and model loads of the two modes side by side (PNG); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    modes = [figures["fifo"], figures["affinity"]]
    names = ["first in, first out", "model affinity"]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(11, 3.6))
    left.bar(names, [m["jobs_per_s"] for m in modes], color=["#999999", "#2a7ab0"])
    left.set_title("throughput (jobs/s)")
    mid.bar(names, [m["loads"] for m in modes], color=["#999999", "#2a7ab0"])
    mid.set_title("model loads")
    right.bar(names, [m["wait_max_s"] for m in modes], color=["#999999", "#2a7ab0"])
    right.set_title("longest wait (s)")
    for ax in (left, mid, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"300 jobs over 6 models, 3 hosts keeping 2 models each: {figures['throughput_ratio']}x throughput, "
        f"{figures['loads_ratio']:.0%} of the loads",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llm-worker-fleet-") as tmp:
        figures = fleet(Path(tmp))
    print(msgspec.json.format(msgspec.json.encode(figures), indent=2).decode())
    sys.exit(0)
