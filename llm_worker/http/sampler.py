"""The sampler: a thread of the HTTP process that probes slow things and writes shared memory.

Probing Ollama, Redis queue depths, NVML and psutil can each take from
microseconds to seconds; here they stall nothing that matters (the supervisor
never waits on them, and HTTP answers from what was last written; only
/health/ollama asks Ollama live, through the same LiveProbe as the sampler).
NVML is initialised in this process, after fork, on its first sample.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from llm_worker.host.backpressure import PROBE_EVERY, Reachability, in_flight
from llm_worker.host.chores import Chore
from llm_worker.host.layout import MAX_GPUS, NAME
from llm_worker.host.procs import worker_id
from llm_worker.host.shm import SharedState
from llm_worker.http.gpu import GpuReading, GpuSampler, ollama_memory
from llm_worker.http.hoststats import OLLAMA_NAMES, ProcessWatcher, find_processes, host_reading
from llm_worker.http.liveprobe import Answer, LiveProbe
from llm_worker.models.fleet import Fleet, FleetSeen
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Provider
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import parked_counts
from llm_worker.queue.reliable import connect
from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.http.sampler")
NVML_MODULE_ENV = "LLM_WORKER_NVML_MODULE"  # tests point this at a fake NVML module


class Sampler(threading.Thread):
    def __init__(self, settings: Settings, state: SharedState, plugins: list[Found]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.settings = settings
        self.state = state
        self.plugins = plugins
        self.redis = connect(settings, timeout=2.0)
        self.keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
        self.gpus = GpuSampler(os.environ.get(NVML_MODULE_ENV, "pynvml"))
        self.processes = ProcessWatcher()
        self.provider: Provider | None = None
        self.provider_index = 0  # its place among the providers, as the workers number them
        self.reach = Reachability(state.providers, state.lock)
        self.fleet = Fleet(self.redis, self.keys, settings.worker.id)
        self.fleet_seen = FleetSeen({}, {})  # the last sample's, for /status
        # The process's one way to ask the provider for its health: this thread's
        # periodic probe and /health/ollama's live ones share it (see liveprobe).
        self.live = LiveProbe(self._provider, on_answer=self._answered)
        every = settings.http.sample_interval / 1000
        self.provider_chore = Chore("provider", settings.ollama.health_check_interval / 1000, self.probe_provider)
        self.chores = [
            self.provider_chore,
            Chore("queues", every, self.read_queues),
            Chore("host", every, self.read_host),
            Chore("gpus", every, self.read_gpus),
        ]

    def run(self) -> None:
        while True:
            now = time.monotonic()
            for chore in self.chores:
                if now >= chore.due:
                    self._run(chore)
                    chore.due = time.monotonic() + chore.period
            self.state.readings.sampled = time.monotonic()
            time.sleep(max(0.05, min(c.due for c in self.chores) - time.monotonic()))

    def _run(self, chore: Chore) -> None:
        try:
            chore.run()
        except Exception as exc:  # a probe that fails must not end the sampler
            if not chore.failing:
                log.warning(f"{chore.name} sampling failed", extra={"error": repr(exc)})
            chore.failing = True
        else:
            chore.failing = False

    # ---- chores ------------------------------------------------------------------

    def probe_provider(self) -> None:
        r = self.state.readings
        provider = self._provider()
        if getattr(provider, "max_concurrent", 0) and self._calls_in_flight(provider):
            # A server with few slots (llama-cpp-python's interrupts a running generation for any
            # request, a listing included) is probed only while idle: calls in flight show it answers.
            r.provider_checked = time.monotonic()
            return
        answer = self.live.check(timeout=min(5.0, self.settings.ollama.health_check_interval / 1000))
        health = answer.health
        r.provider_up = int(health.ok)
        # While a provider is down (its workers paused), look every second, so
        # that the host takes jobs again soon after it is back.
        down = not health.ok or (answer.provider != "" and self.reach.is_down(answer.provider))
        self.provider_chore.period = PROBE_EVERY if down else self.settings.ollama.health_check_interval / 1000
        r.provider_version = (health.version or "").encode()[:63]
        r.provider_error = (health.error_details or "").encode()[:255]
        r.provider_checked = answer.finished  # a reused answer is as old as its probe, not as this look

    def _answered(self, answer: Answer) -> None:
        """Every probe's answer, the sampler's or /health/ollama's: a success marks the provider up.

        A success is the evidence the workers' own probes accept (``health()``
        ok), so it may end their pause. A failure is never written: the
        workers mark a provider down only when a call finds nothing listening,
        and a slow or failed health GET (with HEALTHCHECK_TIMEOUT, an
        operator's choice for monitoring) must not pause them.
        """
        if answer.health.ok and answer.provider and self.reach.mark_up(answer.provider):
            log.warning(f"provider {answer.provider} answers again; workers take jobs")

    def _calls_in_flight(self, provider: Provider) -> bool:
        """Whether a worker is in a call to ``provider`` now (the slots name the provider of each call).

        Workers number the providers in the order the plugins give them, as ``_provider`` does here.
        """
        return in_flight(self.state, provider=self.provider_index).provider > 0

    def _provider(self) -> Provider:
        if self.provider is None:
            providers = PluginManager().load(self.plugins).providers(self.settings)
            self.provider_index = next((i for i, p in enumerate(providers) if p.name == "ollama"), 0)
            self.provider = providers[self.provider_index]
        return self.provider

    def read_queues(self) -> None:
        r = self.state.readings
        pools = self.state.pool_names()
        host = self.settings.worker.id
        held = [
            (slot.pool, self.keys.processing(worker_id(host, slot.pid))) for slot in self.state.slots if slot.pid > 0
        ]
        pipe = self.redis.pipeline(transaction=False)
        for pool in pools:
            pipe.llen(pool)
        for _, key in held:
            pipe.llen(key)
        pipe.zcard(self.keys.delayed)
        pipe.llen(self.keys.dead_letter)
        replies = pipe.execute()
        processing = [0] * len(pools)
        for (pool, _), count in zip(held, replies[len(pools) :]):
            if pool < len(pools):
                processing[pool] += count
        parked = parked_counts(self.redis, self.keys, pools)
        for i, pool in enumerate(pools):
            r.waiting[i] = replies[i]
            r.processing[i] = processing[i]
            r.parked[i] = sum(parked.get(pool, {}).values())
        r.delayed, r.dead_letter = replies[-2], replies[-1]
        r.depths_checked = time.monotonic()
        self.fleet_seen = FleetSeen(self.fleet.read(), parked)

    def read_host(self) -> None:
        r = self.state.readings
        host = host_reading()
        r.cpu_ratio = _num(host.cpu_ratio)
        r.cpu_count = host.cpu_count or 0
        r.load1 = _num(host.load_1m)
        r.memory_used_bytes = _num(host.memory_used_bytes)
        r.memory_total_bytes = _num(host.memory_total_bytes)
        r.disk_used_bytes = _num(host.disk_used_bytes)
        r.disk_total_bytes = _num(host.disk_total_bytes)
        r.network_sent_bytes = _num(host.net_sent_bytes)
        r.network_received_bytes = _num(host.net_recv_bytes)
        slots = {slot.pid: slot for slot in self.state.slots if slot.pid > 0}
        for pid, reading in self.processes.read(slots).items():
            slot = slots[pid]
            slot.rss_bytes = float(reading.rss_bytes)
            slot.cpu_seconds = reading.cpu_seconds

    def read_gpus(self) -> None:
        self.write_gpus(self.gpus.sample(), find_processes(OLLAMA_NAMES))

    def write_gpus(self, reading: GpuReading, ollama_pids: list[int]) -> None:
        r = self.state.readings
        r.gpu_collector_up = int(reading.collector_up)
        r.gpu_error = (reading.error or "").encode()[:255]
        held = ollama_memory(reading, ollama_pids, OLLAMA_NAMES)
        gpus = reading.gpus[:MAX_GPUS]
        for row, gpu in zip(r.gpus, gpus):
            row.index = gpu.index
            row.uuid = (gpu.uuid or "").encode()[: NAME - 1]
            row.name = (gpu.name or "").encode()[: NAME - 1]
            row.utilization_ratio = _num(gpu.utilization_ratio)
            row.memory_used_bytes = _num(gpu.memory_used_bytes)
            row.memory_total_bytes = _num(gpu.memory_total_bytes)
            row.temperature_celsius = _num(gpu.temperature_celsius)
            row.power_watts = _num(gpu.power_watts)
            row.energy_joules = _num(gpu.energy_joules)
            row.ollama_memory_bytes = (
                float(held[gpu.index]) if gpu.index in held else (0.0 if gpu.processes is not None else math.nan)
            )
        r.gpu_count = len(gpus)


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)
