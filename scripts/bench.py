"""Benchmark the real service against the simulator, on this machine.

Measures, each against a fresh private Redis and simulator process:
- the simulator's own ceiling: requests/s from one plain keep-alive client, and from two;
- throughput: jobs/s through 2 chat workers with a zero-latency provider;
- pickup latency: enqueue to the worker's take (result.startedAt), p50/p99, on an idle service;
- provider utilization: 4 workers against 4 slots of 50 ms each, jobs/s over capacity;
- embedding micro-batching: 1,000 single-input embeddings jobs against one slot costing
  20 ms per call plus 1 ms per input, batching off and on, and the latency a lone job
  pays for waiting for company;
- throughput and job processing time (take to outcome) against the chat pool's
  size, 1 to 16 workers on a provider of 8 slots at 20 ms, drawn as a PNG chart
  (``--chart``, default docs/benchmarks-pool.png) when matplotlib is installed.

Run it with ``scripts/bench`` (``--quick`` for a short run, ``--json FILE`` to keep figures).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import bench_fleet
import msgspec
import psutil
import urllib3

from llm_worker.devtools.harness import Service
from llm_worker.devtools.localredis import LocalRedis

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def simulator(*args: str) -> Iterator[str]:
    """The simulator as its own process, as operators run it; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_worker.cli", "simulate", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    try:
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def service(redis_url: str, sim_url: str, pools: str, logdir: Path, **extra: str) -> Iterator[Service]:
    env = {
        "REDIS_URL": redis_url,
        "OLLAMA_BASE_URL": sim_url,
        "WORKER_POOLS": pools,
        "WORKER_ID": "bench",
        "LOG_LEVEL": "warning",
        "HOST_SAMPLE_INTERVAL": "1000",
        **extra,
    }
    svc = Service(env, log_path=logdir / f"service-{uuid.uuid4().hex[:6]}.log").start(timeout=120)
    try:
        yield svc
    finally:
        svc.stop()


def sim_ceiling(requests_per_client: int) -> dict[str, float]:
    """Requests/s the simulator serves to plain clients: one, then two at once."""
    with simulator() as url:
        return {f"{n}_client": _plain_clients(url, n, requests_per_client) for n in (1, 2)}


def _job() -> bytes:
    job: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "type": "chat",
        "userId": "bench",
        "model": "llama3.2",
        "request": CHAT,
    }
    return msgspec.json.encode(job)


def throughput(n: int, workdir: Path) -> float:
    """Jobs/s through 2 chat workers, provider latency 0, from a full queue to the last result."""
    with LocalRedis(workdir / "redis-tp") as store, simulator() as url, service(store.url, url, "llm-chat=2", workdir):
        r = store.client()
        # Warm up: the first jobs pay for connections and imports.
        _push_and_wait(r, 200)
        return n / _push_and_wait(r, n)


def _push_and_wait(r: Any, n: int) -> float:
    r.delete("llm:events")
    payloads = [_job() for _ in range(n)]
    start = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(0, n, 1000):
        pipe.lpush("llm-chat", *payloads[i : i + 1000])
    pipe.execute()
    while r.xlen("llm:events") < 2 * n:  # started + completed per job
        time.sleep(0.002)
    return time.perf_counter() - start


def pickup(samples: int, workdir: Path) -> dict[str, float]:
    """Enqueue-to-take latency on an idle service: one job at a time."""
    with LocalRedis(workdir / "redis-pu") as store, simulator() as url, service(store.url, url, "llm-chat=2", workdir):
        r = store.client()
        latencies = []
        for i in range(samples + 20):
            job_id = uuid.uuid4().hex
            payload = msgspec.json.encode(
                {"id": job_id, "type": "chat", "userId": "bench", "model": "llama3.2", "request": CHAT}
            )
            time.sleep(0.005)  # let the workers block on their queue again: an idle service
            sent = time.time()
            r.lpush("llm-chat", payload)
            r.blpop([f"llm:done:{job_id}"], timeout=10)
            result = msgspec.json.decode(r.get(f"llm:result:{job_id}"))
            taken = datetime.fromisoformat(result["startedAt"].replace("Z", "+00:00")).timestamp()
            if i >= 20:
                latencies.append((taken - sent) * 1000)
        latencies.sort()
        return {
            "p50_ms": statistics.median(latencies),
            "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
            "max_ms": latencies[-1],
            "samples": len(latencies),
        }


def _plain_clients(url: str, clients: int, per_client: int) -> float:
    """Jobs/s that ``clients`` plain keep-alive loops, each its own process, get from the provider."""
    queue: Any = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_count_loop, args=(url, per_client, queue)) for _ in range(clients)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return clients * per_client / (time.perf_counter() - start)


def _count_loop(url: str, n: int, out: Any) -> None:
    pool = urllib3.connection_from_url(url, maxsize=1)
    body = msgspec.json.encode({"model": "llama3.2", "stream": False, **CHAT})
    for _ in range(n):
        _ = pool.urlopen("POST", "/api/chat", body=body, headers={"Content-Type": "application/json"}).data
    out.put(n)


def utilization(seconds: float, workdir: Path) -> dict[str, float]:
    """4 workers against a provider of 4 slots at 50 ms: the share of its capacity they use.

    Reported three ways: against the nominal 80 jobs/s; against what four
    plain client processes get from the same simulator in the same run (its
    real capacity, since the simulator's own HTTP handling adds to each
    request); and as the fraction of time the provider's slots were busy.
    """
    slots, latency = 4, 0.050
    with (
        LocalRedis(workdir / "redis-ut") as store,
        simulator("--slots", str(slots), "--latency-ms", str(latency * 1000)) as url,
        service(store.url, url, "llm-chat=4", workdir, OLLAMA_NUM_PARALLEL=str(slots)),
    ):
        r = store.client()
        _push_and_wait(r, 40)  # warm up
        n = int(seconds * slots / latency)
        plain = _plain_clients(url, slots, n // slots)
        busy_before = _sim_stats(url)["busy_slot_seconds"]
        elapsed = _push_and_wait(r, n)
        busy = _sim_stats(url)["busy_slot_seconds"] - busy_before
        nominal = slots / latency
        return {
            "jobs_per_s": n / elapsed,
            "nominal_per_s": nominal,
            "of_nominal": n / elapsed / nominal,
            "plain_clients_per_s": plain,
            "of_measured_capacity": n / elapsed / plain,
            "slot_busy_fraction": busy / (slots * elapsed),
        }


POOL_SIZES = (1, 2, 4, 8, 12, 16)  # past the provider's 8 slots: more workers only wait on the host for one


def pool_sweep(seconds: float, workdir: Path) -> list[dict[str, float]]:
    """Throughput and latency against the chat pool's size, on a provider of 8 slots at 20 ms.

    For each size, jobs are queued at once (enough for ``seconds`` at the
    ideal rate) and each job's processing time (take to outcome, from its
    result) is collected: past 8 workers it includes waiting on the host for one of the model's slots.
    """
    slots, latency = 8, 0.020
    rows = []
    for size in POOL_SIZES:
        with (
            LocalRedis(workdir / f"redis-ps{size}") as store,
            simulator("--slots", str(slots), "--latency-ms", str(latency * 1000)) as url,
            service(store.url, url, f"llm-chat={size}", workdir, OLLAMA_NUM_PARALLEL=str(slots)),
        ):
            r = store.client()
            _push_and_wait(r, 4 * size)  # warm up every worker's connections
            ideal = min(size, slots) / latency
            n = max(50, int(seconds * ideal))
            jobs = [uuid.uuid4().hex for _ in range(n)]
            start = time.perf_counter()
            r.lpush(
                "llm-chat",
                *[
                    msgspec.json.encode(
                        {"id": i, "type": "chat", "userId": "bench", "model": "llama3.2", "request": CHAT}
                    )
                    for i in jobs
                ],
            )
            processing = []
            for job_id in jobs:
                r.blpop([f"llm:done:{job_id}"], timeout=120)
                processing.append(float(msgspec.json.decode(r.get(f"llm:result:{job_id}"))["processingTime"]))
            elapsed = time.perf_counter() - start
            processing.sort()
            rows.append(
                {
                    "workers": size,
                    "jobs_per_s": n / elapsed,
                    "ideal_per_s": ideal,
                    "of_ideal": n / elapsed / ideal,
                    "processing_p50_ms": statistics.median(processing),
                    "processing_p99_ms": processing[max(0, int(len(processing) * 0.99) - 1)],
                    "jobs": n,
                }
            )
    return rows


def chart(rows: list[dict[str, float]], path: Path) -> bool:
    """A PNG of throughput and latency against pool size; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = [row["workers"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(
        sizes, [row["ideal_per_s"] for row in rows], "--", color="grey", label="nominal capacity (8 slots ÷ 20 ms)"
    )
    left.plot(sizes, [row["jobs_per_s"] for row in rows], "o-", label="llm-worker")
    left.set(xlabel="chat workers", ylabel="jobs/s", title="Throughput (8 slots of 20 ms)", xticks=sizes)
    left.legend()
    right.plot(sizes, [row["processing_p50_ms"] for row in rows], "o-", label="p50")
    right.plot(sizes, [row["processing_p99_ms"] for row in rows], "o-", label="p99")
    right.axhline(20, linestyle="--", color="grey", label="provider latency")
    right.set(
        xlabel="chat workers", ylabel="ms", title="Job processing time, take to outcome", xticks=sizes, ylim=(0, None)
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _timed_gets(url: str, n: int) -> list[float]:
    """Milliseconds for each of ``n`` GETs over one keep-alive connection, sorted."""
    pool = urllib3.connection_from_url(url, maxsize=1)
    path = urllib3.util.parse_url(url).path
    times = []
    for _ in range(n):
        start = time.perf_counter()
        resp = pool.urlopen("GET", path, preload_content=True)
        times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, resp.status
    return sorted(times)


def _percentiles(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(times),
        "p99_ms": times[max(0, int(len(times) * 0.99) - 1)],
        "max_ms": times[-1],
        "samples": len(times),
    }


def liveness_while_busy(samples: int, workdir: Path) -> dict[str, float]:
    """/health/live latency while every worker holds a job (4 workers, slow provider)."""
    with (
        LocalRedis(workdir / "redis-lv") as store,
        simulator("--latency-ms", "2000", "--slots", "4") as url,
        service(store.url, url, "llm-chat=4", workdir, OLLAMA_NUM_PARALLEL="4") as svc,
    ):
        r = store.client()
        r.lpush("llm-chat", *[_job() for _ in range(200)])
        while sum(1 for w in svc.get("/status")[1]["workers"] if w["state"] == "busy") < 4:
            time.sleep(0.01)
        return _percentiles(_timed_gets(svc.url + "/health/live", samples))


def metrics_render(samples: int, workdir: Path) -> dict[str, float]:
    """/metrics response time with 64 worker slots and 16 models (12 chat, 4 embedding) in use."""
    chat_models = [f"chat-{n}" for n in range(12)]
    embed_models = [f"embed-{n}" for n in range(4)]
    pools = "llm-chat=40,llm-embeddings=16,llm-batch=4,llm-priority=4"
    with (
        LocalRedis(workdir / "redis-mr") as store,
        simulator("--models", ",".join(chat_models + embed_models)) as url,
        service(store.url, url, pools, workdir) as svc,
    ):
        r = store.client()
        jobs = []
        for n in range(640):
            model = chat_models[n % 12]
            kind, queue, request = [
                ("chat", "llm-chat", CHAT),
                ("generate", "llm-chat", {"prompt": "hi"}),
                ("embeddings", "llm-embeddings", {"input": "hi"}),
                ("batch", "llm-batch", {"requests": [{"type": "chat", "request": CHAT}]}),
                ("chat", "llm-priority", CHAT),
            ][n % 5]
            if kind == "embeddings":
                model = embed_models[n % 4]
            job = {"id": uuid.uuid4().hex, "type": kind, "userId": "bench", "model": model, "request": request}
            jobs.append((queue, msgspec.json.encode(job)))
        r.delete("llm:events")
        for queue, payload in jobs:
            r.lpush(queue, payload)
        while r.xlen("llm:events") < 2 * len(jobs):
            time.sleep(0.05)
        while len(svc.get("/status")[1]["workers"]) < 64:
            time.sleep(0.05)
        time.sleep(1)  # the worker counts land just after the results
        series = urllib3.request("GET", svc.url + "/metrics").data.count(b"\n")
        return {**_percentiles(_timed_gets(svc.url + "/metrics", samples)), "lines": series}


def batching(n: int, lone: int, workdir: Path) -> dict[str, Any]:
    """Embeddings jobs/s with gathering off and on, one slot of 20 ms per call + 1 ms per input.

    Throughput: ``n`` single-input jobs queued at once, to the last result.
    Added latency: jobs sent one at a time to an idle service, enqueue to
    result, on minus off at p50 and p99 (a lone job waits BATCH_TIMEOUT).
    """
    out: dict[str, Any] = {}
    for mode, on in (("off", "false"), ("on", "true")):
        with (
            LocalRedis(workdir / f"redis-b{mode}") as store,
            simulator("--embed-call-ms", "20", "--embed-input-ms", "1", "--slots", "1") as url,
            service(store.url, url, "llm-embeddings=1", workdir, ENABLE_BATCH_PROCESSING=on),
        ):
            r = store.client()
            _embed_and_wait(r, 20)  # warm up: connections, the model's load
            before = _sim_stats(url)["requests"].get("embed", 0)
            seconds = _embed_and_wait(r, n)
            calls = _sim_stats(url)["requests"].get("embed", 0) - before
            latencies = sorted(_lone_embed(r) for _ in range(lone))
            out[mode] = {"jobs_per_s": n / seconds, "provider_calls": calls, "lone_latency": _percentiles(latencies)}
    out["speedup"] = out["on"]["jobs_per_s"] / out["off"]["jobs_per_s"]
    out["added_latency_ms"] = {
        q: out["on"]["lone_latency"][q] - out["off"]["lone_latency"][q] for q in ("p50_ms", "p99_ms")
    }
    return out


def _embed_job() -> tuple[str, bytes]:
    job_id = uuid.uuid4().hex
    # Every input its own, so the response cache answers none of them.
    job = {
        "id": job_id,
        "type": "embeddings",
        "userId": "bench",
        "model": "nomic-embed-text",
        "request": {"input": f"text {job_id}"},
    }
    return job_id, msgspec.json.encode(job)


def _embed_and_wait(r: Any, n: int) -> float:
    jobs = [_embed_job() for _ in range(n)]
    start = time.perf_counter()
    r.lpush("llm-embeddings", *[payload for _, payload in jobs])
    for job_id, _ in jobs:
        r.blpop([f"llm:done:{job_id}"], timeout=120)
    return time.perf_counter() - start


def _lone_embed(r: Any) -> float:
    time.sleep(0.005)
    job_id, payload = _embed_job()
    start = time.perf_counter()
    r.lpush("llm-embeddings", payload)
    r.blpop([f"llm:done:{job_id}"], timeout=30)
    return (time.perf_counter() - start) * 1000


def _sim_stats(url: str) -> dict[str, Any]:
    return msgspec.json.decode(urllib3.request("GET", url + "/_sim/stats").data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (for a smoke check, not for figures)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--chart",
        metavar="PNG",
        default="docs/benchmarks-pool.png",
        help="where to draw throughput and latency against pool size (needs matplotlib; default %(default)s)",
    )
    parser.add_argument(
        "--only",
        choices=("fleet",),
        help="run one part alone: fleet, model affinity against first in, first out (scripts/bench_fleet.py)",
    )
    parser.add_argument(
        "--fleet-chart",
        metavar="PNG",
        default="docs/benchmarks-fleet.png",
        help="where to draw the fleet benchmark (needs matplotlib; default %(default)s)",
    )
    args = parser.parse_args(argv)
    scale = 0.25 if args.quick else 1.0
    with tempfile.TemporaryDirectory(prefix="llm-worker-bench-") as tmp:
        workdir = Path(tmp)
        figures: dict[str, Any] = {
            "date": datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            },
        }
        if args.only != "fleet":
            everything_else(figures, scale, workdir, args)
        figures["fleet"] = bench_fleet.fleet(workdir)
        f = figures["fleet"]
        print(
            f"fleet: model affinity {f['throughput_ratio']}x the throughput of first in, first out, with "
            f"{f['loads_ratio']:.1%} of its model loads",
            flush=True,
        )
        if bench_fleet.chart(f, Path(args.fleet_chart)):
            print(f"chart: {args.fleet_chart}", flush=True)
    if args.json:
        Path(args.json).write_text(msgspec.json.format(msgspec.json.encode(figures), indent=2).decode())
    return 0


def everything_else(figures: dict[str, Any], scale: float, workdir: Path, args: argparse.Namespace) -> None:
    """Every part but the fleet's, in order, printing each figure as it comes."""
    figures["simulator_ceiling_rps"] = sim_ceiling(int(6000 * scale))
    print(
        f"simulator ceiling: {figures['simulator_ceiling_rps']['1_client']:.0f} req/s from one client, "
        f"{figures['simulator_ceiling_rps']['2_client']:.0f} req/s from two",
        flush=True,
    )
    runs = [throughput(int(8000 * scale), workdir) for _ in range(3)]
    figures["throughput_jobs_per_s"] = {"median": statistics.median(runs), "runs": runs}
    print(
        f"throughput: {statistics.median(runs):.0f} jobs/s median of {', '.join(f'{x:.0f}' for x in runs)} "
        f"(2 workers, provider latency 0)",
        flush=True,
    )
    figures["pickup"] = pickup(int(1000 * scale), workdir)
    p = figures["pickup"]
    print(
        f"pickup latency (idle): p50 {p['p50_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms, max {p['max_ms']:.3f} ms",
        flush=True,
    )
    figures["utilization"] = utilization(10 * scale, workdir)
    u = figures["utilization"]
    print(
        f"provider utilization (4 workers, 4 slots x 50 ms): {u['jobs_per_s']:.1f} jobs/s = "
        f"{u['of_measured_capacity']:.1%} of the {u['plain_clients_per_s']:.1f} jobs/s four plain clients get, "
        f"{u['of_nominal']:.1%} of the nominal {u['nominal_per_s']:.0f}; slots busy "
        f"{u['slot_busy_fraction']:.1%} of the time",
        flush=True,
    )
    figures["liveness_while_busy"] = liveness_while_busy(int(2000 * scale), workdir)
    lv = figures["liveness_while_busy"]
    print(
        f"/health/live while every worker is busy: p50 {lv['p50_ms']:.2f} ms, p99 {lv['p99_ms']:.2f} ms, "
        f"max {lv['max_ms']:.2f} ms",
        flush=True,
    )
    figures["metrics_render"] = metrics_render(int(100 * scale), workdir)
    mr = figures["metrics_render"]
    print(
        f"/metrics with 64 worker slots and 16 models: p50 {mr['p50_ms']:.1f} ms, p99 {mr['p99_ms']:.1f} ms "
        f"({mr['lines']} lines)",
        flush=True,
    )
    figures["batching"] = batching(int(1000 * scale), int(200 * scale), workdir)
    b = figures["batching"]
    print(
        f"embeddings, one slot of 20 ms/call + 1 ms/input: {b['off']['jobs_per_s']:.0f} jobs/s batching off "
        f"({b['off']['provider_calls']} calls), {b['on']['jobs_per_s']:.0f} jobs/s on "
        f"({b['on']['provider_calls']} calls): "
        f"{b['speedup']:.1f}x; a lone job waits {b['added_latency_ms']['p50_ms']:.1f} ms more at p50, "
        f"{b['added_latency_ms']['p99_ms']:.1f} ms at p99 (BATCH_TIMEOUT 20 ms)",
        flush=True,
    )
    figures["pool_sweep"] = pool_sweep(5 * scale, workdir)
    for row in figures["pool_sweep"]:
        print(
            f"{row['workers']} chat worker(s), 8 slots x 20 ms: {row['jobs_per_s']:.0f} jobs/s = "
            f"{row['of_ideal']:.1%} "
            f"of {row['ideal_per_s']:.0f}; processing p50 {row['processing_p50_ms']:.1f} ms, "
            f"p99 {row['processing_p99_ms']:.1f} ms",
            flush=True,
        )
    if chart(figures["pool_sweep"], Path(args.chart)):
        print(f"chart: {args.chart}", flush=True)
    else:
        print("chart: skipped (pip install matplotlib to draw it)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
