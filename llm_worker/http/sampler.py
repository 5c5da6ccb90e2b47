"""The sampler: a thread of the HTTP process that probes slow things and writes shared memory.

Probing Ollama (every endpoint of OLLAMA_BASE_URL), Redis queue depths, NVML
and psutil can each take from
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
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import MAX_GPUS, NAME
from llm_worker.host.procs import worker_id
from llm_worker.host.shm import SharedState
from llm_worker.http.gpu import GpuReading, GpuSampler, ollama_memory
from llm_worker.http.hoststats import OLLAMA_NAMES, ProcessWatcher, find_processes, host_reading
from llm_worker.http.liveprobe import Answer, LiveProbe
from llm_worker.models.fleet import Fleet, FleetSeen
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Provider, endpoint_of
from llm_worker.queue.connection import connect
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import parked_counts
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
        self.providers: list[Provider] | None = None  # every endpoint of every provider, made once
        self.probed: list[Provider] = []  # those the live probe asks: Ollama's (else the first provider's)
        self._making = threading.Lock()  # the probe thread and this one both ask for them
        self.reach = Reachability(state.providers, state.lock)
        self.fleet = Fleet(self.redis, self.keys, settings.worker.id)
        self.fleet_seen = FleetSeen({}, {})  # the last sample's, for /status
        self.endpoints = EndpointTable(state.providers, state.lock)
        # The process's one way to ask the provider for its health: this thread's
        # periodic probe and /health/ollama's live ones share it (see liveprobe).
        self.live = LiveProbe(self._probed, on_answer=self._answered)
        every = settings.http.sample_interval / 1000
        self.provider_chore = Chore("provider", settings.ollama.health_check_interval / 1000, self.probe_provider)
        self.chores = [
            self.provider_chore,
            Chore("endpoints", PROBE_EVERY, self.probe_down),
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
        probed = self._probed()
        if any(getattr(p, "max_concurrent", 0) and self._calls_in_flight(p) for p in probed):
            # A server with few slots (llama-cpp-python's interrupts a running generation for any
            # request, a listing included) is probed only while idle: calls in flight show it answers.
            return
        answer = self.live.check(timeout=min(5.0, self.settings.ollama.health_check_interval / 1000))
        # While an endpoint is down (its calls go elsewhere, or its workers paused), look every
        # second, so that the host uses it again soon after it is back.
        down = bool(answer.down) or any(self.reach.is_down(p.endpoint) for p in answer.endpoints)
        self.provider_chore.period = PROBE_EVERY if down else self.settings.ollama.health_check_interval / 1000

    def _answered(self, answer: Answer) -> None:
        """Every probe's answer, the sampler's or /health/ollama's: recorded per endpoint; a success marks it up.

        A success is the evidence the workers' own probes accept (``health()``
        ok), so it may end their pause. A failure is never taken for down: the
        workers mark an endpoint down only when a call finds nothing listening,
        and a slow or failed health GET (with HEALTHCHECK_TIMEOUT, an
        operator's choice for monitoring) must not pause them.
        """
        for probed in answer.endpoints:
            if not probed.endpoint:  # the provider could not even be made
                continue
            index = self.endpoints.register(probed.endpoint, answer.provider, probed.health.url)
            if index < 0:
                continue
            health = probed.health
            # A reused answer is as old as its probe, not as this look.
            self.endpoints.record_health(index, health.ok, health.version, health.error_details, answer.finished)
            if health.ok and self.reach.mark_up(probed.endpoint):
                log.warning(f"provider {probed.endpoint} answers again; workers take jobs")

    def probe_down(self) -> None:
        """Probe each endpoint the workers found down, about once a second (one process at a time).

        An endpoint down while another serves its models pauses no worker, so
        no paused worker probes it; and the live probe may not come for
        OLLAMA_HEALTH_CHECK_INTERVAL. Without this it would be used again late.
        One probe a turn, so that several servers that do not answer hold up
        the sampler's other chores for one probe's timeout at most.
        """
        for row in self.reach.rows():
            name = str(row["endpoint"])
            if row["up"] or not self.reach.probe_due(name):
                continue
            provider = next((p for p in self._all() if endpoint_of(p) == name), None)
            if provider is not None and provider.health(timeout=2.0).ok and self.reach.mark_up(name):
                log.warning(f"provider {name} answers again; calls go to it")
            return

    def _calls_in_flight(self, provider: Provider) -> bool:
        """Whether a worker is in a call to this endpoint now (the slots name the endpoint of each call)."""
        index = self.endpoints.find(endpoint_of(provider))
        return index >= 0 and in_flight(self.state, provider=index).provider > 0

    def _probed(self) -> list[Provider]:
        """The endpoints the live probe asks: Ollama's, else the first provider's (made on first use)."""
        self._all()
        return self.probed

    def _all(self) -> list[Provider]:
        with self._making:
            if self.providers is None:
                providers = PluginManager().load(self.plugins).providers(self.settings)
                name = "ollama" if any(p.name == "ollama" for p in providers) else providers[0].name
                self.probed = [p for p in providers if p.name == name]
                self.providers = providers
        return self.providers

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
