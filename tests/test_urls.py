"""Redis's URL built from the settings, and secrets masked in any URL shown (llm_worker.settings.urls).

Refusals of bad URLs at load time are in test_config.py; a job run over a
unix socket with a password, in test_security.py.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from llm_worker.settings import config
from llm_worker.settings.config import SettingError
from llm_worker.settings.urls import mask_url, redis_location


def load(**env: Any) -> config.Settings:
    return config.load({key: str(value) for key, value in env.items()}).settings


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({}, "redis://localhost:6379/0"),
        ({"REDIS_HOST": "cache.internal", "REDIS_PORT": "7000", "REDIS_DB": "3"}, "redis://cache.internal:7000/3"),
        ({"REDIS_PASSWORD": "p@ss/w:rd#1"}, "redis://:p%40ss%2Fw%3Ard%231@localhost:6379/0"),
        ({"REDIS_USERNAME": "app user", "REDIS_PASSWORD": "pw"}, "redis://app%20user:pw@localhost:6379/0"),
        ({"REDIS_URL": "rediss://cache:6380/1", "REDIS_PASSWORD": "p@ss"}, "rediss://:p%40ss@cache:6380/1"),
        (
            {"REDIS_URL": "redis://cache:6379/0", "REDIS_USERNAME": "app", "REDIS_PASSWORD": "pw"},
            "redis://app:pw@cache:6379/0",
        ),
        ({"REDIS_URL": "redis://cache:6379/0", "REDIS_USERNAME": "app"}, "redis://app@cache:6379/0"),
        (
            {"REDIS_URL": "redis://own:secret@cache:6379/0", "REDIS_USERNAME": "app", "REDIS_PASSWORD": "pw"},
            "redis://own:secret@cache:6379/0",
        ),
        ({"REDIS_URL": "redis://:secret@cache:6379/0", "REDIS_PASSWORD": "pw"}, "redis://:secret@cache:6379/0"),
        ({"REDIS_URL": "redis://cache:6379/2", "REDIS_HOST": "ignored", "REDIS_DB": "5"}, "redis://cache:6379/2"),
        ({"REDIS_URL": "unix:///run/redis.sock"}, "unix:///run/redis.sock"),
    ],
)
def test_redis_url_is_built_from_its_parts(environ: dict[str, str], url: str) -> None:
    assert config.load(environ).settings.redis_url == url


def test_a_quoted_password_comes_back_unchanged() -> None:
    password = "p@ss/w:rd #%?&="
    url = load(REDIS_USERNAME="app", REDIS_PASSWORD=password).redis_url
    parts = urlsplit(url)
    assert (unquote(parts.username or ""), unquote(parts.password or ""), parts.hostname) == (
        "app",
        password,
        "localhost",
    )


def test_a_unix_url_keeps_redis_password_where_redis_py_reads_it() -> None:
    # redis-py takes a socket URL's password from its query; the URL must stay unix://.
    # (A real connection over a socket is in test_security.py.)
    url = load(REDIS_URL="unix:///run/redis.sock?db=2", REDIS_USERNAME="app", REDIS_PASSWORD="p&w").redis_url
    assert url == "unix:///run/redis.sock?db=2&password=p%26w&username=app"
    from redis.connection import parse_url

    assert {k: v for k, v in parse_url(url).items() if k != "connection_class"} == {
        "path": "/run/redis.sock",
        "db": 2,
        "password": "p&w",
        "username": "app",
    }


def test_a_lone_username_is_used_without_redis_url() -> None:
    assert load(REDIS_USERNAME="app").redis_url == "redis://app@localhost:6379/0"


def test_a_password_built_into_the_url_is_masked() -> None:
    settings = config.load({"REDIS_PASSWORD": "p@ss-3c"}).settings
    assert "p@ss-3c" not in mask_url(settings.redis_url)
    assert "p%40ss-3c" not in mask_url(settings.redis_url)
    assert mask_url("redis://:a@b@cache/0") == "redis://:***@cache/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("unix:///run/redis.sock?password=s3cr3t", "unix:///run/redis.sock?password=***"),
        ("unix:///run/r.sock?db=1&PASSWORD=s3cr3t&username=app", "unix:///run/r.sock?db=1&PASSWORD=***&username=app"),
        (
            "rediss://cache:6380/0?ssl_password=s3cr3t&ssl_cert_reqs=none",
            "rediss://cache:6380/0?ssl_password=***&ssl_cert_reqs=none",
        ),
        ("redis://app:s3cr3t@cache:6379/0?password=s3cr3t", "redis://app:***@cache:6379/0?password=***"),
        ("redis://cache:6379/0?db=1", "redis://cache:6379/0?db=1"),
        ("unix:///run/r.sock?pass%77ord=s3cr3t", "unix:///run/r.sock?pass%77ord=***"),  # redis-py decodes names too
        ("unix:///run/r.sock?password=a@s3cr3t", "unix:///run/r.sock?password=***"),
        ("unix:///run/r.sock?password=a:b@s3cr3t", "unix:///run/r.sock?password=***"),
    ],
)
def test_a_password_in_the_query_is_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown
    assert redis_location(load(REDIS_URL=url).redis) == shown


@pytest.mark.parametrize(
    "url",
    [
        "redis://:abc/def@cache:6379/0",
        "redis://app:abc#def@cache:6379/0",
        "redis://app:pa?abc@cache:6379/0",
        "redis://:abc?x@cache/0",
        "redis://app:a/b?abc@cache:6379/0?password=abc",
    ],
)
def test_a_password_with_url_delimiters_is_never_shown(url: str) -> None:
    try:
        settings = config.load({"REDIS_URL": url}).settings
    except SettingError as error:
        assert "abc" not in str(error)
        return
    shown = dict((decl.env, value) for decl, value in config.effective(settings))
    assert "abc" not in shown["REDIS_URL"]
