"""Fuzzing the settings: whatever an operator writes, start-up either accepts it or says what is wrong.

Every value reaches ``config.load`` from the environment, a TOML file or a
flag. Only two outcomes are allowed: Settings, or a SettingError whose message
names the variable (or the TOML key, or --config), shows the value (a secret
masked) and says what is allowed, on one line. ``llm-worker check-config`` and
``llm-worker run`` turn that error into exit code 2 and one line on stderr,
never a traceback. The examples are derandomized, so CI sees the same ones;
LLM_WORKER_FUZZ_SCALE=10 runs ten times as many.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from datetime import date, datetime
from datetime import time as clock
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm_worker.cli import main as cli
from llm_worker.settings import config
from llm_worker.settings.config import SettingError

SCALE = float(os.environ.get("LLM_WORKER_FUZZ_SCALE", "1"))
DECLS = list(config.declarations())
ENV_NAMES = [d.env for d in DECLS]
BY_ENV = {d.env: d for d in DECLS}
SECRETS = {d.env for d in DECLS if d.secret}
SOURCES = {*ENV_NAMES, *(d.flag for d in DECLS), "--config"}  # where a value can come from


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Values an operator might write, or mistype: numbers out of every range, the wrong shapes of lists
# and pairs, URLs of the wrong kind, control characters, huge text.
TRICKY = st.sampled_from(
    [
        "",
        " ",
        "\t",
        "-1",
        "0",
        "1",
        "2",
        "1.5",
        "-0",
        "1e309",
        "-1e309",
        "nan",
        "inf",
        "0x10",
        "1_000",
        "9" * 400,
        "99999999999999999999",
        "true",
        "false",
        "yes",
        "off",
        "maybe",
        "TRUE ",
        "a=b",
        "a=1,a=2",
        "=1",
        "a=",
        ",,,",
        "a,b",
        "[1,2",
        '["x"]',
        "[]",
        "{}",
        "[{}]",
        "llm-chat=0",
        "llm-chat=-1",
        "llm-chat=2000",
        "llm-dead-letter=1",
        "redis://",
        "rediss://:@/",
        "unix://",
        "unix:///tmp/r.sock",
        "http://u:pw@h/0",
        "redis://h:99999/0",
        "redis://[::1/0",
        "redis://h/99",
        "::",
        "[::1]:0",
        "h:",
        ":1",
        "h:1,h",
        "(",
        "*",
        "[a-",
        "\\",
        "\x00",
        "\x1b[31m",
        "é",
        "\u2028",
        "num_ctx=abc",
        "num_ctx=8192,bogus=1",
        "debug",
        "WARN",
        "json",
        "xml",
        "exponential",
        "linear",
        "llama3.2",
        "llm:{x}",
        "a" * 5000,
    ]
)
VALUES = TRICKY | st.text(max_size=40) | st.integers(-(10**20), 10**20).map(str) | st.floats().map(repr)


def assert_explains(exc: SettingError, given: dict[str, str]) -> None:
    """One line that starts with where the value came from and says what is allowed."""
    message = str(exc)
    assert "\n" not in message and message.isprintable(), repr(message)
    assert exc.source in SOURCES or " in " in exc.source, exc.source  # a TOML key says `section.key in FILE`
    assert message.startswith(f"{exc.source}=") and ": expected " in message, message
    assert exc.allowed.strip(), message
    for name, secret in secrets_in(given).items():
        assert secret not in message, f"{name}'s secret shown in {message!r}"


def secrets_in(given: dict[str, str]) -> dict[str, str]:
    """The secret parts of these values that a message must not show: a URL's password, a whole token.

    Short ones are left out (they could be any word of a message), and so is
    one that another, non-secret value also holds.
    """
    found = {}
    for name in SECRETS & set(given):
        secret = given[name]
        if name == "REDIS_URL":  # a URL is shown, with its password masked
            credentials = secret.partition("://")[2].rpartition("@")[0]
            secret = credentials.partition(":")[2] if ":" in credentials else ""
        if len(secret) >= 8 and not any(secret in v for n, v in given.items() if n not in SECRETS):
            found[name] = secret
    return found


# ---- environment -------------------------------------------------------------------------------


@fuzz(600)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), VALUES, min_size=1, max_size=4))
@example({"WORKER_POOLS": "llm-chat=1,llm-chat=2"})
@example({"REDIS_SENTINELS": "[::1]:26379,h", "REDIS_SENTINEL_MASTER": "m"})
@example({"REDIS_SENTINEL_MASTER": "m"})
@example({"BLOCKED_PATTERNS": '["(", "a"]'})
@example({"MODEL_LOAD_OPTIONS": "num_ctx=99999999999999999999999"})
@example(
    {
        "ADMIN_TOKEN": "an admin token of length",
        "REDIS_PASSWORD": "s3cr3t-pass\n",
        "REDIS_URL": "http://u:s3cr3t-pass@h/0",
    }
)
def test_any_environment_loads_or_names_what_is_wrong(environ: dict[str, str]) -> None:
    try:
        config.load(environ)
    except SettingError as exc:
        assert_explains(exc, environ)


@pytest.mark.parametrize("decl", DECLS, ids=lambda d: d.env)
def test_every_setting_refuses_a_wrong_value_by_name(decl: config.Declaration) -> None:
    """For each setting, values of the wrong kind are refused naming it, or accepted; none escapes as another error."""
    refused = []
    for value in ["not a value of any kind !", "-1", "1e309", "a=b=c,=", "[1,", "\x00", "x" * 5000]:
        try:
            config.load({decl.env: value})
        except SettingError as exc:
            assert_explains(exc, {decl.env: value})
            refused.append(exc.source)
    # A setting that needs another names the one missing: REDIS_SENTINEL_MASTER wants REDIS_SENTINELS.
    allowed = {decl.env, "REDIS_URL", *PARTNERS.get(decl.env, ())}
    assert set(refused) <= allowed, (decl.env, refused)


PARTNERS = {"REDIS_SENTINEL_MASTER": ["REDIS_SENTINELS"], "REDIS_SENTINELS": ["REDIS_SENTINEL_MASTER"]}


# ---- TOML files ----------------------------------------------------------------------------------

TOML_SCALARS = (
    st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.text(max_size=30)
    | TRICKY
    | st.dates()
    | st.times()
    | st.datetimes()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.from_regex(r"\A[a-z_]{1,10}\Z"), inner, max_size=3),
    max_leaves=6,
)


def toml_value(value: Any) -> str:
    """A TOML literal of a value (JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, (int, datetime, date, clock)):
        return value.isoformat() if not isinstance(value, int) else str(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


KEYS = st.sampled_from([(d.section, d.name) for d in DECLS]) | st.tuples(
    st.sampled_from(sorted({d.section for d in DECLS}) + ["nosuch"]), st.from_regex(r"\A[a-z_]{1,12}\Z")
)


@fuzz(400)
@given(st.dictionaries(KEYS, TOML_VALUES, min_size=1, max_size=4))
def test_any_toml_file_loads_or_names_what_is_wrong(
    tmp_path_factory: pytest.TempPathFactory, table: dict[tuple[str, str], Any]
) -> None:
    sections: dict[str, list[str]] = {}
    for (section, key), value in table.items():
        sections.setdefault(section, []).append(f"{key} = {toml_value(value)}")
    text = "\n".join(f"[{section}]\n" + "\n".join(lines) for section, lines in sections.items()) + "\n"
    path = tmp_path_factory.mktemp("toml") / "llm-worker.toml"
    path.write_text(text)
    try:
        config.load({}, str(path))
    except SettingError as exc:
        assert_explains(exc, {})
        assert exc.source == "--config" or f" in {path}" in exc.source, exc.source


@fuzz(200)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"[worker\nconcurrency = 2")
@example(b"\xff\xfe[worker]")
@example(b"worker = 3")
@example(b"[worker]\nconcurrency = 1\nconcurrency = 2\n")
def test_a_file_that_is_not_toml_is_refused_as_such(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("toml") / "bad.toml"
    path.write_bytes(blob)
    try:
        config.load({}, str(path))
    except SettingError as exc:
        assert_explains(exc, {})


# ---- flags and the command line ----------------------------------------------------------------------


@fuzz(300)
@given(
    st.dictionaries(st.sampled_from(ENV_NAMES), VALUES, min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(ENV_NAMES), VALUES, max_size=3),
)
def test_flags_over_the_environment_load_or_name_what_is_wrong(flags: dict[str, str], environ: dict[str, str]) -> None:
    try:
        config.load(environ, None, flags)
    except SettingError as exc:
        assert_explains(exc, {**environ, **flags})
        if exc.source.startswith("--"):
            assert exc.source in {BY_ENV[name].flag for name in flags} | {"--config"}, exc.source


@fuzz(200)
@given(st.dictionaries(st.sampled_from(ENV_NAMES), VALUES.filter(lambda v: "\x00" not in v), min_size=1, max_size=3))
def test_check_config_exits_0_or_2_with_one_line(environ: dict[str, str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name in ENV_NAMES:
            mp.delenv(name, raising=False)
        for name, value in environ.items():
            mp.setenv(name, value)
        code = cli.main(["check-config"])
    lines = err.getvalue().splitlines()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("llm-worker: bad setting: "), lines
    else:
        assert code == 0 and lines == ["settings are valid"], (code, lines)
    for name, secret in secrets_in(environ).items():
        assert secret not in out.getvalue() + err.getvalue(), f"{name}'s secret shown"


@pytest.mark.parametrize("command", [["check-config"], ["run"]])
@pytest.mark.parametrize(
    "env",
    [
        {"WORKER_POOLS": "llm-chat=-1"},
        {"REDIS_URL": "http://user:hunter2hunter2@cache/0"},
        {"REDIS_SENTINELS": "10.0.0.1:26379,nonsense"},
        {"BLOCKED_PATTERNS": "(unclosed"},
        {
            "HEALTH_CHECK_PORT": "\u0661\u0662"
        },  # Arabic-Indic digits: int() takes them, a port setting must not crash on them
    ],
    ids=lambda e: ",".join(e),
)
def test_a_bad_setting_stops_the_real_command_with_exit_2_and_no_traceback(
    command: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "HEALTH_CHECK_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", *command],
        env={**base, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0 and command == ["check-config"]:
        return  # a value that turned out to be allowed
    assert done.returncode == 2, (done.returncode, done.stderr)
    (line,) = done.stderr.splitlines()
    name = next(iter(env))
    assert line.startswith(f"llm-worker: bad setting: {name}="), line
    assert "hunter2hunter2" not in line
