"""Settings: one typed, read-only structure, filled from env, a TOML file and flags.

Every setting is declared once, in sections.py, as an annotated field of a
section struct: its type and range, its environment variable, its description
and its default. Everything else is derived from those declarations: the environment
parsing, the TOML keys (``[section] field = value``), the ``llm-worker run``
flags, the error messages, the masked print-out of ``check-config`` and the
settings table in the README (``llm-worker check-config --table``).

Precedence, low to high: defaults, environment, TOML file, flags.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct, field

from llm_worker.host.layout import MAX_ENDPOINTS, MAX_POOLS, MAX_PROVIDERS
from llm_worker.settings.sections import (
    LOAD_OPTION_TYPES,
    LOAD_OPTIONS,
    REMOVED_LOAD_OPTIONS,
    BreakerSettings,
    FallbackSettings,
    FilterSettings,
    HttpSettings,
    LimitSettings,
    LogSettings,
    ModelSettings,
    OllamaSettings,
    OpenAISettings,
    QueueSettings,
    RateLimitSettings,
    RedisSettings,
    WorkerSettings,
)
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
