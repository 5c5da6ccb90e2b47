"""Addresses as text: Redis's URL built from the settings, the sentinels'
host:port pairs, a provider's list of server URLs, and any URL made fit to
show, with its secrets masked.

Apart from config.py so that loading settings reads as loading settings; the
rules here are about URL syntax and what redis-py makes of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit


class RedisSection(Protocol):
    """What these functions read of the Redis settings (``settings.config.RedisSettings``)."""

    url: str
    host: str
    port: int
    username: str
    password: str
    db: int
    sentinels: list[str]
    sentinel_master: str


def resolve_redis_url(r: RedisSection) -> str:
    """The URL to connect to: REDIS_URL, or one built from the parts; credentials folded in."""
    user = quote(r.username, safe="")
    auth = f"{user}:{quote(r.password, safe='')}@" if r.password else (f"{user}@" if user else "")
    if not r.url:
        return f"redis://{auth}{r.host}:{r.port}/{r.db}"
    if not auth:
        return r.url
    parts = urlsplit(r.url)
    if parts.password or parts.username:
        return r.url  # the URL's own credentials win
    if parts.scheme == "unix":  # redis-py reads a socket URL's credentials from its query
        extra = [f"password={quote(r.password, safe='')}"] if r.password else []
        extra += [f"username={user}"] if user else []
        query = "&".join(filter(None, [parts.query, *extra]))
        # Built by hand: urlunsplit drops the '//' of an empty netloc, and redis-py
        # reads 'unix:/path' as no URL at all.
        return f"unix://{parts.netloc}{parts.path}?{query}" + (f"#{parts.fragment}" if parts.fragment else "")
    return urlunsplit(parts._replace(netloc=auth + parts.netloc))


def sentinel_addresses(r: RedisSection) -> list[tuple[str, int]]:
    """REDIS_SENTINELS as (host, port) pairs; ValueError for an entry that is not host:port."""
    out = []
    for item in r.sentinels:
        host, sep, port = item.strip().rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")  # an IPv6 address: [::1]:26379
        host = host[1:-1] if bracketed else host
        if (
            not sep
            or not host
            or any(c in host for c in "/@?#[] ")
            or (":" in host and not bracketed)
            or not port.isdigit()
            or not 1 <= int(port) <= 65535
        ):
            raise ValueError(item)
        out.append((host, int(port)))
    return out


def redis_location(r: RedisSection) -> str:
    """Where Redis is, for logs and messages, with no secret in it."""
    if r.sentinels:
        return f"Sentinel master {r.sentinel_master!r} via {','.join(r.sentinels)}"
    return mask_url(resolve_redis_url(r))


def mask_url(url: str, *, hide_user: bool = False) -> str:
    """Hide a URL's passwords, in its user info and in its query (``?password=``,
    which unix:// URLs use), even with characters that confuse URL parsers.

    ``hide_user`` hides a lone user name too: in an HTTP URL it is often a token.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    credentials, location = split_userinfo(rest)
    if credentials:
        user, colon, _ = credentials.partition(":")
        if colon or hide_user:
            rest = f"{user}:***@{location}" if colon and not hide_user else f"***@{location}"
    head, qsep, query = rest.partition("?")
    if qsep:
        query, hsep, fragment = query.partition("#")
        # redis-py percent-decodes option names as well as values (parse_qs).
        query = (
            "&".join(
                f"{item.partition('=')[0]}=***"
                if unquote_plus(item.partition("=")[0]).lower() in _QUERY_SECRETS
                else item
                for item in query.split("&")
            )
            + hsep
            + fragment
        )
    return f"{scheme}://{head}{qsep}{query}"


def split_userinfo(rest: str) -> tuple[str, str]:
    """A URL's text after '://' as (user info, the rest); user info is '' when there is none.

    Split at the last '@', as redis-py does, so that a password may hold a raw
    '@', '/' or '?' (the settings refuse the last two, showing them masked);
    but an '@' after a '/', '?' or '#' in the user name is the path's or query's
    (``unix:///s.sock?password=a@b``).
    """
    credentials, at, location = rest.rpartition("@")
    if not at or any(c in credentials.partition(":")[0] for c in "/?#"):
        return "", rest
    return credentials, location


# The query options of redis-py's URLs that hold a secret.
_QUERY_SECRETS = {"password", "ssl_password"}


def split_urls(text: str) -> list[str]:
    """A provider setting's URLs (OLLAMA_BASE_URL, OPENAI_BASE_URL): comma-separated, one per server, in order.

    Each without its trailing '/', as the providers send to it; empty text is no URL at all.
    """
    return [item.strip().rstrip("/") for item in text.split(",") if item.strip()]


def mask_host_list(items: Sequence[str]) -> str:
    """A host:port list for messages, with any user:password@ in an entry hidden."""
    return ",".join(f"***@{item.rpartition('@')[2]}" if "@" in item else item for item in items)
