"""The supervisor talking to systemd over a real NOTIFY_SOCKET datagram socket."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from pathlib import Path

import redis
from support import eventually


class Listener:
    """A stand-in for systemd's notify socket: collects (time, message) pairs."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd does, to know the sender
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.senders: set[int] = set()
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except OSError:
                continue
            for level, kind, creds in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    self.senders.add(struct.unpack("iII", creds[:12])[0])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in self.messages if key in m]

    def close(self) -> None:
        self.running = False
        self.thread.join(2)
        self.sock.close()


def test_ready_status_watchdog_reloading_and_stopping_reach_systemd(service, r: redis.Redis, tmp_path: Path) -> None:
    listener = Listener(tmp_path / "notify.sock")
    try:
        svc = service(
            ready=False,
            NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
            WATCHDOG_USEC="400000",
            WORKER_POOLS="llm-chat=2,llm-embeddings=1",
        )
        # READY=1 once, and only when every worker is up and the port answers.
        ((ready_at, ready),) = eventually(lambda: listener.having("READY"), timeout=30, what="READY=1")
        assert ready["READY"] == "1" and "3 of 3 workers up" in ready.get("STATUS", "")
        assert svc.get("/health/live")[0] == 200 and len(svc.worker_pids(r)) == 3
        assert "jobs/min" in listener.having("STATUS")[-1][1]["STATUS"]
        # WATCHDOG=1 at about half of WATCHDOG_USEC (0.2 s here).
        time.sleep(1.0)
        pings = [t for t, m in listener.having("WATCHDOG") if t > ready_at]
        assert len(pings) >= 3
        # A wedged loop sends nothing; pings resume when it turns again.
        svc.send(signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(0.8)
        svc.send(signal.SIGCONT)
        resumed_at = time.monotonic()
        assert not [t for t, m in listener.having("WATCHDOG") if stopped_at + 0.05 < t < resumed_at - 0.05]
        eventually(lambda: [t for t, m in listener.having("WATCHDOG") if t > resumed_at], what="pings again")
        # HUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 once the workers are replaced.
        svc.send(signal.SIGHUP)
        ((reload_at, reloading),) = eventually(lambda: listener.having("RELOADING"), what="RELOADING=1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        eventually(
            lambda: [t for t, m in listener.having("READY") if t > reload_at], timeout=30, what="READY=1 after reload"
        )
        # TERM: STOPPING=1, then the drain.
        svc.send(signal.SIGTERM)
        eventually(lambda: listener.having("STOPPING"), what="STOPPING=1")
        assert svc.wait(20) == 0
    finally:
        listener.close()


def test_only_the_supervisor_speaks_to_systemd_and_the_service_runs_the_same_without_it(
    service, r: redis.Redis, tmp_path: Path
) -> None:
    listener = Listener(tmp_path / "notify.sock")
    try:
        svc = service(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000", WORKER_POOLS="llm-chat=2")
        eventually(lambda: listener.having("READY"), what="READY=1")
        time.sleep(0.5)
        # systemd (NotifyAccess=main) accepts only the main pid: workers and HTTP must stay silent.
        assert listener.senders == {svc.pid}
        plain = service(WORKER_POOLS="llm-chat=1")
        assert plain.get("/health/ready")[0] == 200  # outside systemd, the same service
    finally:
        listener.close()
