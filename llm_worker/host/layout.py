"""Every structure of the host's shared memory, and nothing else: the one module the others agree on.

Like dramatiq's canteen.py, it depends on nothing in llm_worker, so that every
module that reads or writes the tables (shm.py maps them; stats, breakers,
backpressure, the load board and the processes use them) depends on it, one
way. The behaviour over each table lives with its owner: the counters' sums in
stats.py, transitions in breaker.py, the call gate in backpressure.py, loads
in loadboard.py; here are only the bytes, their sizes and their meaning.
"""

from __future__ import annotations

import bisect
import ctypes
import enum
import time

# ---- stats -----------------------------------------------------------------------------------------------

TYPES = ("chat", "generate", "embeddings", "batch")
OUTCOMES = ("completed", "failed", "retried")
MAX_MODELS = 24  # index 0 is "other": a bounded label set for Prometheus
# Seconds. LLM jobs run from milliseconds (embeddings) to minutes (long generations).
DURATION_BUCKETS = (0.05, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
# Seconds from enqueue to take: sub-millisecond when idle, minutes under a backlog.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.25, 1.0, 5.0, 30.0, 120.0, 600.0)

_T, _M, _O = len(TYPES), MAX_MODELS, len(OUTCOMES)
_DB = len(DURATION_BUCKETS) + 1  # the last is +Inf
_WB = len(WAIT_BUCKETS) + 1
TYPE_INDEX = {name: i for i, name in enumerate(TYPES)}
OUTCOME_INDEX = {name: i for i, name in enumerate(OUTCOMES)}

AFFINITY = ("parked", "hot", "cold", "overdue")  # a job parked; a parked job taken, and why (pick.lua)
_ARRAYS = (
    "affinity",
    "jobs",
    "duration_buckets",
    "duration_sum",
    "model_seconds",
    "wait_buckets",
    "prompt_tokens",
    "completion_tokens",
    "fallbacks",
    "cache_hits",
    "cache_misses",
)


class Counters(ctypes.Structure):
    """One worker's counts (or a pool's retired total). Flat arrays, indexed as noted."""

    _fields_ = [
        ("jobs", ctypes.c_uint64 * (_T * _M * _O)),  # [type][model][outcome]
        ("duration_buckets", ctypes.c_uint64 * (_T * _DB)),  # [type][bucket], not cumulative
        ("duration_sum", ctypes.c_double * _T),
        ("model_seconds", ctypes.c_double * _M),  # time spent per model (its count: the model's jobs)
        ("wait_buckets", ctypes.c_uint64 * _WB),
        ("wait_sum", ctypes.c_double),
        ("prompt_tokens", ctypes.c_uint64 * _M),
        ("completion_tokens", ctypes.c_uint64 * _M),
        ("fallbacks", ctypes.c_uint64 * _M),
        ("cache_hits", ctypes.c_uint64 * _M),
        ("cache_misses", ctypes.c_uint64 * _M),
        ("rejected", ctypes.c_uint64),  # payloads dead-lettered unrun: not a job, or an invalid one
        ("affinity", ctypes.c_uint64 * len(AFFINITY)),  # model affinity's moves, indexed as AFFINITY
    ]

    def record(
        self,
        job_type: str,
        model: int,
        outcome: str,
        duration: float,
        wait: float | None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        fallback: bool = False,
        cache_hit: bool = False,
        cache_lookup: bool = False,
    ) -> None:
        """Count one finished attempt of a job (by its worker, the block's only writer)."""
        t = TYPE_INDEX[job_type]
        self.jobs[(t * _M + model) * _O + OUTCOME_INDEX[outcome]] += 1
        self.duration_buckets[t * _DB + bisect.bisect_left(DURATION_BUCKETS, duration)] += 1
        self.duration_sum[t] += duration
        self.model_seconds[model] += duration
        if wait is not None:
            self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, wait)] += 1
            self.wait_sum += wait
        if prompt_tokens:
            self.prompt_tokens[model] += prompt_tokens
        if completion_tokens:
            self.completion_tokens[model] += completion_tokens
        if fallback:
            self.fallbacks[model] += 1
        if cache_hit:
            self.cache_hits[model] += 1
        elif cache_lookup:
            self.cache_misses[model] += 1

    def add_to(self, total: Counters) -> None:
        """Fold these counts into ``total`` (the supervisor retiring a dead worker's slot)."""
        for name in _ARRAYS:
            theirs = getattr(total, name)
            for i, value in enumerate(getattr(self, name)):
                if value:
                    theirs[i] += value
        total.wait_sum += self.wait_sum
        total.rejected += self.rejected

    def clear(self) -> None:
        ctypes.memset(ctypes.addressof(self), 0, ctypes.sizeof(self))


# ---- breaker ---------------------------------------------------------------------------------------------

MAX_ENDPOINTS = 8  # servers one provider setting may name (OLLAMA_BASE_URL, OPENAI_BASE_URL)
MAX_PROVIDERS = 24  # rows of the endpoint table (every provider's endpoints); catch-all breaker rows
MAX_BREAKERS = 64  # rows for models; full, the least recently used closed row is recycled
BUCKETS = 120  # one-second buckets; CIRCUIT_BREAKER_TIMEOUT is capped to this many seconds
KEY_BYTES = 160


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Forced(enum.IntEnum):
    NONE = 0
    OPEN = 1
    CLOSED = 2


class Row(ctypes.Structure):
    _fields_ = [
        ("key", ctypes.c_char * KEY_BYTES),  # "<endpoint>:<model>": "ollama:llama3.2", "ollama@2:llama3.2"
        ("state", ctypes.c_int32),
        ("forced", ctypes.c_int32),
        ("consecutive", ctypes.c_uint32),
        ("reopens", ctypes.c_uint32),  # re-opens since the last close, for the backoff
        ("open_until", ctypes.c_double),  # monotonic
        ("changed", ctypes.c_double),  # wall clock of the last transition
        ("lease_pid", ctypes.c_int32),
        ("lease_until", ctypes.c_double),  # monotonic
        ("opened_total", ctypes.c_uint64),
        ("failures_total", ctypes.c_uint64),
        ("calls_total", ctypes.c_uint64),
        ("bucket_second", ctypes.c_int64 * BUCKETS),
        ("bucket_calls", ctypes.c_uint32 * BUCKETS),
        ("bucket_failures", ctypes.c_uint32 * BUCKETS),
        ("used", ctypes.c_double),  # monotonic: the last call admitted, for recycling the least recently used
    ]


SHARED_KEY = "*"  # the model of an endpoint's catch-all row: "<endpoint>:*"


class Table(ctypes.Structure):
    """MAX_BREAKERS rows for models, then room for a catch-all row per endpoint (``<endpoint>:*``).

    A model gets its row once a call of it was answered with something other
    than a model error (an unknown model takes none). When every model row is
    in use and none is closed, a new model shares its endpoint's catch-all row.
    """

    _fields_ = [("count", ctypes.c_int32), ("rows", Row * (MAX_BREAKERS + MAX_PROVIDERS))]


# ---- backpressure ----------------------------------------------------------------------------------------


class Pause(enum.IntEnum):
    """Why a worker takes no jobs now (``Slot.paused``)."""

    NONE = 0
    PROVIDER_DOWN = 1
    BREAKERS_OPEN = 2


class Call(enum.IntEnum):
    """Where a worker stands with the call gate (``Slot.call``)."""

    NONE = 0
    WAITING = 1
    CALLING = 2
    ROUTED = 3  # sent to an endpoint, waiting for its model to load there (not yet at the gate)


ENDPOINT_NAME = 32
URL_BYTES = 200


class ProviderRow(ctypes.Structure):
    """One endpoint: a server a provider speaks to (the provider itself, when it speaks to one).

    Its index in the table is the endpoint's number in every process: slots name
    the endpoint of their call by it, and the load board keeps its rows under it.
    """

    _fields_ = [
        ("name", ctypes.c_char * ENDPOINT_NAME),  # "ollama", or "ollama@2" among several (breaker keys use it)
        ("down", ctypes.c_int32),
        ("since", ctypes.c_double),  # wall clock of the last change, for /status
        ("probed", ctypes.c_double),  # monotonic; the last probe's start, so one process probes at a time
        ("error", ctypes.c_char * 256),
        ("outages", ctypes.c_uint64),
        ("provider", ctypes.c_char * ENDPOINT_NAME),  # the provider it belongs to: "ollama"
        ("url", ctypes.c_char * URL_BYTES),  # where it is, for /status and the metrics' endpoint label
        ("checked", ctypes.c_double),  # monotonic: the sampler's last health probe of it (0: none yet)
        ("healthy", ctypes.c_int32),  # that probe's answer
        ("version", ctypes.c_char * 64),
        ("health_error", ctypes.c_char * 256),
    ]


class ProviderTable(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int32), ("rows", ProviderRow * MAX_PROVIDERS)]


# ---- rate limits -----------------------------------------------------------------------------------------

RATE_WINDOW = 60  # seconds: RATE_LIMIT_RPM and RATE_LIMIT_TPM are per minute
# One-second buckets, one more than the window: a minute that starts inside a second spans 61 of them.
RATE_BUCKETS = RATE_WINDOW + 1


class RateRow(ctypes.Structure):
    """One provider's calls and tokens over the last minute, and what rate limits did to its calls."""

    _fields_ = [
        ("name", ctypes.c_char * 32),
        ("bucket_second", ctypes.c_int64 * RATE_BUCKETS),  # int(monotonic) of what each bucket counts
        ("bucket_calls", ctypes.c_uint32 * RATE_BUCKETS),
        ("bucket_tokens", ctypes.c_int64 * RATE_BUCKETS),  # estimated when a call goes, settled when it ends
        ("hold_until", ctypes.c_double * MAX_MODELS),  # monotonic, per model label: the provider's Retry-After
        ("limited", ctypes.c_uint64 * MAX_MODELS),  # calls a rate limit stopped, per model label
        ("models", ctypes.c_uint32),  # bit i: model label i was called through this provider (metrics at zero)
        ("refusals", ctypes.c_uint64),  # the provider's own 429s
        ("waits", ctypes.c_uint64),  # calls that waited on the host for the budget or a hold
        ("wait_seconds", ctypes.c_double),
    ]


class RateTable(ctypes.Structure):
    _fields_ = [("count", ctypes.c_int32), ("rows", RateRow * MAX_PROVIDERS)]


# ---- loadboard -------------------------------------------------------------------------------------------

ERROR_BYTES = 200
MAX_LOADED = 16
NAME = 96  # a GPU's name and uuid
MODEL_NAME_BYTES = 256  # a model's name: settings and jobs allow 255 characters (MODEL_NAME), and its NUL


class LoadRow(ctypes.Structure):
    """One model label on one endpoint."""

    _fields_ = [
        ("resident", ctypes.c_int32),  # 1: loaded on the endpoint, as the manager last knew
        ("asked", ctypes.c_double),  # monotonic: a worker's latest request for a load
        ("started", ctypes.c_double),  # monotonic: the load in progress began (0: none)
        ("started_wall", ctypes.c_double),  # the same on the wall clock, for /status
        ("why", ctypes.c_int32),  # why the load in progress (or the last one) started
        ("done", ctypes.c_uint32),  # raised after every load attempt, ok or not
        ("failed", ctypes.c_int32),  # 1: the last attempt failed (error, kind, flags below)
        ("error_kind", ctypes.c_int32),  # index into ErrorKind
        ("crashed", ctypes.c_int32),
        ("retryable", ctypes.c_int32),
        ("failed_at", ctypes.c_double),  # monotonic
        ("error", ctypes.c_char * ERROR_BYTES),
        ("seconds", ctypes.c_double),  # the last successful load took
        ("last_used", ctypes.c_double),  # monotonic: a worker's last call of it here, for idle unloading
        ("slots", ctypes.c_int32),  # calls it serves at once here (OLLAMA_NUM_PARALLEL; 1 for embedding models)
        ("loads", ctypes.c_uint64),  # loads the manager saw here (its own and on demand)
        ("unloads", ctypes.c_uint64),  # unloads the manager made here
        ("draining", ctypes.c_int32),  # 1: to be unloaded for a load once idle; take no new jobs for it here
    ]


class EndpointLoads(ctypes.Structure):
    """One endpoint's models, as its model manager keeps them (written by the manager, but ``asked``)."""

    _fields_ = [
        ("cache_size", ctypes.c_int32),  # models the manager keeps loaded here; 0: it does not manage this endpoint
        ("loaded_count", ctypes.c_int32),  # what /api/ps listed at the last look
        ("loaded_names", (ctypes.c_char * MODEL_NAME_BYTES) * MAX_LOADED),
        ("loaded_vram", ctypes.c_double * MAX_LOADED),
        ("loaded_bytes", ctypes.c_double * MAX_LOADED),  # the memory each holds: its VRAM, else its size (CPU)
        ("rows", LoadRow * MAX_MODELS),  # by model label index
    ]


class Board(ctypes.Structure):
    _fields_ = [
        ("provider", ctypes.c_char * 32),  # the provider whose models the manager loads ("": none)
        ("manager_pid", ctypes.c_int32),  # the model manager that serves the board (0: none yet)
        ("endpoints", EndpointLoads * MAX_PROVIDERS),  # by endpoint index (ProviderTable)
    ]


# ---- shm -------------------------------------------------------------------------------------------------

MAX_POOLS = 16
MAX_GPUS = 16
POOL_NAME = 129  # a pool is a queue name: up to 128 characters (settings QUEUE_NAME), and its NUL


class SlotState(enum.IntEnum):
    EMPTY = 0  # no process: never used, or its worker was reaped
    BOOTING = 1  # forked, connecting to Redis and loading plugins
    IDLE = 2  # waiting on its queue
    BUSY = 3  # a job in hand
    DRAINING = 4  # told to stop; finishing the job in hand


class Phase(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    DRAINING = 2
    STOPPING = 3


JOB_ID_BYTES = 132


class Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int32),
        ("state", ctypes.c_int32),
        ("pool", ctypes.c_int32),  # index into the pool table
        ("generation", ctypes.c_uint32),  # raised on every spawn into this slot
        ("spawned", ctypes.c_double),
        ("heartbeat", ctypes.c_double),
        ("job_started", ctypes.c_double),
        ("job_deadline", ctypes.c_double),  # job_started + the job's timeout
        ("jobs_done", ctypes.c_uint64),
        ("job_id", ctypes.c_char * JOB_ID_BYTES),
        ("boot_error", ctypes.c_char * 256),  # why the last boot failed, for the supervisor's message
        ("rss_bytes", ctypes.c_double),  # written by the sampler
        ("cpu_seconds", ctypes.c_double),  # written by the sampler
        ("model", ctypes.c_int32),  # the model label of the job in hand, for the model manager
        ("paused", ctypes.c_int32),  # why the worker takes no jobs now (a backpressure.Pause), 0 when it does
        ("call", ctypes.c_int32),  # waiting for or in a provider call (a backpressure.Call)
        ("provider", ctypes.c_int32),  # the endpoint of that call (ProviderTable index), for its caps and slots
        ("paused_why", ctypes.c_char * 240),  # the pause's reason in words, for readiness and /status
        ("counters", Counters),
    ]

    def up(self) -> bool:
        """Whether a booted worker holds this slot, idle or busy: the one test of "a worker is up"."""
        return self.pid > 0 and self.state in (SlotState.IDLE, SlotState.BUSY)

    # ---- the worker's side -----------------------------------------------

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def begin(self, job_id: str, timeout: float) -> None:
        now = time.monotonic()
        self.job_id = job_id.encode()[: JOB_ID_BYTES - 1]
        self.job_started = now
        self.job_deadline = now + timeout
        self.heartbeat = now
        self.state = SlotState.BUSY

    def end(self, state: SlotState = SlotState.IDLE) -> None:
        self.job_started = 0.0
        self.job_deadline = 0.0
        self.job_id = b""
        self.jobs_done += 1
        self.heartbeat = time.monotonic()
        self.state = state

    # ---- the supervisor's side -------------------------------------------

    def claim(self, pid: int, pool: int) -> None:
        """Give this slot to a freshly forked worker."""
        self.pid = pid
        self.pool = pool
        self.generation += 1
        self.spawned = self.heartbeat = time.monotonic()
        self.job_started = self.job_deadline = 0.0
        self.job_id = b""
        self.boot_error = b""
        self.rss_bytes = self.cpu_seconds = 0.0
        self.model, self.paused, self.call = -1, 0, 0
        self.state = SlotState.BOOTING

    def release(self) -> None:
        self.pid = 0
        self.model, self.paused, self.call = -1, 0, 0
        self.state = SlotState.EMPTY
        self.job_started = self.job_deadline = 0.0
        self.job_id = b""


class Header(ctypes.Structure):
    _fields_ = [
        ("supervisor_pid", ctypes.c_int32),
        ("phase", ctypes.c_int32),
        ("slots", ctypes.c_int32),
        ("started", ctypes.c_double),  # wall clock, for uptime
        ("loop_beat", ctypes.c_double),  # the supervisor loop's last turn (monotonic)
        ("redis_up", ctypes.c_int32),
        ("redis_checked", ctypes.c_double),
        ("workers_wanted", ctypes.c_int32),  # sum of the pools' targets, for readiness
        ("http_bound", ctypes.c_int32),  # the HTTP process listens
        ("fold_seq", ctypes.c_uint64),  # odd while a dead worker's counts are being retired
        ("jobs_requeued", ctypes.c_uint64),  # handed back from dead workers' processing lists
        ("jobs_crash_dead_lettered", ctypes.c_uint64),  # dead-lettered for crashing workers
        ("worker_exits", ctypes.c_uint64 * MAX_POOLS),  # workers that died unasked, per pool
        ("pool_count", ctypes.c_int32),
        ("pools", (ctypes.c_char * POOL_NAME) * MAX_POOLS),  # a row whose pool went and no worker serves is reused
        ("pool_wanted", ctypes.c_int32 * MAX_POOLS),
        ("model_count", ctypes.c_int32),
        ("models", (ctypes.c_char * MODEL_NAME_BYTES) * MAX_MODELS),  # label of index i; index 0 is "other"
        ("pool_models", ctypes.c_uint32 * MAX_POOLS),  # bit i: the pool has called model label i (backpressure)
        ("models_ready", ctypes.c_int32),  # the model manager has preloaded what it should (readiness waits)
    ]


class GpuRow(ctypes.Structure):
    """One GPU as last sampled. NaN marks what the device does not report."""

    _fields_ = [
        ("index", ctypes.c_int32),
        ("uuid", ctypes.c_char * NAME),
        ("name", ctypes.c_char * NAME),
        ("utilization_ratio", ctypes.c_double),
        ("memory_used_bytes", ctypes.c_double),
        ("memory_total_bytes", ctypes.c_double),
        ("temperature_celsius", ctypes.c_double),
        ("power_watts", ctypes.c_double),
        ("energy_joules", ctypes.c_double),
        ("ollama_memory_bytes", ctypes.c_double),
    ]


class Readings(ctypes.Structure):
    """The host as the sampler in the HTTP process last saw it."""

    _fields_ = [
        ("sampled", ctypes.c_double),
        ("depths_checked", ctypes.c_double),
        ("waiting", ctypes.c_int64 * MAX_POOLS),
        ("processing", ctypes.c_int64 * MAX_POOLS),
        ("parked", ctypes.c_int64 * MAX_POOLS),  # jobs of each pool parked for a host holding their model
        ("delayed", ctypes.c_int64),
        ("dead_letter", ctypes.c_int64),
        ("gpu_collector_up", ctypes.c_int32),
        ("gpu_count", ctypes.c_int32),
        ("gpu_error", ctypes.c_char * 256),
        ("gpus", GpuRow * MAX_GPUS),
        ("cpu_ratio", ctypes.c_double),
        ("cpu_count", ctypes.c_int32),
        ("load1", ctypes.c_double),
        ("memory_used_bytes", ctypes.c_double),
        ("memory_total_bytes", ctypes.c_double),
        ("disk_used_bytes", ctypes.c_double),
        ("disk_total_bytes", ctypes.c_double),
        ("network_sent_bytes", ctypes.c_double),
        ("network_received_bytes", ctypes.c_double),
    ]
