"""Every setting's declaration: a section struct per area, each field annotated with ``env()``.

A field's type and range, its environment variable, its description and its
default are the whole of a setting; config.py gathers the sections into
``Settings`` and derives the loading, the flags, the checks and the
print-outs from these declarations. Patterns and types shared by settings and
jobs (queue and model names, Ollama's load options) live here too.
"""

from __future__ import annotations

import re
import socket
from typing import Annotated, Any, Literal, Union

from msgspec import Meta, Struct, field

from llm_worker.host.layout import MAX_ENDPOINTS


def env(name: str, doc: str, *, secret: bool = False, **constraints: Any) -> Meta:
    """Declare a setting's environment variable, description and constraints."""
    return Meta(description=doc, extra={"env": name, "secret": secret}, **constraints)


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "llm-worker"
    return name[:64]


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
