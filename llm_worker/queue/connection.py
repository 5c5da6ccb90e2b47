"""Connecting to Redis, and what the service refuses of the Redis it finds.

``connect`` gives a client that never retries behind its caller's back
(plain, TLS, unix socket, or the master REDIS_SENTINELS name, followed across
failovers); ``waiting_helps`` says which errors pass once Redis is back;
``refuse_cluster`` and ``refuse_old_redis`` stop a start-up on a Redis the
queue's scripts cannot run on. The queue's operations are reliable.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import MasterDownError, ReadOnlyError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from llm_worker.settings.config import Settings
from llm_worker.settings.urls import sentinel_addresses

MASTER_CHECK = 1.0  # seconds between asking the sentinels where the master is
SENTINEL_TIMEOUT = 1.0  # sentinels answer from memory: a slow one is skipped, not waited on


def connect(
    settings: Settings, *, timeout: float | None = None, on_connect: Callable[[], None] | None = None
) -> redis.Redis:
    """A Redis client that never retries behind our back: callers own retry policy.

    redis-py's own retries would re-run a BLMOVE or a finish script whose reply
    was lost; our loops reconnect with backoff and reconcile instead. With
    REDIS_SENTINELS the client asks the sentinels where the master is (see
    sentinel_master). ``on_connect`` is called after every connection the
    client opens: a second one means the first was lost, maybe to a failover.
    """
    socket_timeout = timeout if timeout is not None else settings.redis.socket_timeout / 1000.0
    options: dict[str, Any] = dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 5.0),
        retry=Retry(NoBackoff(), 0),
        client_name="llm-worker",
    )
    if urlsplit(settings.redis_url).scheme != "unix":  # (sentinels are TCP: settings refuse unix:// with them)
        options["socket_keepalive"] = True  # TCP only: redis-py's socket connections refuse the option
    if on_connect is not None:

        def connected(conn: Any) -> None:
            conn.on_connect()  # what redis-py does when no redis_connect_func is given
            on_connect()

        options["redis_connect_func"] = connected
    if settings.redis.sentinels:
        return sentinel_master(settings, options)
    return redis.Redis.from_url(settings.redis_url, **options)


def sentinel_master(settings: Settings, options: dict[str, Any]) -> redis.Redis:
    """A client of the master that REDIS_SENTINELS name, with REDIS_URL's credentials, database and TLS."""
    r = settings.redis
    from_url = parse_url(settings.redis_url)
    for where in ("host", "port", "path", "connection_class"):  # the sentinels say where; rediss: says TLS
        from_url.pop(where, None)
    tls = urlsplit(settings.redis_url).scheme == "rediss"
    tls_options = {k: v for k, v in from_url.items() if k.startswith("ssl_")}
    sentinel_timeout = min(options["socket_timeout"], SENTINEL_TIMEOUT)
    sentinel_options: dict[str, Any] = dict(
        socket_timeout=sentinel_timeout,
        socket_connect_timeout=sentinel_timeout,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
        client_name="llm-worker",
        ssl=tls,
        **tls_options,
    )
    if r.sentinel_password:
        sentinel_options.update(username=r.sentinel_username or None, password=r.sentinel_password)
    elif r.sentinel_username:
        sentinel_options.update(username=r.sentinel_username)
    sentinel = Sentinel(sentinel_addresses(r), sentinel_kwargs=sentinel_options)
    return sentinel.master_for(
        r.sentinel_master, connection_pool_class=FollowingPool, **{**from_url, **options, "ssl": tls}
    )


class FollowingPool(SentinelConnectionPool):
    """A master's connection pool that asks the sentinels where the master is, at most once a second.

    redis-py asks only when it opens a connection. After a planned failover
    (SENTINEL FAILOVER) the old master stays writable until Sentinel demotes
    it, seconds later; a process still connected to it would go on writing
    what the demotion throws away. Asking as connections are handed out
    closes idle connections to a former master, so the next call goes to the
    new one. Sentinels that cannot answer leave the connection we have alone.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asked = 0.0

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._asked >= MASTER_CHECK:
            self._asked = now
            try:
                self.get_master_address()  # disconnects idle connections when the master moved
            except redis.ConnectionError:
                pass
        return super().get_connection(*args, **kwargs)


def waiting_helps(exc: redis.RedisError) -> bool:
    """Whether this error passes once Redis is back or a failover is over.

    Besides a lost connection: a master demoted to a replica (READONLY, and
    UNBLOCKED for a blocked BLMOVE), a replica without its master
    (MASTERDOWN), a master short of replicas (NOREPLICAS, min-replicas-to-write).
    """
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ReadOnlyError, MasterDownError)):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(
        ("UNBLOCKED", "NOREPLICAS", "READONLY", "MASTERDOWN")
    )


class ClusterRefused(Exception):
    """Redis is a Cluster node: its scripts would touch keys in many slots."""


def refuse_cluster(client: redis.Redis) -> None:
    """Raise ClusterRefused when Redis runs in cluster mode (see README, "Redis: Sentinel and Cluster")."""
    try:
        info = client.info("cluster")
    except redis.ResponseError:  # INFO renamed or forbidden: we cannot tell, and will not guess
        return
    if int(info.get("cluster_enabled", 0)) == 1:
        raise ClusterRefused(
            "Redis is a Cluster node (cluster_enabled:1), which llm-worker does not support: each of its "
            "scripts moves a job "
            "between a queue, a processing list, the result and done keys, the delayed set, the dead-letter "
            "list and the "
            "statistics atomically, and a cluster runs a script only on keys of one hash slot. Use one master with "
            "replicas and Redis Sentinel (REDIS_SENTINELS, REDIS_SENTINEL_MASTER) for failover; see the README, "
            '"Redis: Sentinel and Cluster".'
        )


MIN_REDIS_VERSION = (6, 2)  # BLMOVE, which every worker blocks on, came in Redis 6.2


class RedisTooOld(Exception):
    """Redis is older than MIN_REDIS_VERSION: workers would fail on their first BLMOVE."""


def redis_too_old(server_info: Mapping[str, Any]) -> str | None:
    """Why the Redis whose ``INFO server`` this is cannot serve, or None; a version we cannot read passes."""
    version = str(server_info.get("redis_version", ""))
    try:
        found = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if len(found) < 2 or found >= MIN_REDIS_VERSION:
        return None
    need = ".".join(map(str, MIN_REDIS_VERSION))
    return (
        f"Redis {version} is too old: llm-worker needs Redis {need} or newer (its workers take jobs with BLMOVE, "
        f"new in {need}). Upgrade Redis, or point REDIS_URL at a newer one."
    )


def refuse_old_redis(client: redis.Redis) -> None:
    """Raise RedisTooOld when the server's INFO says it is older than MIN_REDIS_VERSION."""
    try:
        info = client.info("server")
    except redis.ResponseError:  # INFO renamed or forbidden: we cannot tell, and will not guess
        return
    why = redis_too_old(info)
    if why:
        raise RedisTooOld(why)
