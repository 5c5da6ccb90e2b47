"""Prometheus metrics, computed at scrape time from shared memory.

One custom collector; prometheus_client does the exposition (text 0.0.4 and
1.0.0, OpenMetrics, gzip) through its WSGI app. Every name starts with
``llm_worker_`` and uses base units (seconds, bytes, ratios). Series exist at
zero from the start for every pool, the job types it serves and their
default models, so rates and alerts work before the first job.

Samples are appended directly with label dicts cached across scrapes: the
families' ``add_metric`` builds a dict per sample, which on a 2-core host cost
as much as the exposition itself.

Series of one endpoint (a server a provider speaks to: provider reachability
and health, breakers, loaded models, loads and unloads) carry an ``endpoint``
label, its URL, when the provider has several; with one, they are as they
always were, without it.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from llm_worker import __version__
from llm_worker.host.backpressure import Reachability, in_flight
from llm_worker.host.endpoints import Endpoint, EndpointTable
from llm_worker.host.layout import AFFINITY, DURATION_BUCKETS, OUTCOMES, TYPES, WAIT_BUCKETS, Pause, SlotState
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.ratelimit import snapshot as rate_limits
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import PoolTotals, model_label
from llm_worker.queue.keys import Keys
from llm_worker.settings.config import Settings

_TYPE_INDEX = {name: i for i, name in enumerate(TYPES)}
_STATE_NAMES = {s.value: s.name.lower() for s in SlotState}
_LABELS: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, str]] = {}
_DURATION_LE = tuple(floatToGoString(b) for b in (*DURATION_BUCKETS, math.inf))
_WAIT_LE = tuple(floatToGoString(b) for b in (*WAIT_BUCKETS, math.inf))


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> dict[str, str]:
    """One dict per label set, reused by every scrape (label sets are bounded)."""
    key = (names, values)
    found = _LABELS.get(key)
    if found is None:
        found = _LABELS[key] = dict(zip(names, values))
    return found


class Family:
    """A metric family whose samples are appended without per-sample dict building."""

    def __init__(self, name: str, doc: str, kind: str, labels: tuple[str, ...] = ()) -> None:
        self.metric = Metric(name, doc, kind)
        self.names = labels
        self._sample_name = name + "_total" if kind == "counter" else name

    def add(self, values: tuple[str, ...], value: float) -> None:
        labels = _LABELS.get((self.names, values)) or _labels(self.names, values)
        self.metric.samples.append(Sample(self._sample_name, labels, value, None, None, None))

    def add_at(self, endpoint: Endpoint | None, values: tuple[str, ...], value: float) -> None:
        """A sample of one endpoint: labelled ``endpoint`` (its URL) when its provider has several."""
        label = endpoint.label if endpoint is not None else None
        if label is None:
            self.add(values, value)
            return
        labels = _labels((*self.names, "endpoint"), (*values, label))
        self.metric.samples.append(Sample(self._sample_name, labels, value, None, None, None))

    def add_histogram(
        self, values: tuple[str, ...], les: Sequence[str], cumulative: Sequence[int], total: float
    ) -> None:
        name, names, samples = self.metric.name, (*self.names, "le"), self.metric.samples
        for le, count in zip(les, cumulative):
            samples.append(Sample(name + "_bucket", _labels(names, (*values, le)), count, None, None, None))
        self.add_summary(values, cumulative[-1], total)

    def add_summary(self, values: tuple[str, ...], count: float, total: float) -> None:
        labels = _labels(self.names, values)
        self.metric.samples.append(Sample(self.metric.name + "_count", labels, count, None, None, None))
        self.metric.samples.append(Sample(self.metric.name + "_sum", labels, total, None, None, None))


def served_types(pool: str, settings: Settings) -> tuple[str, ...]:
    """Job types a pool's queue carries (the priority queue and custom ones carry any)."""
    q = settings.queue
    return {q.chat: ("chat", "generate"), q.embeddings: ("embeddings",), q.batch: ("batch",)}.get(pool, TYPES)


class RedisCounter:
    """A counter kept in Redis (all hosts together), read at most every ``every`` seconds at scrape time.

    A scrape never waits long on Redis (a short timeout), and one that cannot
    read it shows the last value read: None until a read succeeds.
    """

    def __init__(self, settings: Settings, key: str, every: float = 5.0) -> None:
        self.settings, self.key, self.every = settings, key, every
        self.value: float | None = None
        self._read_at = -math.inf
        self._client: Any = None

    def read(self) -> float | None:
        now = time.monotonic()
        if now - self._read_at >= self.every:
            self._read_at = now
            try:
                if self._client is None:
                    from llm_worker.queue.connection import connect  # redis-py only where it is used

                    self._client = connect(self.settings, timeout=1.0)
                self.value = float(self._client.get(self.key) or 0)
            except Exception:  # noqa: BLE001 - Redis down or slow: keep the last value, /health says why
                pass
        return self.value


class ShmCollector(Collector):
    def __init__(self, settings: Settings, state: SharedState) -> None:
        self.settings = settings
        self.state = state
        keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
        self.dead_letters_trimmed = RedisCounter(settings, keys.dead_letters_trimmed)

    def collect(self) -> Iterator[Metric]:
        state = self.state
        # Names and totals read together: a HUP may give a row to another pool (shm.pool_index) meanwhile.
        pools, totals = state.read_consistently(
            lambda: (names := state.pool_names(), [self._pool_totals(i) for i in range(len(names))])
        )
        labels = state.model_labels()
        endpoints = EndpointTable(state.providers, state.lock).all()
        for family in (
            *self._build(),
            *self._workers(pools),
            *self._jobs(pools, totals, labels),
            *self._models(totals, labels),
            *self._recovery(pools),
            *self._queues(pools),
            *self._health(endpoints),
            *self._backpressure(pools, endpoints),
            *self._rate_limits(labels),
            *self._model_lifecycle(labels, endpoints),
            *self._host(),
            *self._gpus(),
        ):
            yield family.metric

    def _pool_totals(self, pool: int) -> PoolTotals:
        blocks = [slot.counters for slot in self.state.slots if slot.pool == pool and (slot.pid > 0 or slot.jobs_done)]
        return PoolTotals.of([self.state.retired[pool], *blocks])

    def _defaults(self, labels: list[str]) -> dict[int, int]:
        """Each job type's default model, as an index into the model labels (0 when unknown)."""
        m = self.settings.models
        index = {label: i for i, label in enumerate(labels)}
        chat, embed = index.get(model_label(m.default_chat), 0), index.get(model_label(m.default_embedding), 0)
        return {
            _TYPE_INDEX["chat"]: chat,
            _TYPE_INDEX["generate"]: chat,
            _TYPE_INDEX["embeddings"]: embed,
            _TYPE_INDEX["batch"]: chat,
        }

    def _build(self) -> list[Family]:
        info = Family(
            "llm_worker_build", "Version of llm-worker and of the Python running it", "info", ("version", "python")
        )
        info.metric.samples.append(
            Sample(
                "llm_worker_build_info",
                _labels(info.names, (__version__, platform.python_version())),
                1.0,
                None,
                None,
                None,
            )
        )
        started = Family(
            "llm_worker_start_time_seconds", "When the supervisor started, in seconds since the epoch", "gauge"
        )
        started.add((), self.state.header.started)
        return [info, started]

    def _workers(self, pools: list[str]) -> list[Family]:
        state = self.state
        by_state = Family("llm_worker_workers", "Worker processes by pool and state", "gauge", ("pool", "state"))
        wanted = Family("llm_worker_workers_wanted", "Worker processes each pool should have", "gauge", ("pool",))
        beat = Family(
            "llm_worker_worker_last_heartbeat_timestamp_seconds",
            "When each worker slot last showed life, in seconds since the epoch",
            "gauge",
            ("slot", "pool"),
        )
        rss = Family(
            "llm_worker_worker_resident_memory_bytes", "Resident memory of each worker", "gauge", ("slot", "pool")
        )
        # CPU per pool: per worker it is in /status; per slot here it would be 64 more series a scrape.
        cpu = Family(
            "llm_worker_pool_cpu_seconds",
            "CPU time of each pool's live workers (drops when a worker is replaced)",
            "gauge",
            ("pool",),
        )
        cpu_by_pool = [0.0] * len(pools)
        counts = {(p, s.name.lower()): 0 for p in range(len(pools)) for s in SlotState if s != SlotState.EMPTY}
        now, wall = time.monotonic(), time.time()
        for index, slot in enumerate(state.slots):
            if slot.pid <= 0 or slot.state == SlotState.EMPTY:
                continue
            counts[(slot.pool, _STATE_NAMES[slot.state])] += 1
            key = (str(index), pools[slot.pool] if slot.pool < len(pools) else str(slot.pool))
            beat.add(key, wall - max(0.0, now - slot.heartbeat))
            rss.add(key, slot.rss_bytes)
            if slot.pool < len(pools):
                cpu_by_pool[slot.pool] += slot.cpu_seconds
        for (pool, name), count in counts.items():
            by_state.add((pools[pool], name), count)
        for index, pool in enumerate(pools):
            wanted.add((pool,), state.header.pool_wanted[index])
            cpu.add((pool,), cpu_by_pool[index])
        return [by_state, wanted, beat, rss, cpu]

    def _jobs(self, pools: list[str], totals: list[PoolTotals], labels: list[str]) -> list[Family]:
        jobs = Family(
            "llm_worker_jobs",
            "Job attempts finished, by outcome (completed, failed for good, retried)",
            "counter",
            ("queue", "type", "model", "outcome"),
        )
        duration = Family(
            "llm_worker_job_duration_seconds", "Time from taking a job to its outcome", "histogram", ("queue", "type")
        )
        wait = Family(
            "llm_worker_queue_wait_seconds", "Time from a job's createdAt to its take", "histogram", ("queue",)
        )
        rejected = Family(
            "llm_worker_payloads_rejected",
            "Payloads dead-lettered unrun: not jobs, or invalid ones",
            "counter",
            ("queue",),
        )
        fallbacks = Family("llm_worker_fallbacks", "Jobs answered by a fallback", "counter", ("queue",))
        cache = Family("llm_worker_cache_hits", "Jobs answered from the response cache", "counter", ("queue",))
        misses = Family(
            "llm_worker_cache_misses",
            "Deterministic jobs the response cache could not answer (hit rate: hits / (hits + misses))",
            "counter",
            ("queue",),
        )
        affinity = Family(
            "llm_worker_affinity_jobs",
            "Model affinity: jobs parked for a host holding their model, and parked jobs taken (hot: model loaded "
            "here; cold: loaded for them; overdue: past MODEL_AFFINITY_MAX_WAIT)",
            "counter",
            ("queue", "how"),
        )
        defaults = self._defaults(labels)
        for index, pool in enumerate(pools):
            total = totals[index]
            for i, how in enumerate(AFFINITY):
                affinity.add((pool, how), total.affinity[i])
            served = [_TYPE_INDEX[t] for t in served_types(pool, self.settings)]
            for t, m in sorted(total.rows_used() | {(t, defaults[t]) for t in served}):
                for o, outcome in enumerate(OUTCOMES):
                    jobs.add((pool, TYPES[t], labels[m], outcome), total.jobs_of(t, m, o))
            for t in sorted(set(served) | {t for t, _ in total.rows_used()}):
                duration.add_histogram((pool, TYPES[t]), _DURATION_LE, *total.duration_of(t))
            wait.add_histogram((pool,), _WAIT_LE, *total.wait())
            rejected.add((pool,), total.rejected)
            fallbacks.add((pool,), sum(total.fallbacks))
            cache.add((pool,), sum(total.cache_hits))
            misses.add((pool,), sum(total.cache_misses))
        return [jobs, duration, wait, rejected, fallbacks, cache, misses, affinity]

    def _models(self, totals: list[PoolTotals], labels: list[str]) -> list[Family]:
        seconds = Family(
            "llm_worker_model_job_duration_seconds",
            "Time spent on jobs per model (count and sum: the mean)",
            "summary",
            ("model",),
        )
        tokens = Family(
            "llm_worker_tokens", "Tokens processed, as the provider reports them", "counter", ("model", "kind")
        )
        used = {m for total in totals for _, m in total.rows_used()} | set(self._defaults(labels).values())
        for m in sorted(used):
            label = (labels[m],)
            seconds.add_summary(label, sum(t.model_count(m) for t in totals), sum(t.model_seconds[m] for t in totals))
            tokens.add((labels[m], "prompt"), sum(t.prompt_tokens[m] for t in totals))
            tokens.add((labels[m], "completion"), sum(t.completion_tokens[m] for t in totals))
        return [seconds, tokens]

    def _recovery(self, pools: list[str]) -> list[Family]:
        header = self.state.header
        requeued = Family(
            "llm_worker_jobs_reclaimed", "Jobs handed back to their queue from dead or stopped workers", "counter"
        )
        requeued.add((), header.jobs_requeued)
        crashed = Family(
            "llm_worker_jobs_crash_dead_lettered",
            "Jobs dead-lettered for having been in hand of too many workers that died",
            "counter",
        )
        crashed.add((), header.jobs_crash_dead_lettered)
        exits = Family(
            "llm_worker_worker_crashes", "Workers that died without being asked to stop", "counter", ("pool",)
        )
        for index, pool in enumerate(pools):
            exits.add((pool,), header.worker_exits[index])
        return [requeued, crashed, exits]

    def _queues(self, pools: list[str]) -> list[Family]:
        r = self.state.readings
        depth = Family(
            "llm_worker_queue_jobs",
            "Jobs in each queue as last sampled: waiting, parked for a host that holds their model (MODEL_AFFINITY), "
            "and in hand of this host's workers",
            "gauge",
            ("queue", "state"),
        )
        for index, pool in enumerate(pools):
            depth.add((pool, "waiting"), r.waiting[index])
            depth.add((pool, "processing"), r.processing[index])
            depth.add((pool, "parked"), r.parked[index])
        delayed = Family("llm_worker_delayed_jobs", "Jobs waiting to be retried, all queues", "gauge")
        delayed.add((), r.delayed)
        dead = Family("llm_worker_dead_letter_jobs", "Jobs in the dead-letter list", "gauge")
        dead.add((), r.dead_letter)
        trimmed = Family(
            "llm_worker_dead_letters_trimmed",
            "Oldest dead letters dropped to keep the list at QUEUE_REMOVE_ON_FAIL, all hosts together (a Redis "
            "counter: every host shows the same value, so take max, not sum)",
            "counter",
        )
        count = self.dead_letters_trimmed.read()
        if count is not None:
            trimmed.add((), count)
        return [depth, delayed, dead, trimmed]

    def _managed(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """The endpoints whose models the model manager keeps (Ollama's): their model series exist from the start."""
        provider = self.state.loads.provider.decode(errors="replace")
        return [e for e in endpoints if provider and e.provider == provider]

    def _health(self, endpoints: list[Endpoint]) -> list[Family]:
        header = self.state.header
        redis_up = Family("llm_worker_redis_up", "Whether Redis answered the supervisor's last ping", "gauge")
        redis_up.add((), float(header.redis_up))
        provider = Family(
            "llm_worker_provider_up", "Whether the provider answered its last health probe", "gauge", ("provider",)
        )
        rows = self.state.providers.rows
        for e in endpoints:
            if e.provider == "ollama" or rows[e.index].checked:
                provider.add_at(e, (e.provider,), float(rows[e.index].healthy))
        loaded = Family("llm_worker_models_loaded", "Models the provider has in memory", "gauge")
        held = Family(
            "llm_worker_model_memory_bytes",
            "Memory each loaded model holds: its VRAM, or its size when it "
            "runs on the CPU (as the model manager last read /api/ps)",
            "gauge",
            ("model",),
        )
        managed = self._managed(endpoints)
        for e in managed:
            block = self.state.loads.endpoints[e.index]
            loaded.add_at(e, (), block.loaded_count)
            for i in range(min(block.loaded_count, len(block.loaded_names))):
                name = block.loaded_names[i].value.decode(errors="replace")
                held.add_at(e, (model_label(name),), block.loaded_bytes[i])
        if not managed:
            loaded.add((), 0)
        state = Family(
            "llm_worker_breaker_state",
            "Circuit breaker per provider and model: 0 closed, 1 open, 2 half-open",
            "gauge",
            ("provider", "model"),
        )
        opened = Family(
            "llm_worker_breaker_opened", "Times each circuit breaker opened", "counter", ("provider", "model")
        )
        by_name = {e.name: e for e in endpoints}
        table = self.state.breakers
        for row in table.rows[: table.count]:
            name, _, model = row.key.decode(errors="replace").partition(":")
            endpoint = by_name.get(name)
            labels = (endpoint.provider if endpoint is not None else name, model)
            state.add_at(endpoint, labels, row.state)
            opened.add_at(endpoint, labels, row.opened_total)
        return [redis_up, provider, loaded, held, state, opened]

    def _backpressure(self, pools: list[str], endpoints: list[Endpoint]) -> list[Family]:
        """Paused pools, provider reachability and the host's calls in flight (see backpressure.py)."""
        paused = Family(
            "llm_worker_pool_paused",
            "Whether every live worker of the pool takes no jobs now, by reason (provider_down, breakers_open)",
            "gauge",
            ("pool", "reason"),
        )
        reasons: dict[int, set[int]] = {}
        live: dict[int, int] = {}
        for slot in self.state.slots:
            if slot.up():
                live[slot.pool] = live.get(slot.pool, 0) + 1
                reasons.setdefault(slot.pool, set()).add(slot.paused)
        for index, pool in enumerate(pools):
            why = reasons.get(index, {Pause.NONE})
            for reason in (Pause.PROVIDER_DOWN, Pause.BREAKERS_OPEN):
                paused.add((pool, reason.name.lower()), float(live.get(index, 0) > 0 and why == {reason}))
        reachable = Family(
            "llm_worker_provider_reachable",
            "Whether the workers can connect to each provider (0 while "
            "its connections are refused, until a probe answers)",
            "gauge",
            ("provider",),
        )
        outages = Family(
            "llm_worker_provider_outages", "Times the workers found each provider unreachable", "counter", ("provider",)
        )
        rows = Reachability(self.state.providers, self.state.lock).rows()
        for endpoint, row in zip(endpoints, rows):
            reachable.add_at(endpoint, (str(row["provider"]),), float(bool(row["up"])))
            outages.add_at(endpoint, (str(row["provider"]),), float(row["outages"]))  # type: ignore[arg-type]
        calls = Family(
            "llm_worker_provider_calls_in_flight", "Provider calls in flight from this host, all workers", "gauge"
        )
        calls.add((), in_flight(self.state).calling)
        each = Family(
            "llm_worker_endpoint_calls_in_flight",
            "Provider calls in flight from this host to each endpoint (a server a provider speaks to)",
            "gauge",
            ("provider", "endpoint"),
        )
        for e in endpoints:
            each.add((e.provider, e.url or e.name), in_flight(self.state, provider=e.index).provider)
        limit = Family(
            "llm_worker_provider_calls_limit",
            "MAX_CONCURRENT_REQUESTS: the most provider calls in flight at once",
            "gauge",
        )
        limit.add((), self.settings.worker.max_in_flight)
        return [paused, reachable, outages, calls, limit, each]

    def _rate_limits(self, labels: list[str]) -> list[Family]:
        """Calls rate limits stopped, waits on the host, and each budget's room (see host/ratelimit.py)."""
        limited = Family(
            "llm_worker_rate_limited",
            "Calls a rate limit stopped, each job then waiting in the delayed set: the provider's 429, or this "
            "host's budget with no time to wait for it",
            "counter",
            ("provider", "model"),
        )
        refusals = Family("llm_worker_rate_limit_refusals", "429 answers from each provider", "counter", ("provider",))
        waits = Family(
            "llm_worker_rate_limit_waits",
            "Calls that waited on the host for a budget or a provider's Retry-After",
            "counter",
            ("provider",),
        )
        waited = Family(
            "llm_worker_rate_limit_wait_seconds",
            "Time calls waited on the host for rate limits",
            "counter",
            ("provider",),
        )
        budget = Family(
            "llm_worker_rate_limit_per_minute",
            "RATE_LIMIT_RPM (kind calls) and RATE_LIMIT_TPM (kind tokens) of each provider",
            "gauge",
            ("provider", "kind"),
        )
        left = Family(
            "llm_worker_rate_limit_remaining",
            "Calls and tokens each provider's budget has left over the last minute",
            "gauge",
            ("provider", "kind"),
        )
        table = self.state.ratelimits
        for row in table.rows[: table.count]:
            provider = row.name.decode(errors="replace")
            for index, label in enumerate(labels):
                if row.models & (1 << index) or row.limited[index]:
                    limited.add((provider, label), row.limited[index])
        for status in rate_limits(self.state, self.settings):
            provider = str(status["provider"])
            refusals.add((provider,), status["providerRefusals"])
            waits.add((provider,), status["waits"])
            waited.add((provider,), status["waitSeconds"])
            for kind, per_minute, remaining in (
                ("calls", status["rpm"], status["callsLeft"]),
                ("tokens", status["tpm"], status["tokensLeft"]),
            ):
                if per_minute:
                    budget.add((provider, kind), per_minute)
                    left.add((provider, kind), remaining)
        return [limited, refusals, waits, waited, budget, left]

    def _model_lifecycle(self, labels: list[str], endpoints: list[Endpoint]) -> list[Family]:
        """The model manager's loads and unloads, per model label and endpoint (see models/manager.py)."""
        seconds = Family(
            "llm_worker_model_load_seconds", "How long the last load of each model took", "gauge", ("model",)
        )
        loads = Family("llm_worker_model_loads", "Models loaded by the model manager", "counter", ("model",))
        unloads = Family(
            "llm_worker_model_unloads",
            "Models unloaded by the model manager (idle, cache size, memory)",
            "counter",
            ("model",),
        )
        for e in self._managed(endpoints):
            rows = self.state.loads.endpoints[e.index].rows
            for index, label in enumerate(labels[: len(rows)]):
                row = rows[index]
                if index == 0 and not (row.loads or row.unloads):
                    continue  # "other" only once something was counted under it
                if row.loads:
                    seconds.add_at(e, (label,), row.seconds)
                loads.add_at(e, (label,), row.loads)
                unloads.add_at(e, (label,), row.unloads)
        loading = Family(
            "llm_worker_model_loading_seconds",
            "How long each load in progress has taken so far (the "
            "model manager loads for every job of the host; jobs wait for it)",
            "gauge",
            ("model", "reason"),
        )
        for load in LoadBoard(self.state.loads).in_progress(labels):
            endpoint = endpoints[load.endpoint] if load.endpoint < len(endpoints) else None
            loading.add_at(endpoint, (load.label, load.why), load.seconds)
        return [seconds, loads, unloads, loading]

    def _host(self) -> list[Family]:
        r = self.state.readings
        out = []
        for name, doc, kind, value in [
            ("llm_worker_host_cpu_ratio", "Host CPU in use, 0 to 1", "gauge", r.cpu_ratio),
            ("llm_worker_host_load1", "Host load average over one minute", "gauge", r.load1),
            ("llm_worker_host_memory_used_bytes", "Host memory in use", "gauge", r.memory_used_bytes),
            ("llm_worker_host_memory_total_bytes", "Host memory", "gauge", r.memory_total_bytes),
            ("llm_worker_host_disk_used_bytes", "Disk in use on the root file system", "gauge", r.disk_used_bytes),
            ("llm_worker_host_disk_total_bytes", "Disk size of the root file system", "gauge", r.disk_total_bytes),
            ("llm_worker_host_network_sent_bytes", "Bytes the host sent", "counter", r.network_sent_bytes),
            ("llm_worker_host_network_received_bytes", "Bytes the host received", "counter", r.network_received_bytes),
        ]:
            family = Family(name, doc, kind)
            if not math.isnan(value):
                family.add((), value)
            out.append(family)
        return out

    def _gpus(self) -> list[Family]:
        r = self.state.readings
        up = Family("llm_worker_gpu_collector_up", "Whether NVML could be read", "gauge")
        up.add((), float(r.gpu_collector_up))
        out = [up]
        for name, doc, attr, kind in [
            ("llm_worker_gpu_utilization_ratio", "GPU busy, 0 to 1", "utilization_ratio", "gauge"),
            ("llm_worker_gpu_memory_used_bytes", "GPU memory in use", "memory_used_bytes", "gauge"),
            ("llm_worker_gpu_memory_total_bytes", "GPU memory", "memory_total_bytes", "gauge"),
            ("llm_worker_gpu_temperature_celsius", "GPU temperature", "temperature_celsius", "gauge"),
            ("llm_worker_gpu_power_watts", "GPU power draw", "power_watts", "gauge"),
            ("llm_worker_gpu_energy_joules", "GPU energy used since the driver loaded", "energy_joules", "counter"),
            (
                "llm_worker_gpu_ollama_memory_bytes",
                "GPU memory held by Ollama's processes",
                "ollama_memory_bytes",
                "gauge",
            ),
        ]:
            family = Family(name, doc, kind, ("gpu", "uuid"))
            for gpu in r.gpus[: r.gpu_count]:
                value = getattr(gpu, attr)
                if not math.isnan(value):
                    family.add((str(gpu.index), gpu.uuid.decode(errors="replace")), value)
            out.append(family)
        return out
