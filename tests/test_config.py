"""Settings: declarations, precedence, error messages, derived views, masking, the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from llm_worker import exitcodes
from llm_worker.cli import flags
from llm_worker.cli import main as cli
from llm_worker.settings import config, sections
from llm_worker.settings.config import SettingError

DECLARATIONS = list(config.declarations())
BY_ENV = {decl.env: decl for decl in DECLARATIONS}


def load(**env: Any) -> config.Settings:
    """Settings from an explicit environment, so the real one never leaks in."""
    return config.load({key: str(value) for key, value in env.items()}).settings


def refused(
    environ: dict[str, str], config_file: Path | None = None, flags: dict[str, str] | None = None
) -> SettingError:
    with pytest.raises(SettingError) as caught:
        config.load(environ, str(config_file) if config_file else None, flags)
    return caught.value


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text)
    return path


def value_of(settings: config.Settings, env: str) -> Any:
    decl = BY_ENV[env]
    return getattr(getattr(settings, decl.section), decl.name)


# ---- declarations, walked ---------------------------------------------------------


TABLE = config.markdown_table()
PARSER = cli._parser()


@pytest.mark.parametrize("decl", DECLARATIONS, ids=lambda d: d.env)
def test_every_declaration_is_complete_and_its_default_valid(decl: config.Declaration) -> None:
    assert re.fullmatch(r"[A-Z][A-Z0-9_]+", decl.env)
    assert decl.doc.strip()
    assert decl.flag == "--" + decl.env.lower().replace("_", "-")
    assert decl.toml_key == f"{decl.section}.{decl.name}"
    assert value_of(config.Settings(), decl.env) == decl.default
    # The default, written the way a user would, loads back to the same settings.
    shown = config.show_value(decl, decl.default)
    assert config.load({decl.env: shown}).settings == config.Settings()
    assert f"| `{decl.env}` |" in TABLE


@pytest.mark.parametrize("decl", DECLARATIONS, ids=lambda d: d.env)
def test_every_declaration_has_a_command_line_flag(decl: config.Declaration) -> None:
    args = PARSER.parse_args(["check-config", decl.flag, "some-value"])
    assert flags.setting_flags(args) == {decl.env: "some-value"}


INT_RANGES = [d for d in DECLARATIONS if isinstance(d.info, msgspec.inspect.IntType) and d.info.le is not None]


@pytest.mark.parametrize("decl", [d for d in INT_RANGES if d.info.le >= 1_000_000], ids=lambda d: d.env)
def test_integer_bounds_are_described_exactly(decl: config.Declaration) -> None:
    assert f"an integer from {decl.info.ge} to {decl.info.le}" == config.describe(decl.info)


def test_small_integer_bounds_are_described_exactly() -> None:
    for decl in INT_RANGES:
        if decl.info.le < 1_000_000:
            assert config.describe(decl.info) == f"an integer from {decl.info.ge} to {decl.info.le}", decl.env


def test_names_flags_and_toml_keys_are_unique() -> None:
    for attribute in ("env", "flag", "toml_key"):
        names = [getattr(decl, attribute) for decl in DECLARATIONS]
        assert len(names) == len(set(names)), attribute


def test_load_with_no_environment_gives_the_defaults() -> None:
    loaded = config.load({})
    assert loaded.settings == config.Settings()
    assert dict(loaded.sources) == {}


def test_markdown_table_has_one_well_formed_row_per_declaration() -> None:
    lines = config.markdown_table().splitlines()
    assert lines[:2] == ["| Variable | Default | Allowed | Description |", "| --- | --- | --- | --- |"]
    rows = lines[2:]
    assert [row.split("`")[1] for row in rows] == [decl.env for decl in DECLARATIONS]
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)
        assert len(cells) == 6, row  # four cells between five unescaped pipes
    assert "| `WORKER_CONCURRENCY` | `5` | an integer from 1 to 256 |" in config.markdown_table()
    assert "| `WORKER_ID` | `hostname` |" in config.markdown_table()


# ---- precedence and sources ---------------------------------------------------------


def test_precedence_is_default_then_env_then_toml_then_flags(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[worker]\nconcurrency = 7\ntimeout = 2000\n\n[log]\nlevel = "error"\n')
    environ = {"WORKER_CONCURRENCY": "6", "WORKER_TIMEOUT": "1500", "WORKER_TIMEOUT_GRACE": "5", "LOG_LEVEL": "debug"}
    flags = {"WORKER_CONCURRENCY": "8", "LOG_FORMAT": "text"}

    loaded = config.load(environ, str(path), flags)

    s = loaded.settings
    assert (s.worker.concurrency, s.worker.timeout, s.worker.timeout_grace) == (8, 2000, 5)
    assert (s.log.level, s.log.format, s.worker.heartbeat_timeout) == ("error", "text", 15_000)
    assert dict(loaded.sources) == {
        "WORKER_CONCURRENCY": "--worker-concurrency",
        "WORKER_TIMEOUT": f"worker.timeout in {path}",
        "WORKER_TIMEOUT_GRACE": "WORKER_TIMEOUT_GRACE",
        "LOG_LEVEL": f"log.level in {path}",
        "LOG_FORMAT": "--log-format",
    }


def test_toml_values_of_every_shape(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        (
            '[worker]\nid = "gpu-1"\npools = {llm-chat = 3, llm-embeddings = 0}\n'
            '[models]\nallowed = ["llama3.2", "mistral:7b"]\n'
            "[http]\nmin_ready_workers = 0.25\n"
            '[log]\nprompts = true\nlevel = "DEBUG"\n'
            '[queue]\nmax_attempts = "4"\n'
        ),
    )
    s = config.load({}, str(path)).settings
    assert s.worker.id == "gpu-1"
    assert s.worker.pools == {"llm-chat": 3, "llm-embeddings": 0}
    assert s.models.allowed == ["llama3.2", "mistral:7b"]
    assert (s.http.min_ready_workers, s.log.prompts, s.log.level, s.queue.max_attempts) == (0.25, True, "debug", 4)


def test_a_value_from_env_is_parsed_from_text() -> None:
    s = load(
        WORKER_CONCURRENCY=" 12 ",
        READY_MIN_WORKERS="0.75",
        LOG_LEVEL="WARNING",
        LOG_PROMPTS="Yes",
        ALLOWED_MODELS=" llama3.2 , mistral:7b,, hf.co/u/r:Q4 ",
        QUEUE_BACKOFF_TYPE="Fixed",
    )
    assert s.worker.concurrency == 12
    assert s.http.min_ready_workers == 0.75
    assert (s.log.level, s.log.prompts, s.queue.backoff) == ("warning", True, "fixed")
    assert s.models.allowed == ["llama3.2", "mistral:7b", "hf.co/u/r:Q4"]
    assert load(ALLOWED_MODELS="").models.allowed == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(word, True) for word in ("yes", "on", "1", "true", "YES", "On", "TRUE", " true ")],
        *[(word, False) for word in ("no", "off", "0", "false", "NO", "Off", "FALSE", "")],
    ],
)
def test_boolean_words(text: str, expected: bool) -> None:
    assert load(LOG_PROMPTS=text).log.prompts is expected


# ---- bad values: the message names the source, the value and what is allowed --------

BAD_VALUES = [
    ("WORKER_CONCURRENCY", "0", "an integer from 1 to 256"),
    ("WORKER_CONCURRENCY", "257", "an integer from 1 to 256"),
    ("WORKER_CONCURRENCY", "abc", "an integer from 1 to 256"),
    ("WORKER_CONCURRENCY", "5.5", "an integer from 1 to 256"),
    ("WORKER_CONCURRENCY", "", "an integer from 1 to 256"),
    ("WORKER_TIMEOUT", "99", "an integer from 100 to "),
    ("REDIS_PORT", "0", "an integer from 1 to 65535"),
    ("REDIS_PORT", "65536", "an integer from 1 to 65535"),
    ("REDIS_DB", "16", "an integer from 0 to 15"),
    ("REDIS_DB", "-1", "an integer from 0 to 15"),
    ("HEALTH_CHECK_PORT", "http", "an integer from 0 to 65535"),
    ("READY_MIN_WORKERS", "1.5", "a number from 0 to 1"),
    ("READY_MIN_WORKERS", "-0.1", "a number from 0 to 1"),
    ("READY_MIN_WORKERS", "half", "a number from 0 to 1"),
    ("READY_MIN_WORKERS", "nan", "a number from 0 to 1"),
    ("LOG_PROMPTS", "maybe", "true or false"),
    ("LOG_PROMPTS", "2", "true or false"),
    ("LOG_PROMPTS", "y", "true or false"),
    ("LOG_LEVEL", "verbose", "one of debug, error, info, warn, warning"),
    ("LOG_FORMAT", "xml", "one of json, simple, text"),
    ("QUEUE_BACKOFF_TYPE", "linear", "one of exponential, fixed"),
    ("WORKER_ID", "-host", f"text matching `{sections.WORKER_ID}`"),
    ("WORKER_ID", "gpu host", f"text matching `{sections.WORKER_ID}`"),
    ("WORKER_ID", "h" * 65, f"text matching `{sections.WORKER_ID}`"),
    ("WORKER_ID", "", f"text matching `{sections.WORKER_ID}`"),
    ("QUEUE_CHAT_NAME", "my queue", f"text matching `{sections.QUEUE_NAME}`"),
    ("QUEUE_PRIORITY_NAME", "-urgent", f"text matching `{sections.QUEUE_NAME}`"),
    ("DEAD_LETTER_QUEUE_NAME", "q" * 129, f"text matching `{sections.QUEUE_NAME}`"),
    ("OLLAMA_BASE_URL", "localhost:11434", "text matching `^https?://"),
    ("OLLAMA_BASE_URL", "ftp://ollama:11434", "text matching `^https?://"),
    ("OLLAMA_BASE_URL", "http://", "text matching `^https?://"),
    ("REDIS_KEY_PREFIX", "", "text matching "),
    ("REDIS_HOST", "", "non-empty text"),
    ("WORKER_POOLS", "llm-chat=four", "comma-separated name=count pairs, each count from 0 to 256"),
    ("WORKER_POOLS", "llm-chat", "comma-separated name=count pairs"),
    ("WORKER_POOLS", "llm-chat=4,llm-embeddings", "comma-separated name=count pairs"),
    ("WORKER_POOLS", "=3", "comma-separated name=count pairs"),
    ("WORKER_POOLS", "llm-chat=-1", "each count from 0 to 256"),
    ("WORKER_POOLS", "llm-chat=257", "each count from 0 to 256"),
    ("WORKER_POOLS", "my queue=2", "names matching " + sections.QUEUE_NAME),
]


@pytest.mark.parametrize(("env", "value", "allowed"), BAD_VALUES, ids=[f"{e}={v[:12]!r}" for e, v, _ in BAD_VALUES])
def test_a_bad_env_value_is_refused_by_name(env: str, value: str, allowed: str) -> None:
    error = refused({env: value})
    assert (error.source, error.value) == (env, value)
    assert allowed in error.allowed
    assert str(error) == f"{env}={value!r}: expected {error.allowed}"


def test_a_bad_flag_is_refused_by_flag_name() -> None:
    error = refused({}, flags={"WORKER_CONCURRENCY": "0"})
    assert str(error) == "--worker-concurrency='0': expected an integer from 1 to 256"


def test_a_bad_toml_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[worker]\nconcurrency = 0\n")
    error = refused({}, path)
    assert error.source == f"worker.concurrency in {path}"
    assert str(error) == f"worker.concurrency in {path}='0': expected an integer from 1 to 256"


@pytest.mark.parametrize(
    ("toml", "allowed"),
    [
        ("[worker]\nconcurrency = true\n", "an integer from 1 to 256"),
        ("[worker]\nconcurrency = [1]\n", "an integer from 1 to 256"),
        ("[worker]\nid = 5\n", "text matching"),
        ('[models]\nallowed = ["llama3.2", 3]\n', "a comma-separated list"),
        ("[worker]\npools = {llm-chat = 300}\n", "each count from 0 to 256"),
        ('[log]\nlevel = "loud"\n', "one of debug, error, info"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_refused(tmp_path: Path, toml: str, allowed: str) -> None:
    path = write_toml(tmp_path, toml)
    error = refused({}, path)
    assert error.source.endswith(f" in {path}")
    assert allowed in str(error)


def test_an_unknown_toml_section_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[wokers]\nconcurrency = 4\n")
    message = str(refused({}, path))
    assert str(path) in message and "[wokers]" in message
    assert "one of the sections worker, redis, ollama, openai, queue, models, limits, http, log" in message


def test_an_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[worker]\nconcurency = 4\n")
    error = refused({}, path)
    assert error.source == f"worker.concurency in {path}"
    assert "a known setting" in str(error) and "check-config --table" in str(error)


def test_an_unreadable_toml_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    error = refused({}, missing)
    assert (error.source, error.value) == ("--config", str(missing))
    assert "a readable TOML file (No such file or directory)" in str(error)
    assert "a readable TOML file" in str(refused({}, tmp_path))  # a directory


def test_a_malformed_toml_file_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[worker\nconcurrency = 4\n")
    error = refused({}, path)
    assert (error.source, error.value) == ("--config", str(path))
    assert "valid TOML (" in str(error) and "line 1" in str(error)


def test_a_toml_section_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "worker = 5\n")
    error = refused({}, path)
    assert str(path) in str(error) and "worker" in str(error)


# ---- rules across settings ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "source", "value", "allowed"),
    [
        (
            {"DEAD_LETTER_QUEUE_NAME": "llm-chat"},
            "DEAD_LETTER_QUEUE_NAME",
            "llm-chat",
            "a list other than the job queues",
        ),
        (
            {"QUEUE_PRIORITY_NAME": "llm-dead-letter"},
            "DEAD_LETTER_QUEUE_NAME",
            "llm-dead-letter",
            "a list other than the job queues",
        ),
        (
            {"QUEUE_EMBEDDINGS_NAME": "llm-chat"},
            "QUEUE_CHAT_NAME",
            "llm-chat,llm-chat,llm-batch,llm-priority",
            "four different queue names",
        ),
        (
            {"WORKER_POOLS": "llm-chat=2,llm-dead-letter=1"},
            "WORKER_POOLS",
            {"llm-chat": 2, "llm-dead-letter": 1},
            "pools that do not serve the dead-letter list",
        ),
        (
            {"WORKER_POOLS": "llm-chat=0,llm-embeddings=0"},
            "WORKER_POOLS",
            {"llm-chat": 0, "llm-embeddings": 0},
            "at least one worker in all",
        ),
        (
            {"WORKER_POOLS": "a=256,b=256,c=256,d=256,e=1", "QUEUE_EXTRA_NAMES": "a,b,c,d,e"},
            "WORKER_POOLS",
            1025,
            "at most 1024 workers per host",
        ),
        (
            {"QUEUE_EXTRA_NAMES": "extra,llm-batch"},
            "QUEUE_EXTRA_NAMES",
            ["extra", "llm-batch"],
            "queues other than the four job queues and the dead-letter list",
        ),
        (
            {"QUEUE_EXTRA_NAMES": "llm-dead-letter"},
            "QUEUE_EXTRA_NAMES",
            ["llm-dead-letter"],
            "queues other than the four job queues and the dead-letter list",
        ),
        ({"QUEUE_EXTRA_NAMES": "x,x"}, "QUEUE_EXTRA_NAMES", ["x", "x"], "different queue names"),
        ({"QUEUE_DELAY": "5000", "QUEUE_MAX_DELAY": "1000"}, "QUEUE_MAX_DELAY", 1000, "at least QUEUE_DELAY (5000)"),
        ({"QUEUE_DELAY": "400000"}, "QUEUE_MAX_DELAY", 300_000, "at least QUEUE_DELAY (400000)"),
        (
            {"REDIS_URL": "http://cache:6379/0"},
            "REDIS_URL",
            "http://cache:6379/0",
            "a redis://, rediss:// or unix:// URL",
        ),
        ({"REDIS_URL": "cache:6379"}, "REDIS_URL", "cache:6379", "a redis://, rediss:// or unix:// URL"),
    ],
)
def test_rules_across_settings(environ: dict[str, str], source: str, value: Any, allowed: str) -> None:
    error = refused(environ)
    assert (error.source, error.value, error.allowed) == (source, value, allowed)


def test_a_cross_field_error_names_where_the_value_came_from(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[queue]\ndead_letter = "llm-batch"\n')
    assert refused({}, path).source == f"queue.dead_letter in {path}"
    assert refused({}, flags={"QUEUE_MAX_DELAY": "10"}).source == "--queue-max-delay"


def test_a_bad_redis_scheme_error_masks_the_password() -> None:
    error = refused({"REDIS_URL": "http://app:hunter2@cache:6379/0"})
    assert "hunter2" not in str(error)
    assert error.value == "http://app:***@cache:6379/0"


def test_an_unparseable_redis_url_is_a_setting_error() -> None:
    error = refused({"REDIS_URL": "redis://[::1"})
    assert error.source == "REDIS_URL"


# ---- derived views -------------------------------------------------------------------------


def test_pools_default_to_concurrency_for_chat_and_one_for_the_rest() -> None:
    assert load().pools == {"llm-chat": 5, "llm-embeddings": 1, "llm-batch": 1, "llm-priority": 1}
    assert list(load().pools) == ["llm-chat", "llm-embeddings", "llm-batch", "llm-priority"]
    assert load(WORKER_CONCURRENCY=3).pools["llm-chat"] == 3
    renamed = load(QUEUE_CHAT_NAME="c", QUEUE_EMBEDDINGS_NAME="e", QUEUE_BATCH_NAME="b", QUEUE_PRIORITY_NAME="p")
    assert renamed.pools == {"c": 5, "e": 1, "b": 1, "p": 1}


def test_worker_pools_replace_the_default_pools() -> None:
    s = load(WORKER_POOLS=" llm-chat = 4 , llm-embeddings=2 ", WORKER_CONCURRENCY=9)
    assert s.pools == {"llm-chat": 4, "llm-embeddings": 2}
    assert s.worker.pools == {"llm-chat": 4, "llm-embeddings": 2}
    assert load(WORKER_POOLS="llm-chat=0,custom-q=3", QUEUE_EXTRA_NAMES="custom-q").pools == {
        "llm-chat": 0,
        "custom-q": 3,
    }


KNOWN = (
    "QUEUE_CHAT_NAME=llm-chat, QUEUE_EMBEDDINGS_NAME=llm-embeddings, QUEUE_BATCH_NAME=llm-batch, "
    "QUEUE_PRIORITY_NAME=llm-priority"
)


def test_a_pool_of_a_queue_no_setting_names_is_refused_naming_the_known_queues() -> None:
    # A typo would leave the real chat queue without workers.
    error = refused({"WORKER_POOLS": "llm-chatt=2"})
    assert (error.source, error.value) == ("WORKER_POOLS", {"llm-chatt": 2})
    assert KNOWN in error.allowed and "llm-chatt is none of them" in error.allowed
    assert "QUEUE_EXTRA_NAMES" in error.allowed
    assert "WORKER_POOLS='{\"llm-chatt\":2}'" in str(error)
    # Renamed queues are the known ones; declared extras are known too, and named in the message.
    renamed = refused({"QUEUE_CHAT_NAME": "chat", "QUEUE_EXTRA_NAMES": "bulk", "WORKER_POOLS": "llm-chat=1"})
    assert "QUEUE_CHAT_NAME=chat," in renamed.allowed and "QUEUE_EXTRA_NAMES=bulk" in renamed.allowed
    assert load(QUEUE_CHAT_NAME="chat", WORKER_POOLS="chat=2").pools == {"chat": 2}
    assert load(QUEUE_EXTRA_NAMES="bulk,night", WORKER_POOLS="llm-chat=1,bulk=2").pools == {"llm-chat": 1, "bulk": 2}


def test_more_pools_than_the_shared_pool_table_holds_are_refused() -> None:
    names = [f"q{i}" for i in range(17)]
    extra = {"QUEUE_EXTRA_NAMES": ",".join(names)}
    error = refused({**extra, "WORKER_POOLS": ",".join(f"{n}=1" for n in names)})
    assert error.source == "WORKER_POOLS" and error.allowed == "at most 16 pools (the host's shared pool table)"
    assert len(load(**extra, WORKER_POOLS=",".join(f"{n}=1" for n in names[:16])).pools) == 16


# ---- secrets -----------------------------------------------------------------------------------

SECRETS = {"REDIS_PASSWORD": "pw-9f2c", "ADMIN_TOKEN": "tok-77aa", "REDIS_URL": "redis://app:url-5e1d@cache:6379/0"}


def test_effective_values_mask_every_secret() -> None:
    settings = config.load(SECRETS).settings
    shown = dict((decl.env, value) for decl, value in config.effective(settings))
    assert shown["REDIS_PASSWORD"] == "***"
    assert shown["ADMIN_TOKEN"] == "***"
    assert shown["REDIS_URL"] == "redis://app:***@cache:6379/0"
    text = "\n".join(shown.values())
    for secret in ("pw-9f2c", "tok-77aa", "url-5e1d"):
        assert secret not in text
    assert config.mask_url(settings.redis_url) == "redis://app:***@cache:6379/0"
    assert shown["WORKER_CONCURRENCY"] == "5" and shown["LOG_PROMPTS"] == "false"


def test_unset_secrets_show_as_empty_and_secret_flags_are_declared() -> None:
    shown = dict((decl.env, value) for decl, value in config.effective(config.Settings()))
    assert shown["REDIS_PASSWORD"] == shown["ADMIN_TOKEN"] == shown["REDIS_URL"] == ""
    assert {decl.env for decl in DECLARATIONS if decl.secret} == {
        "REDIS_URL",
        "REDIS_PASSWORD",
        "ADMIN_TOKEN",
        "OPENAI_API_KEY",
        "REDIS_SENTINEL_PASSWORD",
    }


@pytest.mark.parametrize(
    ("name", "toml"),
    [("REDIS_PASSWORD", '["s3cr3t"]'), ("ADMIN_TOKEN", "123456789"), ("OPENAI_API_KEY", '{ k = "s3cr3t" }')],
)
def test_a_secret_of_the_wrong_shape_is_refused_without_echoing_it(tmp_path: Path, name: str, toml: str) -> None:
    decl = next(d for d in DECLARATIONS if d.env == name)
    path = write_toml(tmp_path, f"[{decl.section}]\n{decl.name} = {toml}\n")
    error = refused({}, path)
    assert error.source == f"{decl.toml_key} in {path}" and error.value == "***"
    assert "s3cr3t" not in str(error) and "123456789" not in str(error)


def test_a_sentinel_entry_with_credentials_is_refused_without_echoing_them() -> None:
    error = refused({"REDIS_SENTINELS": "10.0.0.1:26379,admin:s3cr3t@10.0.0.2:26379", "REDIS_SENTINEL_MASTER": "m"})
    assert error.source == "REDIS_SENTINELS" and error.value == "10.0.0.1:26379,***@10.0.0.2:26379"
    assert "s3cr3t" not in str(error) and "REDIS_SENTINEL_PASSWORD" in error.allowed


@pytest.mark.parametrize("name", ["OLLAMA_BASE_URL", "OPENAI_BASE_URL"])
def test_credentials_in_a_provider_url_are_refused_not_dropped(name: str) -> None:
    # The HTTP client sends no user info: accepting it would fail later, and show it.
    error = refused({name: "https://bob:s3cr3t@llm.internal:8443/v1"})
    assert (error.source, error.value) == (name, "https://***@llm.internal:8443/v1")
    assert "s3cr3t" not in str(error) and "no user:password@" in error.allowed
    token = refused({name: "https://sk-s3cr3t@llm.internal/v1"})  # a lone user name there is often a key
    assert token.value == "https://***@llm.internal/v1"
    assert load(**{name: "https://llm.internal:8443/v1/@models"})  # an '@' past the host is a path
    assert load(**{name: "https://llm.internal?a@b"})


# ---- the command line, as a user runs it ------------------------------------------------------


def llm_worker(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `llm-worker ARGS` with only the given environment; kill its whole group if it hangs."""
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "LANG": "C.UTF-8", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_worker.cli", *args],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"llm-worker {' '.join(args)} did not exit within {timeout}s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_check_config_prints_effective_values_with_secrets_masked(tmp_path: Path) -> None:
    done = llm_worker(tmp_path, "check-config", "--log-level", "debug", env={**SECRETS, "WORKER_CONCURRENCY": "7"})
    assert done.returncode == exitcodes.OK, done.stderr
    assert "settings are valid" in done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert lines["WORKER_CONCURRENCY"].split() == ["WORKER_CONCURRENCY", "7", "(WORKER_CONCURRENCY)"]
    assert lines["LOG_LEVEL"].split() == ["LOG_LEVEL", "debug", "(--log-level)"]
    assert lines["WORKER_TIMEOUT"].split() == ["WORKER_TIMEOUT", "300000", "(default)"]
    assert lines["REDIS_PASSWORD"].split()[1] == lines["ADMIN_TOKEN"].split()[1] == "***"
    assert "redis://app:***@cache:6379/0" in lines["REDIS_URL"]
    for decl in DECLARATIONS:
        assert decl.env in lines
    for secret in ("pw-9f2c", "tok-77aa", "url-5e1d"):
        assert secret not in done.stdout + done.stderr


def test_check_config_reads_a_toml_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[worker]\nconcurrency = 11\n")
    done = llm_worker(tmp_path, "check-config", "--config", str(path))
    assert done.returncode == exitcodes.OK, done.stderr
    assert f"(worker.concurrency in {path})" in done.stdout


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["check-config"], {"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY='0': expected an integer from 1 to 256"),
        (
            ["check-config"],
            {"LOG_LEVEL": "loud"},
            "LOG_LEVEL='loud': expected one of debug, error, info, warn, warning",
        ),
        (["check-config", "--redis-port", "99999"], {}, "--redis-port='99999': expected an integer from 1 to 65535"),
        (["check-config", "--config", "missing.toml"], {}, "--config='missing.toml': expected a readable TOML file"),
        (["run"], {"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY='0': expected an integer from 1 to 256"),
        (["run", "--worker-concurrency", "0"], {}, "--worker-concurrency='0': expected an integer from 1 to 256"),
        (
            ["check-config"],
            {"DEAD_LETTER_QUEUE_NAME": "llm-chat"},
            "DEAD_LETTER_QUEUE_NAME='llm-chat': expected a list other than the job queues",
        ),
    ],
    ids=["check-env", "check-literal", "check-flag", "check-file", "run-env", "run-flag", "check-rule"],
)
def test_a_bad_setting_exits_2_with_a_message_and_no_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    # REDIS_URL points nowhere, so a run that wrongly starts fails fast instead of finding a Redis.
    done = llm_worker(tmp_path, *args, env={"REDIS_URL": "redis://127.0.0.1:1/0", **env}, timeout=30)
    assert done.returncode == exitcodes.USAGE, done.stdout + done.stderr
    assert done.stderr.startswith("llm-worker: bad setting: ") and expected in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_check_config_with_an_unparseable_redis_url_exits_2(tmp_path: Path) -> None:
    done = llm_worker(tmp_path, "check-config", env={"REDIS_URL": "redis://[::1"})
    assert done.returncode == exitcodes.USAGE
    assert "REDIS_URL" in done.stderr and "Traceback" not in done.stderr


def test_check_config_table_prints_the_markdown_table(tmp_path: Path) -> None:
    done = llm_worker(tmp_path, "check-config", "--table")
    assert done.returncode == exitcodes.OK, done.stderr
    assert done.stdout == config.markdown_table() + "\n"


# ---- load-time options, typed as Ollama types them (api/types.go, v0.33) ---------------------------


def test_load_options_take_booleans_and_integers_as_ollama_types_them() -> None:
    s = config.load(
        {
            "MODEL_LOAD_OPTIONS": "num_ctx=8192,use_mmap=false,num_gpu=-1",
            "EMBEDDING_LOAD_OPTIONS": "num_ctx=2048,num_batch=2048",
        }
    ).settings
    assert s.models.load_options == {"num_ctx": 8192, "use_mmap": False, "num_gpu": -1}
    assert s.models.embedding_load_options == {"num_ctx": 2048, "num_batch": 2048}


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("use_mmap=1", "use_mmap as true or false"),  # Ollama: option "use_mmap" must be of type boolean (500)
        ("num_ctx=1.5", "num_ctx as an integer"),
        ("num_ctx=true", "num_ctx as an integer"),
        ("low_vram=true", "no low_vram"),  # no longer in api.Runner
        ("numa=true", "no numa"),
        ("temperature=0.5", "load-time options among"),  # not a load option: a job's to set
    ],
)
def test_a_load_option_of_the_wrong_type_or_gone_from_ollama_stops_start_up(value: str, said: str) -> None:
    with pytest.raises(SettingError) as caught:
        config.load({"MODEL_LOAD_OPTIONS": value})
    assert caught.value.source == "MODEL_LOAD_OPTIONS" and said in str(caught.value)


def test_an_embedding_num_batch_below_its_num_ctx_is_refused_since_ollama_would_cut_inputs() -> None:
    for value in ("num_ctx=8192,num_batch=512", "num_batch=512"):
        with pytest.raises(SettingError) as caught:
            config.load({"EMBEDDING_LOAD_OPTIONS": value})
        assert caught.value.source == "EMBEDDING_LOAD_OPTIONS" and "num_batch of at least num_ctx" in str(caught.value)
