"""Settings: one typed, read-only structure, filled from env, a TOML file and flags.

Every setting is declared once, below, as an annotated field of a section
struct: its type and range, its environment variable, its description and its
default. Everything else is derived from those declarations: the environment
parsing, the TOML keys (``[section] field = value``), the ``llm-worker run``
flags, the error messages, the masked print-out of ``check-config`` and the
settings table in the README (``llm-worker check-config --table``).

Precedence, low to high: defaults, environment, TOML file, flags.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta, Struct, field

from llm_worker.host.layout import MAX_ENDPOINTS, MAX_POOLS, MAX_PROVIDERS
from llm_worker.settings.urls import (
    mask_host_list,
    mask_url,
    resolve_redis_url,
    sentinel_addresses,
    split_urls,
    split_userinfo,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def env(name: str, doc: str, *, secret: bool = False, **constraints: Any) -> Meta:
    """Declare a setting's environment variable, description and constraints."""
    return Meta(description=doc, extra={"env": name, "secret": secret}, **constraints)


QUEUE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:{}-]{0,127}$"
WORKER_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,254}$"  # a model's name, in settings and in jobs
_URL = r"https?://[^\s/,]+(/[^\s,]*)?"
HTTP_URL = rf"^{_URL}$"
HTTP_URLS = rf"^{_URL}(\s*,\s*{_URL})*$"  # one server's URL, or several comma-separated (one per GPU)
MS = "milliseconds"
# Ollama's options that are fixed when a model loads (api.Runner in api/types.go, v0.33), with the
# JSON type Ollama's Options.FromMap insists on: a request that differs reloads the model, and
# one of the wrong type is refused with a 500 ("option \"use_mmap\" must be of type boolean").
LOAD_OPTION_TYPES: dict[str, type] = {
    "num_ctx": int,
    "num_batch": int,
    "num_gpu": int,
    "main_gpu": int,
    "use_mmap": bool,
    "num_thread": int,
    "draft_num_predict": int,
}
LOAD_OPTIONS = frozenset(LOAD_OPTION_TYPES)
# Load options older Ollama took and v0.33 no longer has: sent now, they are ignored with a warning.
REMOVED_LOAD_OPTIONS = {
    "low_vram": "not in Ollama's api.Runner any more (v0.33); Ollama sizes GPU layers itself",
    "numa": "not in Ollama's api.Runner any more (v0.33)",
    "f16_kv": "removed from Ollama's API; the KV cache type is OLLAMA_KV_CACHE_TYPE on the server",
    "vocab_only": "removed from Ollama's API",
    "use_mlock": "removed from Ollama's API (api.Runner)",
}
LoadValue = Union[bool, int, float]

# Settings of the service llm-worker replaces (../shared/reference/worker-service-spec.md) that it
# does not read, each with what does that job here. One set in the environment is named, with this,
# by `check-config` and at start-up ("not used by llm-worker: X; use Y"); the README lists them.
# Its QUEUE_REMOVE_ON_FAIL is honoured (the dead-letter list's bound), as are the settings below.
UNUSED_SETTINGS: dict[str, str] = {
    "QUEUE_REMOVE_ON_COMPLETE": "RESULT_TTL (results, done markers and streams expire; no list of "
    "completed jobs is kept to trim)",
    "ENABLE_STREAMING": "nothing: a job asks for streaming itself (`stream: true` in its request), and "
    "every worker can stream",
    "ENABLE_GPU_OPTIMIZATION": "MODEL_LOAD_OPTIONS (num_gpu, num_batch, ...) and MODEL_MEMORY_THRESHOLD; "
    "Ollama places layers on the GPU itself",
    "MEMORY_LIMIT": "the service manager's limit (systemd MemoryMax=, docker --memory); models are "
    "bounded by MODEL_MEMORY_THRESHOLD and MODEL_CACHE_SIZE",
    "GPU_MEMORY_LIMIT": "MODEL_MEMORY_THRESHOLD (the share of GPU memory past which idle models are "
    "unloaded) and MODEL_CACHE_SIZE",
    "METRICS_ENABLED": "nothing: /metrics is always served on HEALTH_CHECK_PORT (0 turns the HTTP "
    "process off; HEALTH_CHECK_HOST=127.0.0.1 keeps it to this host)",
    "ENABLE_PERFORMANCE_MONITORING": "nothing: it is always on; HOST_SAMPLE_INTERVAL sets how often the "
    "host, GPUs and queues are read",
    "PERFORMANCE_SAMPLE_RATE": "HOST_SAMPLE_INTERVAL (every job is counted; the host is read on an interval)",
    "REQUEST_QUEUE_SIZE": "MAX_CONCURRENT_REQUESTS (calls in flight); jobs wait in Redis, not in memory, "
    "and a worker takes one only when it can serve it",
    "MEMORY_CLEANUP_INTERVAL": "MODEL_MANAGER_INTERVAL (how often idle models are looked at and unloaded)",
    "ENABLE_DEAD_LETTER_QUEUE": "nothing: jobs that fail for good always go to DEAD_LETTER_QUEUE_NAME, "
    "bounded by QUEUE_REMOVE_ON_FAIL",
    "ERROR_RETRY_ATTEMPTS": "QUEUE_MAX_ATTEMPTS (attempts of a job) or OLLAMA_MAX_RETRIES (retries of one "
    "call within an attempt)",
    "ERROR_RETRY_DELAY": "QUEUE_DELAY (between attempts of a job) or OLLAMA_RETRY_DELAY (between retries of one call)",
    "ENABLE_ERROR_NOTIFICATIONS": "the events stream (llm.request.failed, llm.request.dead_lettered) or an "
    'event-sink plugin, and alerts on llm_worker_jobs_total{outcome="failed"}',
    "ENABLE_REQUEST_VALIDATION": "nothing: every job is always checked (MAX_JOB_BYTES, MAX_PROMPT_LENGTH "
    "and the other limits)",
}

# Keys and values of dict settings; the title names them in messages ("name=count pairs").
PoolCount = Annotated[int, Meta(ge=0, le=256, title="count")]
QueueKey = Annotated[str, Meta(pattern=QUEUE_NAME, title="name")]
LocalModel = Annotated[str, Meta(pattern=MODEL_NAME, title="model")]
RemoteModel = Annotated[str, Meta(pattern=r"^\S{1,256}$", title="remote")]
ProviderKey = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,30}$", title="provider")]
PerMinute = Annotated[int, Meta(ge=1, le=1_000_000_000, title="limit")]


# --------------------------------------------------------------------------
# Sections. Field names are the TOML keys; flags are the env names in kebab case.
# --------------------------------------------------------------------------


class WorkerSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: Annotated[
        str,
        env(
            "WORKER_ID",
            "This host's name in worker ids, heartbeats and results (default: the hostname). Must differ "
            "between hosts.",
            pattern=WORKER_ID,
        ),
    ] = field(default_factory=lambda: _hostname())
    concurrency: Annotated[int, env("WORKER_CONCURRENCY", "Chat workers when WORKER_POOLS is unset.", ge=1, le=256)] = 5
    pools: Annotated[
        dict[QueueKey, PoolCount],
        env(
            "WORKER_POOLS",
            "Worker processes per queue, `queue=count,...` (e.g. `llm-chat=4,llm-embeddings=2`). Unset: the "
            "chat queue gets WORKER_CONCURRENCY, every other queue 1.",
        ),
    ] = {}
    timeout: Annotated[
        int, env("WORKER_TIMEOUT", f"Default and maximum job timeout, in {MS}.", ge=100, le=86_400_000)
    ] = 300_000
    timeout_grace: Annotated[
        int,
        env(
            "WORKER_TIMEOUT_GRACE",
            f"How long past its job's timeout a worker may run before the supervisor kills it, in {MS}.",
            ge=0,
            le=3_600_000,
        ),
    ] = 10_000
    graceful_timeout: Annotated[
        int,
        env(
            "WORKER_GRACEFUL_TIMEOUT",
            f"On TERM, how long workers may finish the jobs in hand, in {MS}; what is still held then goes back "
            "to its queue.",
            ge=0,
            le=86_400_000,
        ),
    ] = 30_000
    heartbeat_timeout: Annotated[
        int,
        env(
            "WORKER_HEARTBEAT_TIMEOUT",
            "Expiry of a worker's heartbeat key in Redis (another host recovers its jobs after it) and the "
            f"longest an idle worker may go without a heartbeat, in {MS}.",
            ge=1_000,
            le=600_000,
        ),
    ] = 15_000
    max_crashes: Annotated[
        int,
        env(
            "JOB_MAX_CRASHES",
            "Dead-letter a job (errorType `crashed`) once it has been in hand of this many workers that died.",
            ge=1,
            le=100,
        ),
    ] = 3
    max_restarts: Annotated[
        int,
        env(
            "WORKER_BOOT_RETRIES",
            "A worker that fails to boot this many times in a row stops the supervisor.",
            ge=1,
            le=100,
        ),
    ] = 5
    max_in_flight: Annotated[
        int,
        env(
            "MAX_CONCURRENT_REQUESTS",
            "Most provider calls in flight at once from this host, all workers together; the priority pool's "
            "workers are let through first.",
            ge=1,
            le=10_000,
        ),
    ] = 10
    batching: Annotated[
        bool,
        env("ENABLE_BATCH_PROCESSING", "Embeddings workers gather jobs for the same model into one provider call."),
    ] = True
    batch_size: Annotated[
        int, env("WORKER_BATCH_SIZE", "Most embeddings jobs gathered into one call.", ge=1, le=1_000)
    ] = 10
    batch_timeout: Annotated[
        int,
        env(
            "BATCH_TIMEOUT",
            f"Longest an embeddings worker waits for more jobs after the first, in {MS} (the service this "
            "replaced waited 5000; a batch never waits while jobs are queued).",
            ge=0,
            le=60_000,
        ),
    ] = 20


class RedisSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[
        str,
        env(
            "REDIS_URL",
            "Redis to use: redis://, rediss:// (TLS) or unix://. When unset it is built from REDIS_HOST, "
            "REDIS_PORT, REDIS_PASSWORD and REDIS_DB.",
            secret=True,
        ),
    ] = ""
    host: Annotated[str, env("REDIS_HOST", "Redis host, when REDIS_URL is unset.", min_length=1)] = "localhost"
    port: Annotated[int, env("REDIS_PORT", "Redis port, when REDIS_URL is unset.", ge=1, le=65535)] = 6379
    username: Annotated[str, env("REDIS_USERNAME", "Redis ACL user, when the URL names none.")] = ""
    password: Annotated[str, env("REDIS_PASSWORD", "Redis password, when the URL carries none.", secret=True)] = ""
    db: Annotated[int, env("REDIS_DB", "Redis database number, when REDIS_URL is unset.", ge=0, le=15)] = 0
    key_prefix: Annotated[
        str,
        env(
            "REDIS_KEY_PREFIX",
            "Prefix of every internal key (results, processing lists, events).",
            pattern=r"^[A-Za-z0-9._:{}-]{1,32}$",
        ),
    ] = "llm:"
    socket_timeout: Annotated[
        int, env("REDIS_SOCKET_TIMEOUT", f"Timeout of a Redis call, in {MS}.", ge=100, le=60_000)
    ] = 5_000
    sentinels: Annotated[
        list[str],
        env(
            "REDIS_SENTINELS",
            "Redis Sentinels to ask for the master, `host:port,...` (e.g. "
            "`10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379`); with REDIS_SENTINEL_MASTER. Then REDIS_URL (or "
            "its parts) gives only the scheme (rediss: TLS to master and sentinels), credentials and database; "
            "its host and port are ignored. Empty: no Sentinel.",
        ),
    ] = []
    sentinel_master: Annotated[
        str,
        env(
            "REDIS_SENTINEL_MASTER",
            "Name of the master the sentinels monitor (`sentinel monitor NAME ...`), with REDIS_SENTINELS.",
            pattern=r"^\S{0,128}$",
        ),
    ] = ""
    sentinel_username: Annotated[
        str,
        env(
            "REDIS_SENTINEL_USERNAME",
            "ACL user for the sentinels themselves, when they require one (`sentinel sentinel-user`).",
        ),
    ] = ""
    sentinel_password: Annotated[
        str,
        env(
            "REDIS_SENTINEL_PASSWORD",
            "Password of the sentinels themselves, when they require one (`requirepass` in sentinel.conf); the "
            "master's comes from REDIS_URL or REDIS_PASSWORD.",
            secret=True,
        ),
    ] = ""


class OllamaSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    base_url: Annotated[
        str,
        env(
            "OLLAMA_BASE_URL",
            "Ollama's address; several, comma-separated, for several Ollama servers on this host (one per GPU, "
            f"at most {MAX_ENDPOINTS}): jobs go where their model is loaded, and one that is down is passed over.",
            pattern=HTTP_URLS,
        ),
    ] = "http://localhost:11434"
    timeout: Annotated[
        int,
        env(
            "OLLAMA_TIMEOUT",
            f"Longest wait for Ollama's next byte, in {MS} (a job's own timeout bounds the whole call).",
            ge=100,
            le=86_400_000,
        ),
    ] = 300_000
    connect_timeout: Annotated[
        int, env("OLLAMA_CONNECT_TIMEOUT", f"Timeout of a TCP connect to Ollama, in {MS}.", ge=50, le=60_000)
    ] = 5_000
    max_connections: Annotated[
        int, env("OLLAMA_MAX_CONNECTIONS", "Size of each process's HTTP connection pool to Ollama.", ge=1, le=1024)
    ] = 10
    max_retries: Annotated[
        int,
        env(
            "OLLAMA_MAX_RETRIES",
            "Retries of a call that failed before Ollama saw it (connect errors) or that Ollama answered busy "
            "(503), within one attempt.",
            ge=0,
            le=20,
        ),
    ] = 3
    retry_delay: Annotated[
        int,
        env("OLLAMA_RETRY_DELAY", f"Base delay between those retries, doubling each time, in {MS}.", ge=0, le=60_000),
    ] = 1_000
    health_check_interval: Annotated[
        int,
        env(
            "OLLAMA_HEALTH_CHECK_INTERVAL",
            f"How often the HTTP process probes Ollama (health, loaded models), in {MS}.",
            ge=500,
            le=3_600_000,
        ),
    ] = 30_000
    num_parallel: Annotated[
        int,
        env(
            "OLLAMA_NUM_PARALLEL",
            "Requests Ollama serves at once per loaded model (its own OLLAMA_NUM_PARALLEL, default 1; always 1 "
            "for embedding models): the host keeps each model's calls in flight at or under this, on each Ollama "
            "server, so none wait inside Ollama. Set it to what the Ollama servers are started with.",
            ge=1,
            le=256,
        ),
    ] = 1


class OpenAISettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    base_url: Annotated[
        str,
        env(
            "OPENAI_BASE_URL",
            "An OpenAI-compatible API, with its version path: `https://api.openai.com/v1`, vLLM's "
            "`http://localhost:8000/v1`, Ollama's own `http://localhost:11434/v1`; several, comma-separated, for "
            f"several servers of the same models (one vLLM or llama.cpp server per GPU, at most {MAX_ENDPOINTS}). "
            "Empty: the OpenAI provider is off.",
            pattern=rf"^({HTTP_URLS[1:-1]})?$",
        ),
    ] = ""
    api_key: Annotated[
        str, env("OPENAI_API_KEY", "Sent as `Authorization: Bearer <key>`; empty: no header.", secret=True)
    ] = ""
    model_prefix: Annotated[
        str,
        env(
            "OPENAI_MODEL_PREFIX",
            "Job models starting with this go to the OpenAI provider, without it (`openai:gpt-4o-mini` asks for "
            "`gpt-4o-mini`). Empty: every model does.",
            pattern=r"^([A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63})?$",
        ),
    ] = "openai:"
    model_map: Annotated[
        dict[LocalModel, RemoteModel],
        env(
            "OPENAI_MODEL_MAP",
            "Job models that go to the OpenAI provider under another name, `model=remote,...` (e.g. "
            "`llama3.2=gpt-4o-mini`), prefixed or not.",
        ),
    ] = {}
    timeout: Annotated[
        int,
        env(
            "OPENAI_TIMEOUT",
            f"Longest wait for the API's next byte, in {MS} (a job's own timeout bounds the whole call).",
            ge=100,
            le=86_400_000,
        ),
    ] = 120_000
    max_retries: Annotated[
        int,
        env(
            "OPENAI_MAX_RETRIES",
            "Retries of a call that failed before the API saw it (connect errors) or that it answered busy "
            "(503), within one attempt; a 429 is not retried in the call (see RATE_LIMIT_MAX_WAIT).",
            ge=0,
            le=20,
        ),
    ] = 2
    retry_delay: Annotated[
        int,
        env("OPENAI_RETRY_DELAY", f"Base delay between those retries, doubling each time, in {MS}.", ge=0, le=60_000),
    ] = 500
    organization: Annotated[
        str, env("OPENAI_ORGANIZATION", "Sent as the `OpenAI-Organization` header; empty: no header.")
    ] = ""
    max_concurrent: Annotated[
        int,
        env(
            "OPENAI_MAX_CONCURRENT",
            "Most calls in flight to the OpenAI-compatible server (to each, with several) from this host, all "
            "workers together: 1 for a server with one slot (llama.cpp's default; llama-cpp-python interrupts a "
            "running generation for a new request), N for N slots. 0: no limit but MAX_CONCURRENT_REQUESTS.",
            ge=0,
            le=10_000,
        ),
    ] = 0


class QueueSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    chat: Annotated[str, env("QUEUE_CHAT_NAME", "Queue of chat and generate jobs.", pattern=QUEUE_NAME)] = "llm-chat"
    embeddings: Annotated[str, env("QUEUE_EMBEDDINGS_NAME", "Queue of embeddings jobs.", pattern=QUEUE_NAME)] = (
        "llm-embeddings"
    )
    batch: Annotated[str, env("QUEUE_BATCH_NAME", "Queue of batch jobs.", pattern=QUEUE_NAME)] = "llm-batch"
    priority: Annotated[str, env("QUEUE_PRIORITY_NAME", "Queue of urgent jobs of any type.", pattern=QUEUE_NAME)] = (
        "llm-priority"
    )
    extra: Annotated[
        list[QueueKey],
        env(
            "QUEUE_EXTRA_NAMES",
            "Further queues a WORKER_POOLS entry may serve, comma-separated; WORKER_POOLS refuses any other name. "
            "A producer pushes to one by naming it (`queue` of the Python client, `submit --queue`). Their "
            "workers take jobs of any type, as the priority queue's do, but without its precedence at the "
            "provider, and embeddings jobs there are not gathered into shared calls.",
        ),
    ] = []
    dead_letter: Annotated[
        str, env("DEAD_LETTER_QUEUE_NAME", "List of jobs that failed for good, with the reason.", pattern=QUEUE_NAME)
    ] = "llm-dead-letter"
    remove_on_fail: Annotated[
        int,
        env(
            "QUEUE_REMOVE_ON_FAIL",
            "Dead letters kept, newest first: each push past this many trims the oldest, in the same script "
            "(counted in llm_worker_dead_letters_trimmed_total, logged at most once a minute). 0: unbounded, "
            "which under Redis's `noeviction` lets a flood of bad jobs fill Redis.",
            ge=0,
            le=100_000_000,
        ),
    ] = 10_000
    max_attempts: Annotated[
        int,
        env(
            "QUEUE_MAX_ATTEMPTS",
            "Attempts of a job, first included: the default and the cap of a job's `maxRetries` + 1.",
            ge=1,
            le=100,
        ),
    ] = 3
    delay: Annotated[int, env("QUEUE_DELAY", f"Base retry delay, in {MS}.", ge=0, le=3_600_000)] = 1_000
    backoff: Annotated[
        Literal["exponential", "fixed"],
        env(
            "QUEUE_BACKOFF_TYPE", "How the retry delay grows: doubling per retry, or fixed. Jitter is added either way."
        ),
    ] = "exponential"
    max_delay: Annotated[int, env("QUEUE_MAX_DELAY", f"Cap of the retry delay, in {MS}.", ge=0, le=86_400_000)] = (
        300_000
    )
    result_ttl: Annotated[
        int, env("RESULT_TTL", "How long results, done markers and streams are kept, in seconds.", ge=1, le=30 * 86_400)
    ] = 3_600
    block_timeout: Annotated[
        int,
        env(
            "QUEUE_BLOCK_TIMEOUT",
            f"How long an idle worker blocks on its queue before it looks up, in {MS}.",
            ge=100,
            le=10_000,
        ),
    ] = 1_000


class ModelSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    default_chat: Annotated[str, env("DEFAULT_CHAT_MODEL", "Model of chat and generate jobs that name none.")] = (
        "llama3.2"
    )
    default_embedding: Annotated[str, env("DEFAULT_EMBEDDING_MODEL", "Model of embeddings jobs that name none.")] = (
        "nomic-embed-text"
    )
    allowed: Annotated[
        list[str],
        env(
            "ALLOWED_MODELS",
            "Models jobs may ask for, comma-separated (`llama3.2` also allows `llama3.2:latest`). Empty: any model.",
        ),
    ] = []
    preload_enabled: Annotated[
        bool, env("MODEL_PRELOAD_ENABLED", "Load MODEL_PRELOAD_LIST at start, before the host reports ready.")
    ] = True
    preload: Annotated[
        list[str],
        env(
            "MODEL_PRELOAD_LIST",
            "Models to load at start, comma-separated (the service this replaced named llama2,mistral; empty "
            "here: name the models your host serves). With several Ollama servers each model is loaded on one, "
            "spread over them.",
        ),
    ] = []
    load_timeout: Annotated[
        int,
        env(
            "OLLAMA_MODEL_LOAD_TIMEOUT",
            f"Longest a model load (or a preload) may take, in {MS}. Ollama itself gives up on a load that "
            "stalls for 5 minutes (its OLLAMA_LOAD_TIMEOUT); a large model on a slow disk can take longer than "
            "that in all.",
            ge=1_000,
            le=3_600_000,
        ),
    ] = 600_000
    unload_timeout: Annotated[
        int,
        env(
            "MODEL_UNLOAD_TIMEOUT",
            f"Unload a model no job has used for this long, in {MS}; 0: never.",
            ge=0,
            le=86_400_000,
        ),
    ] = 300_000
    cache_size: Annotated[
        int,
        env(
            "MODEL_CACHE_SIZE",
            "Most models kept loaded on each Ollama server; past it, the least recently used idle one is "
            "unloaded. 0: what Ollama keeps by default (its OLLAMA_MAX_LOADED_MODELS: 3 per GPU as NVML counts "
            "them, the GPUs shared out among the servers; 3 without a GPU), so the manager chooses before Ollama "
            "must.",
            ge=0,
            le=64,
        ),
    ] = 0
    memory_threshold: Annotated[
        float,
        env(
            "MODEL_MEMORY_THRESHOLD",
            "Share of GPU memory (or host memory, without a GPU) past which idle models are unloaded, least "
            "recently used first; with several Ollama servers, of each one's equal share of it.",
            ge=0.05,
            le=1.0,
        ),
    ] = 0.8
    auto_pull: Annotated[
        bool, env("MODEL_AUTO_PULL", "Pull allowed and preloaded models that Ollama lacks, with progress in the log.")
    ] = False
    manage_interval: Annotated[
        int,
        env(
            "MODEL_MANAGER_INTERVAL",
            f"How often the model manager looks at what is loaded and unloads, in {MS}.",
            ge=200,
            le=600_000,
        ),
    ] = 5_000
    affinity: Annotated[
        bool,
        env(
            "MODEL_AFFINITY",
            "Model affinity across hosts: take first the jobs whose model this host has loaded, park the others "
            'for the hosts that hold theirs (README, "Model affinity"). false: first in, first out. Set it '
            "alike on every host of a queue.",
        ),
    ] = True
    affinity_max_wait: Annotated[
        int,
        env(
            "MODEL_AFFINITY_MAX_WAIT",
            f"Longest a job waits parked for a host that holds its model, in {MS}; then the first host with a "
            "free worker takes it, loading its model if it must.",
            ge=0,
            le=3_600_000,
        ),
    ] = 30_000
    load_options: Annotated[
        dict[str, LoadValue],
        env(
            "MODEL_LOAD_OPTIONS",
            "Load-time options sent with every request to chat and generate models, "
            "`num_ctx=8192,num_batch=512,use_mmap=false` (num_ctx, num_batch, num_gpu, main_gpu, num_thread, "
            "draft_num_predict: integers; use_mmap: true or false): jobs may not set their own, so Ollama never "
            "reloads a model because two jobs disagreed. Empty: Ollama's defaults.",
        ),
    ] = {}
    embedding_load_options: Annotated[
        dict[str, LoadValue],
        env(
            "EMBEDDING_LOAD_OPTIONS",
            "Load-time options of embedding models, as MODEL_LOAD_OPTIONS (which does not apply to them): "
            "Ollama cuts an embedding input to num_batch tokens, so a num_batch here must be at least the "
            "num_ctx here. Empty: Ollama's defaults.",
        ),
    ] = {}
    cache_ttl: Annotated[
        int,
        env(
            "RESPONSE_CACHE_TTL",
            "How long answers to deterministic requests (temperature 0, a seed, or embeddings) are kept in "
            "Redis for identical requests, in seconds; 0: no cache.",
            ge=0,
            le=30 * 86_400,
        ),
    ] = 3_600


class LimitSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    max_job_bytes: Annotated[
        int,
        env(
            "MAX_JOB_BYTES",
            "Largest job payload, in bytes, checked before it is decoded.",
            ge=1_024,
            le=256 * 1024 * 1024,
        ),
    ] = 1024 * 1024
    max_prompt_length: Annotated[
        int,
        env(
            "MAX_PROMPT_LENGTH",
            "Most characters of prompt text in one request (all messages, or prompt and system, or one "
            "embedding input).",
            ge=1,
            le=10_000_000,
        ),
    ] = 8_192
    max_messages: Annotated[int, env("MAX_MESSAGES", "Most messages in one chat request.", ge=1, le=100_000)] = 256
    max_embedding_inputs: Annotated[
        int, env("MAX_EMBEDDING_INPUTS", "Most inputs in one embeddings request.", ge=1, le=100_000)
    ] = 512
    max_batch_requests: Annotated[
        int, env("MAX_BATCH_REQUESTS", "Most requests in one batch job.", ge=1, le=10_000)
    ] = 64
    max_num_predict: Annotated[
        int, env("MAX_NUM_PREDICT", "Largest `num_predict` option a job may ask for.", ge=1, le=1_000_000)
    ] = 16_384
    max_num_ctx: Annotated[
        int, env("MAX_NUM_CTX", "Largest `num_ctx` option a job may ask for.", ge=1, le=10_000_000)
    ] = 131_072


class HttpSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    port: Annotated[
        int,
        env(
            "HEALTH_CHECK_PORT", "Port of health, readiness and metrics. 0 turns the HTTP process off.", ge=0, le=65535
        ),
    ] = 3008
    host: Annotated[
        str,
        env(
            "HEALTH_CHECK_HOST",
            "Address the HTTP process binds: every interface by default, as exporters do, so a Prometheus on "
            "another host can scrape it (the /admin routes stay off without ADMIN_TOKEN). `127.0.0.1` keeps it "
            "to this host.",
            min_length=1,
        ),
    ] = "0.0.0.0"  # deliberate: metrics and health are for other hosts to read
    admin_token: Annotated[
        str, env("ADMIN_TOKEN", "Bearer token of the /admin routes; unset turns them off.", secret=True)
    ] = ""
    min_ready_workers: Annotated[
        float,
        env(
            "READY_MIN_WORKERS", "Fraction of configured workers that must be alive for /health/ready.", ge=0.0, le=1.0
        ),
    ] = 0.5
    healthcheck_timeout: Annotated[
        float,
        env(
            "HEALTHCHECK_TIMEOUT",
            "Timeout of /health/ollama's live GET to Ollama, in seconds (as the service this replaced read it). "
            "Requests that arrive together share one probe, and Ollama is asked at most once a second.",
            ge=0.1,
            le=60.0,
        ),
    ] = 5.0
    sample_interval: Annotated[
        int,
        env(
            "HOST_SAMPLE_INTERVAL",
            f"How often the HTTP process reads queue depths, GPUs, the host and each worker's memory, in {MS}.",
            ge=200,
            le=600_000,
        ),
    ] = 5_000


class LogSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: Annotated[
        Literal["debug", "info", "warn", "warning", "error"], env("LOG_LEVEL", "Least severe level logged.")
    ] = "info"
    format: Annotated[
        Literal["json", "text", "simple"], env("LOG_FORMAT", "`json` lines, or `text` (`simple`) for a terminal.")
    ] = "json"
    prompts: Annotated[
        bool, env("LOG_PROMPTS", "Log prompt and completion text (never do this with user data you may not keep).")
    ] = False


class BreakerSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: Annotated[
        bool,
        env("ENABLE_CIRCUIT_BREAKER", "One circuit breaker per provider and model, shared by the host's processes."),
    ] = True
    threshold: Annotated[
        int, env("CIRCUIT_BREAKER_THRESHOLD", "Failures in a row that open a breaker.", ge=1, le=1_000)
    ] = 5
    window: Annotated[
        int,
        env(
            "CIRCUIT_BREAKER_TIMEOUT",
            f"The sliding window, in one-second buckets, over which the failure rate is counted, in {MS} (at "
            "most 120 s).",
            ge=1_000,
            le=120_000,
        ),
    ] = 60_000
    failure_rate: Annotated[
        float,
        env(
            "CIRCUIT_BREAKER_FAILURE_RATE", "Share of failed calls in the window that opens a breaker.", ge=0.01, le=1.0
        ),
    ] = 0.5
    min_calls: Annotated[
        int,
        env(
            "CIRCUIT_BREAKER_MIN_CALLS",
            "Calls in the window before the failure rate can open a breaker.",
            ge=1,
            le=100_000,
        ),
    ] = 20
    reset_timeout: Annotated[
        int,
        env(
            "CIRCUIT_BREAKER_RESET_TIMEOUT",
            f"How long a breaker stays open before one probe is let through, in {MS}; doubled (with jitter) on "
            "each re-open.",
            ge=100,
            le=86_400_000,
        ),
    ] = 300_000
    max_reset_timeout: Annotated[
        int, env("CIRCUIT_BREAKER_MAX_RESET_TIMEOUT", f"Cap of that doubling, in {MS}.", ge=100, le=86_400_000)
    ] = 1_800_000


class RateLimitSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rpm: Annotated[
        dict[ProviderKey, PerMinute],
        env(
            "RATE_LIMIT_RPM",
            "Most calls per minute to each provider from this host, all workers together, `provider=N,...` "
            "(e.g. `openai=500,anthropic=50`; providers by their name in /status). A call over it waits on "
            "the host while that leaves the job half its time, else the job waits in the delayed set as for "
            "the provider's own 429. Unset: no limit but the provider's.",
        ),
    ] = {}
    tpm: Annotated[
        dict[ProviderKey, PerMinute],
        env(
            "RATE_LIMIT_TPM",
            "Most tokens per minute to each provider from this host, as RATE_LIMIT_RPM: each call is counted "
            "before it goes at an estimate (prompt characters / 4, plus num_predict or 256), then at what the "
            "provider reports it used.",
        ),
    ] = {}
    max_wait: Annotated[
        int,
        env(
            "RATE_LIMIT_MAX_WAIT",
            f"Longest a job may wait in all for rate limits (the provider's 429s, this host's budgets) in the "
            f"delayed set, in {MS}: a job whose next wait would pass it fails with errorType `rate_limit`. 0: "
            "fail at the first.",
            ge=0,
            le=86_400_000,
        ),
    ] = 300_000


class FallbackSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    enabled: Annotated[
        bool,
        env("ENABLE_MODEL_FALLBACK", "Answer from FALLBACK_MODELS when a job's model fails or its breaker is open."),
    ] = True
    timeout_reserve: Annotated[
        float,
        env(
            "FALLBACK_TIMEOUT_RESERVE",
            "Share of a job's time kept back for the timeout fallback (a shorter answer): a model call may use "
            "the rest, so that a call that runs out of time still leaves time to ask again. 0: a call may use "
            "all of it, and the timeout fallback never fires.",
            ge=0.0,
            le=0.9,
        ),
    ] = 0.25
    models: Annotated[
        list[str],
        env(
            "FALLBACK_MODELS",
            "Models to fall back to, in order, comma-separated (the service this replaces named "
            "llama2,mistral,phi; empty here, since a model the host lacks only wastes an attempt).",
        ),
    ] = []


class FilterSettings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    content_filtering: Annotated[
        bool, env("ENABLE_CONTENT_FILTERING", "Refuse jobs whose prompt matches one of BLOCKED_PATTERNS.")
    ] = False
    blocked_patterns: Annotated[
        list[str],
        env(
            "BLOCKED_PATTERNS",
            "Regular expressions (Python syntax) a prompt must not match; comma-separated, or a JSON list when "
            "a pattern holds a comma.",
        ),
    ] = []
    max_response_length: Annotated[
        int,
        env(
            "MAX_RESPONSE_LENGTH",
            "Most characters of generated text in a result; longer answers are cut, with doneReason `length`.",
            ge=1,
            le=100_000_000,
        ),
    ] = 16_384
    audit_log_path: Annotated[
        str, env("AUDIT_LOG_PATH", "File to append an audit line (JSON) to for every job outcome; empty: no audit log.")
    ] = ""


class Settings(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    ollama: OllamaSettings = field(default_factory=OllamaSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    fallback: FallbackSettings = field(default_factory=FallbackSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)

    # ---- derived views, computed from the declarations above -------------

    @property
    def redis_url(self) -> str:
        """The URL to connect to, with REDIS_USERNAME/PASSWORD folded in."""
        return resolve_redis_url(self.redis)

    @property
    def pools(self) -> dict[str, int]:
        """Worker processes per queue name, in a stable order."""
        q = self.queue
        if self.worker.pools:
            return dict(self.worker.pools)
        return {q.chat: self.worker.concurrency, q.embeddings: 1, q.batch: 1, q.priority: 1}


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "llm-worker"
    return name[:64]


# --------------------------------------------------------------------------
# Declarations, walked.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration:
    """One setting, as declared: where it lives and how it is described."""

    section: str
    name: str
    env: str
    type: Any
    info: msgspec.inspect.Type
    doc: str
    secret: bool
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def toml_key(self) -> str:
        return f"{self.section}.{self.name}"


def declarations() -> Iterator[Declaration]:
    """Every setting, in declaration order."""
    for section in msgspec.structs.fields(Settings):
        yield from section_declarations(section.type, section.name)


def section_declarations(struct: type, section: str = "") -> Iterator[Declaration]:
    """The settings one section declares: a section of ``Settings``, or a plugin's own (``read_settings``)."""
    for f in msgspec.structs.fields(struct):
        meta = msgspec.inspect.type_info(f.type)
        assert isinstance(meta, msgspec.inspect.Metadata), f.name
        default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
        yield Declaration(
            section=section,
            name=f.name,
            env=meta.extra["env"],
            type=f.type,
            info=meta.type,
            doc=meta.extra_json_schema["description"],
            secret=meta.extra.get("secret", False),
            default=default,
        )


def describe(info: msgspec.inspect.Type) -> str:
    """Say in words which values a setting allows."""
    t = msgspec.inspect
    if isinstance(info, t.BoolType):
        return "true or false"
    if isinstance(info, (t.IntType, t.FloatType)):
        noun = "an integer" if isinstance(info, t.IntType) else "a number"
        return f"{noun} {_bounds(info)}".rstrip()
    if isinstance(info, t.LiteralType):
        return "one of " + ", ".join(str(v) for v in info.values)
    if isinstance(info, t.StrType):
        if info.pattern:
            return f"text matching `{info.pattern}`"
        return "non-empty text" if info.min_length else "text"
    if isinstance(info, t.ListType):
        return "a comma-separated list"
    if isinstance(info, t.DictType):
        return _describe_pairs(info.key_type, info.value_type)
    return str(info)


def _bounds(info: msgspec.inspect.IntType | msgspec.inspect.FloatType) -> str:
    lo, hi = info.ge, info.le
    show = str if isinstance(info, msgspec.inspect.IntType) else "{:g}".format  # exact integers, short floats
    if lo is not None and hi is not None:
        return f"from {show(lo)} to {show(hi)}"
    return f">= {show(lo)}" if lo is not None else ""


def _describe_pairs(key: msgspec.inspect.Type, value: msgspec.inspect.Type) -> str:
    """Say which `key=value` pairs a dict setting allows, naming each side by its title."""
    t = msgspec.inspect
    names = [
        part.extra_json_schema.get("title", default) if isinstance(part, t.Metadata) else default
        for part, default in ((key, "name"), (value, "value"))
    ]
    key, value = (part.type if isinstance(part, t.Metadata) else part for part in (key, value))
    text = f"comma-separated {names[0]}={names[1]} pairs"
    if isinstance(value, (t.IntType, t.FloatType)) and _bounds(value):
        text += f", each {names[1]} {_bounds(value)}"
    for name, part in zip(names, (key, value)):
        if isinstance(part, t.StrType) and part.pattern:
            text += f", {name}s matching {part.pattern}"
    return text


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------


class SettingError(ValueError):
    """A setting's value is not allowed; the message names where it came from."""

    def __init__(self, source: str, value: Any, allowed: str) -> None:
        self.source, self.value, self.allowed = source, value, allowed
        shown = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        super().__init__(f"{source}={shown!r}: expected {allowed}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _from_text(decl: Declaration, text: str) -> Any:
    """Turn the text of an env var or flag into the shape its type expects."""
    info = decl.info
    t = msgspec.inspect
    if isinstance(info, t.BoolType):
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError
    if isinstance(info, t.ListType):
        if text.lstrip().startswith("["):  # a JSON list, for items that hold commas
            return msgspec.json.decode(text.encode())
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(info, t.DictType):
        pairs: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or key.strip() in pairs:
                raise ValueError
            pairs[key.strip()] = value.strip()
        return pairs
    if isinstance(info, t.LiteralType):
        return text.strip().lower()
    return text.strip() if not isinstance(info, t.StrType) else text


def _convert(decl: Declaration, value: Any, source: str) -> Any:
    given = value
    try:
        if isinstance(value, str) and not isinstance(decl.info, msgspec.inspect.StrType):
            value = _from_text(decl, value)
        result = msgspec.convert(value, decl.type, strict=False)
    except (ValueError, msgspec.ValidationError, msgspec.DecodeError):
        # A secret is never echoed, whatever shape it came in (a TOML number, a list).
        shown = (show_value(decl, given) if isinstance(given, str) else "***") if decl.secret else given
        raise SettingError(source, shown, describe(decl.info)) from None
    return result


@dataclass(frozen=True)
class Loaded:
    """Settings and, for each one not at its default, where its value came from."""

    settings: Settings
    sources: Mapping[str, str]


def load(
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> Loaded:
    """Build the settings from env, then a TOML file, then flags (env names as keys).

    Raises SettingError naming the variable (or TOML key, or flag), the value
    and what is allowed.
    """
    environ = os.environ if environ is None else environ
    toml = _read_toml(config_file) if config_file else {}
    sections: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    section_names = [s.name for s in msgspec.structs.fields(Settings)]
    for section, table in toml.items():
        if section not in section_names:
            raise SettingError(f"[{section}] in {config_file}", "", "one of the sections " + ", ".join(section_names))
        if not isinstance(table, dict):
            raise SettingError(f"{section} in {config_file}", table, f"a table: [{section}] with settings under it")
    known_keys: set[str] = set()
    for decl in declarations():
        known_keys.add(decl.toml_key)
        candidates = [
            (decl.env, environ.get(decl.env)),
            (f"{decl.toml_key} in {config_file}", toml.get(decl.section, {}).get(decl.name)),
            (decl.flag, (flags or {}).get(decl.env)),
        ]
        # Only the value that wins is read: a flag may override a bad env value.
        for source, value in reversed(candidates):
            if value is not None:
                sections.setdefault(decl.section, {})[decl.name] = _convert(decl, value, source)
                sources[decl.env] = source
                break
    for section, table in toml.items():
        for key in table:
            if f"{section}.{key}" not in known_keys:
                raise SettingError(
                    f"{section}.{key} in {config_file}",
                    table[key],
                    "a known setting (see `llm-worker check-config --table`)",
                )
    settings = msgspec.convert(sections, Settings)
    _check_consistency(settings, sources)
    return Loaded(settings, sources)


SectionT = TypeVar("SectionT", bound=Struct)


def load_section(struct: type[SectionT], environ: Mapping[str, str] | None = None) -> SectionT:
    """Read one section of settings from the environment alone: how a plugin reads its own.

    ``struct`` declares its settings as ``Settings``' sections do (``env(...)``
    on each field, a default on each). Raises SettingError naming the
    variable, the value and what is allowed.
    """
    environ = os.environ if environ is None else environ
    values = {
        decl.name: _convert(decl, environ[decl.env], decl.env)
        for decl in section_declarations(struct)
        if decl.env in environ
    }
    return msgspec.convert(values, struct)


def unused_settings(environ: Mapping[str, str]) -> list[str]:
    """A line for each setting of the replaced service set in ``environ`` that llm-worker does not read."""
    return [
        f"not used by llm-worker: {name}; use {instead}" for name, instead in UNUSED_SETTINGS.items() if name in environ
    ]


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise SettingError("--config", path, f"a readable TOML file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError("--config", path, f"valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets the codec's error through
        raise SettingError("--config", path, f"a UTF-8 TOML file (byte {exc.start} is not UTF-8)") from None


def _check_consistency(s: Settings, sources: Mapping[str, str]) -> None:
    """Rules that involve more than one setting."""
    where = lambda name: sources.get(name, name)  # noqa: E731 - a tiny lookup
    for pattern in s.filters.blocked_patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SettingError(where("BLOCKED_PATTERNS"), pattern, f"a valid regular expression ({exc})") from None
    for name, options in (
        ("MODEL_LOAD_OPTIONS", s.models.load_options),
        ("EMBEDDING_LOAD_OPTIONS", s.models.embedding_load_options),
    ):
        _check_load_options(where(name), options)
    embedding = s.models.embedding_load_options
    if "num_batch" in embedding and embedding["num_batch"] < embedding.get("num_ctx", embedding["num_batch"] + 1):
        raise SettingError(
            where("EMBEDDING_LOAD_OPTIONS"),
            embedding,
            "a num_batch of at least num_ctx, both set: Ollama cuts "
            "each embedding input to num_batch tokens, and the job would not be told",
        )
    if s.breaker.max_reset_timeout < s.breaker.reset_timeout:
        raise SettingError(
            where("CIRCUIT_BREAKER_MAX_RESET_TIMEOUT"),
            s.breaker.max_reset_timeout,
            f"at least CIRCUIT_BREAKER_RESET_TIMEOUT ({s.breaker.reset_timeout})",
        )
    queues = [s.queue.chat, s.queue.embeddings, s.queue.batch, s.queue.priority]
    if s.queue.dead_letter in queues:
        raise SettingError(where("DEAD_LETTER_QUEUE_NAME"), s.queue.dead_letter, "a list other than the job queues")
    if len(set(queues)) != len(queues):
        raise SettingError(where("QUEUE_CHAT_NAME"), ",".join(queues), "four different queue names")
    if s.queue.dead_letter in s.queue.extra or set(queues) & set(s.queue.extra):
        raise SettingError(
            where("QUEUE_EXTRA_NAMES"), s.queue.extra, "queues other than the four job queues and the dead-letter list"
        )
    if len(set(s.queue.extra)) != len(s.queue.extra):
        raise SettingError(where("QUEUE_EXTRA_NAMES"), s.queue.extra, "different queue names")
    if s.worker.pools:
        if s.queue.dead_letter in s.worker.pools:
            raise SettingError(where("WORKER_POOLS"), s.worker.pools, "pools that do not serve the dead-letter list")
        unknown = [name for name in s.worker.pools if name not in queues and name not in s.queue.extra]
        if unknown:
            known = ", ".join(
                [
                    f"{env_name}={name}"
                    for env_name, name in zip(
                        ("QUEUE_CHAT_NAME", "QUEUE_EMBEDDINGS_NAME", "QUEUE_BATCH_NAME", "QUEUE_PRIORITY_NAME"), queues
                    )
                ]
                + [f"QUEUE_EXTRA_NAMES={','.join(s.queue.extra)}"] * bool(s.queue.extra)
            )
            raise SettingError(
                where("WORKER_POOLS"),
                s.worker.pools,
                f"pools of known queues ({known}); {', '.join(unknown)} is none of them: "
                "declare a further queue in QUEUE_EXTRA_NAMES",
            )
        if sum(s.worker.pools.values()) < 1:
            raise SettingError(where("WORKER_POOLS"), s.worker.pools, "at least one worker in all")
    if len(s.pools) > MAX_POOLS:
        raise SettingError(
            where("WORKER_POOLS"), s.worker.pools, f"at most {MAX_POOLS} pools (the host's shared pool table)"
        )
    total = sum(s.pools.values())
    if total > 1024:
        raise SettingError(where("WORKER_POOLS"), total, "at most 1024 workers per host")
    budgets = {**s.ratelimit.rpm, **s.ratelimit.tpm}
    if len(budgets) > MAX_PROVIDERS:
        raise SettingError(
            where("RATE_LIMIT_RPM"), ",".join(budgets), f"budgets for at most {MAX_PROVIDERS} providers in all"
        )
    if s.queue.max_delay < s.queue.delay:
        raise SettingError(where("QUEUE_MAX_DELAY"), s.queue.max_delay, f"at least QUEUE_DELAY ({s.queue.delay})")
    url = s.redis.url
    credentials = split_userinfo(url.partition("://")[2])[0]
    if any(c in credentials for c in "/?#"):
        raise SettingError(
            where("REDIS_URL"), mask_url(url), "credentials with '/', '?' and '#' percent-encoded (%2F, %3F, %23)"
        )
    try:
        parts = urlsplit(s.redis_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:  # its text may quote the password: say nothing of it
        raise SettingError(
            where("REDIS_URL"), mask_url(url), "a valid URL, as redis://[user:password@]host:port/db"
        ) from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingError(where("REDIS_URL"), mask_url(url), "a redis://, rediss:// or unix:// URL")
    _check_sentinels(s, sources)
    for name, base in (("OLLAMA_BASE_URL", s.ollama.base_url), ("OPENAI_BASE_URL", s.openai.base_url)):
        _check_server_urls(where(name), base)


def _check_server_urls(source: str, text: str) -> None:
    """A provider's server URLs: no credentials, each once, few enough for the host's endpoint table."""
    urls = split_urls(text)
    for url in urls:
        # The HTTP client sends no user info, so credentials there would be dropped
        # in silence, and shown wherever the URL is (check-config, /status).
        if "@" in urlsplit(url).netloc:
            raise SettingError(
                source,
                ",".join(mask_url(u, hide_user=True) for u in urls),
                "a URL with no user:password@ in it (llm-worker sends none; "
                "an OpenAI-compatible API's key goes in OPENAI_API_KEY)",
            )
    seen: set[str] = set()
    for url in urls:
        parts = urlsplit(url)
        same = parts._replace(scheme=parts.scheme.lower(), netloc=parts.netloc.lower()).geturl()
        if same in seen:  # two endpoints of one server would each count its slots, and overload it
            raise SettingError(source, text, f"different servers, each named once; {url} is named twice")
        seen.add(same)
    if len(urls) > MAX_ENDPOINTS:
        raise SettingError(
            source, text, f"at most {MAX_ENDPOINTS} comma-separated URLs (the host's shared endpoint table)"
        )


def _check_load_options(source: str, options: Mapping[str, Any]) -> None:
    """Each load option known to Ollama, of the type Ollama insists on (else it answers 500 on every call)."""
    for key, value in options.items():
        if key in REMOVED_LOAD_OPTIONS:
            raise SettingError(source, options, f"no {key}: {REMOVED_LOAD_OPTIONS[key]}")
        wanted = LOAD_OPTION_TYPES.get(key)
        if wanted is None:
            raise SettingError(source, options, "load-time options among " + ", ".join(sorted(LOAD_OPTIONS)))
        if type(value) is not wanted:
            noun = "true or false" if wanted is bool else "an integer"
            raise SettingError(
                source,
                options,
                f"{key} as {noun} (Ollama refuses the model with "
                f"'option \"{key}\" must be of type {'boolean' if wanted is bool else 'integer'}')",
            )


def _check_sentinels(s: Settings, sources: Mapping[str, str]) -> None:
    """REDIS_SENTINELS and REDIS_SENTINEL_MASTER come together, well formed, over TCP."""
    where = lambda name: sources.get(name, name)  # noqa: E731 - a tiny lookup
    r = s.redis
    if r.sentinel_master and not r.sentinels:
        raise SettingError(
            where("REDIS_SENTINELS"),
            "",
            f"the sentinels' host:port list, since REDIS_SENTINEL_MASTER is set ({r.sentinel_master!r})",
        )
    if not r.sentinels:
        return
    try:
        sentinel_addresses(r)
    except ValueError as exc:
        raise SettingError(
            where("REDIS_SENTINELS"),
            mask_host_list(r.sentinels),
            "comma-separated host:port pairs, each port from 1 "
            "to 65535 (e.g. `10.0.0.1:26379,10.0.0.2:26379`; the sentinels' password goes in "
            "REDIS_SENTINEL_PASSWORD); "
            f"{mask_host_list([exc.args[0]])!r} is not one",
        ) from None
    if not r.sentinel_master:
        raise SettingError(
            where("REDIS_SENTINEL_MASTER"),
            "",
            "the name of the master the sentinels monitor, since REDIS_SENTINELS is set",
        )
    if urlsplit(s.redis_url).scheme == "unix":
        raise SettingError(
            where("REDIS_URL"),
            mask_url(r.url),
            "a redis:// or rediss:// URL, since REDIS_SENTINELS is set (sentinels name TCP addresses)",
        )


# --------------------------------------------------------------------------
# Showing.
# --------------------------------------------------------------------------


def effective(settings: Settings) -> list[tuple[Declaration, str]]:
    """Every setting with its effective value as text, secrets masked."""
    rows = []
    for decl in declarations():
        value = getattr(getattr(settings, decl.section), decl.name)
        rows.append((decl, show_value(decl, value)))
    return rows


def effective_section(section: Struct) -> list[tuple[Declaration, str]]:
    """One section's settings (a plugin's, as ``load_section`` read them) with their values, secrets masked."""
    return [(decl, show_value(decl, getattr(section, decl.name))) for decl in section_declarations(type(section))]


def show_value(decl: Declaration, value: Any) -> str:
    if decl.secret and value:
        return mask_url(value) if decl.env == "REDIS_URL" else "***"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def markdown_table(sections: Iterable[type] | None = None) -> str:
    """The README's settings table, generated from the declarations (of ``sections`` when given: plugins')."""
    lines = ["| Variable | Default | Allowed | Description |", "| --- | --- | --- | --- |"]
    found = declarations() if sections is None else (d for s in sections for d in section_declarations(s))
    for decl in found:
        default = "hostname" if decl.env == "WORKER_ID" else show_value(decl, decl.default)
        allowed = describe(decl.info).replace("|", "\\|")
        lines.append(
            f"| `{decl.env}` | `{default}` | {allowed} | {decl.doc} |"
            if default
            else f"| `{decl.env}` | | {allowed} | {decl.doc} |"
        )
    return "\n".join(lines)
