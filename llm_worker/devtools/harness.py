"""Run ``llm-worker run`` as a real process and watch it: for the demo, drills, benchmarks and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import msgspec
import psutil
import redis
import urllib3

from llm_worker.devtools.localredis import free_port
from llm_worker.queue.keys import Keys


class PortTaken(RuntimeError):
    """Another process holds the HTTP port chosen for a service."""


class Service:
    """One supervisor with its workers and HTTP process, started with ``env`` on top of ours."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        log_path: str | Path | None = None,
        args: tuple[str, ...] = (),
        command: Sequence[str] | None = None,
        base_env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> None:
        """``command`` runs another installation's ``llm-worker`` (default: this interpreter's);
        ``base_env`` replaces our environment as the one ``env`` is laid over."""
        self.env = {
            **(os.environ if base_env is None else base_env),
            "LOG_FORMAT": "text",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.command = list(command) if command is not None else [sys.executable, "-m", "llm_worker.cli"]
        self.cwd = cwd
        # A port we chose may be taken between free_port() and the HTTP process's bind: start() then
        # starts the service again on another. A port the caller set is kept.
        self.port_chosen = "HEALTH_CHECK_PORT" not in self.env
        self.env.setdefault("HEALTH_CHECK_PORT", str(free_port()))
        self.port = int(self.env["HEALTH_CHECK_PORT"])
        self.args = args
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port_ours = False  # this service's tree was seen listening on self.port
        self._log_start = 0  # where this run's lines begin in the log
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1, read=5))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    attempts = 5  # ports tried when ours was taken by another process

    def start(self, *, ready: bool = True, timeout: float = 30.0) -> Service:
        for attempt in range(self.attempts if self.port_chosen else 1):
            if attempt:
                self.port = free_port()
                self.env["HEALTH_CHECK_PORT"] = str(self.port)
            self._spawn()
            if not ready:
                return self
            try:
                self.wait_ready(timeout)
                return self
            except PortTaken:
                self.stop(timeout=5)
                if not self.port_chosen or attempt == self.attempts - 1:
                    raise
            except BaseException:
                self.stop(timeout=5)  # never leave a half-started service behind
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path is not None:
            self._log = out = open(self.log_path, "ab")
        self._port_ours = False
        self._log_start = self.log_path.stat().st_size if self.log_path is not None and self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [*self.command, "run", *self.args],
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

    def _listening(self) -> bool:
        """Whether a process of this service's tree listens on its HTTP port."""
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return False
        for proc in tree:
            try:
                conns = proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
            except psutil.Error:
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in conns):
                return True
        return False

    def _check_port(self) -> None:
        """Something answered on our port: PortTaken unless it is ours (never talk to another's service)."""
        if self._port_ours:
            return
        if self._listening():
            self._port_ours = True
            return
        raise PortTaken(f"port {self.port} is held by a process not of this service; {self.tail()}")

    def get(self, path: str) -> tuple[int, dict[str, object]]:
        resp = self.http.request("GET", self.url + path)
        try:
            body = msgspec.json.decode(resp.data)
        except msgspec.DecodeError:
            body = {"text": resp.data.decode(errors="replace")}
        return resp.status, body

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"llm-worker exited with {self.process.returncode} before it was ready; {self.tail()}"
                )
            if f"cannot listen on {self._host()}:{self.port}:" in self._log_since_spawn():
                raise PortTaken(f"the HTTP process could not bind port {self.port}; {self.tail()}")
            try:
                status, body = self.get("/health/ready")
                self._check_port()
                if status == 200:
                    return
                last = str(body)
            except urllib3.exceptions.NewConnectionError as exc:
                last = str(exc)  # nobody listens yet
            except urllib3.exceptions.HTTPError as exc:
                self._check_port()  # someone accepted the connection
                last = str(exc)
            time.sleep(0.05)
        raise TimeoutError(f"llm-worker not ready within {timeout}s: {last}; {self.tail()}")

    def _log_since_spawn(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def _host(self) -> str:
        return self.env.get("HEALTH_CHECK_HOST", "127.0.0.1")

    def worker_pids(self, client: redis.Redis, prefix: str = "llm:") -> list[int]:
        """Pids of this service's live workers, from the worker registry in Redis."""
        host = self.env.get("WORKER_ID")
        pids = []
        for blob in client.hgetall(Keys(prefix, "").registry).values():
            info = msgspec.json.decode(blob)
            if (host is None or info["host"] == host) and _child_of(info["pid"], self.pid):
                pids.append(int(info["pid"]))
        return sorted(pids)

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every process of its group: a host that died."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.send(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            return None
        finally:
            try:
                os.killpg(self.pid, signal.SIGKILL)  # nothing of ours outlives a test
            except ProcessLookupError:
                pass

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _child_of(pid: int, parent: int) -> bool:
    """A live child of ``parent``: a dead one not yet reaped (a zombie) does not count."""
    try:
        proc = psutil.Process(pid)
        return proc.ppid() == parent and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
