"""sd_notify over real AF_UNIX datagram sockets: what systemd would read, and what it must never cost."""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_worker.supervisor.sdnotify import Notifier

RECV_TIMEOUT = 5.0


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def receive(sock: socket.socket) -> dict[str, str]:
    return fields(sock.recv(4096))


def assert_nothing_sent(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        sock.settimeout(RECV_TIMEOUT)


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT)
    return sock


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "notify")
    if len(path) < 100:  # sun_path holds 108 bytes
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sdn") as short:
        yield os.path.join(short, "notify")


@pytest.fixture
def receiver(socket_path: str) -> Iterator[socket.socket]:
    sock = bound_socket(socket_path)
    yield sock
    sock.close()


@pytest.fixture
def notifier(socket_path: str, receiver: socket.socket) -> Iterator[Notifier]:
    n = Notifier.from_env({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "200000"})
    yield n
    n.close()


# ---- the messages ---------------------------------------------------------------------


def test_ready_alone_and_with_status(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.ready()
    assert receive(receiver) == {"READY": "1"}
    assert notifier.ready(status="8 workers up")
    assert receive(receiver) == {"READY": "1", "STATUS": "8 workers up"}


def test_status_stopping_watchdog(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.status("draining: 3 jobs in hand")
    assert receive(receiver) == {"STATUS": "draining: 3 jobs in hand"}
    assert notifier.stopping()
    assert receive(receiver) == {"STOPPING": "1"}
    assert notifier.watchdog()
    assert receive(receiver) == {"WATCHDOG": "1"}


def test_a_newline_in_a_value_cannot_forge_a_field(notifier: Notifier, receiver: socket.socket) -> None:
    notifier.status("bad value\nREADY=1")
    assert receive(receiver) == {"STATUS": "bad value READY=1"}


def test_reloading_carries_the_monotonic_clock(notifier: Notifier, receiver: socket.socket) -> None:
    before = time.monotonic()
    assert notifier.reloading()
    got = receive(receiver)
    after = time.monotonic()
    assert got["RELOADING"] == "1"
    assert before - 0.001 <= int(got["MONOTONIC_USEC"]) / 1e6 <= after + 0.001


def test_notify_sends_any_fields_in_one_datagram(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.notify(MAINPID=os.getpid(), ERRNO=5)
    assert receive(receiver) == {"MAINPID": str(os.getpid()), "ERRNO": "5"}


def test_abstract_socket(receiver: socket.socket) -> None:
    name = f"llm-worker-test-{uuid.uuid4().hex}"
    with bound_socket("\0" + name) as abstract:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.address == "\0" + name
        assert n.ready(status="abstract")
        assert receive(abstract) == {"READY": "1", "STATUS": "abstract"}
        n.close()


# ---- the watchdog -----------------------------------------------------------------------


def test_tick_pings_at_half_the_interval(notifier: Notifier, receiver: socket.socket) -> None:
    # Given WATCHDOG_USEC=200000: a ping is due every 0.1 s of the loop's clock.
    assert notifier.watchdog_interval == pytest.approx(0.2)
    sent = [
        now
        for now in (100.0, 100.03, 100.06, 100.099, 100.101, 100.15, 100.2, 100.202, 100.25, 100.31)
        if notifier.tick(now)
    ]
    assert sent == [100.0, 100.101, 100.202, 100.31]
    for _ in sent:
        assert receive(receiver) == {"WATCHDOG": "1"}
    assert_nothing_sent(receiver)


def test_watchdog_due_follows_explicit_pings(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.watchdog_due(50.0)
    notifier.watchdog(now=50.0)
    assert not notifier.watchdog_due(50.09)
    assert notifier.watchdog_due(50.1)


def test_a_wedged_loop_sends_nothing(notifier: Notifier, receiver: socket.socket) -> None:
    assert notifier.tick(10.0)
    receive(receiver)
    # The loop never calls tick again: no ping, so systemd's watchdog fires.
    assert_nothing_sent(receiver)


@pytest.mark.parametrize("whose, enabled", [("ours", True), ("another", False), ("unset", True)])
def test_watchdog_pid_names_the_process_it_is_for(
    socket_path: str, receiver: socket.socket, whose: str, enabled: bool
) -> None:
    environ = {"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "30000000"}
    if whose != "unset":
        environ["WATCHDOG_PID"] = str(os.getpid() if whose == "ours" else os.getpid() + 1)
    n = Notifier.from_env(environ)
    assert (n.watchdog_interval == 30.0) is enabled
    assert n.tick(1.0) is enabled
    if enabled:
        assert receive(receiver) == {"WATCHDOG": "1"}
    assert_nothing_sent(receiver)
    assert n.ready()  # the watchdog's owner aside, notifications still go out
    assert receive(receiver) == {"READY": "1"}
    n.close()


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_or_bad_watchdog_usec_turns_the_watchdog_off(socket_path: str, receiver: socket.socket, usec: str) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": usec})
    assert n.watchdog_interval is None
    assert not n.watchdog_due(1e9)
    assert not n.tick()
    assert_nothing_sent(receiver)
    n.close()


# ---- outside systemd, and when systemd is not listening -----------------------------


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "200000"})
    assert not n.enabled and n.fileno() == -1
    assert n.watchdog_interval is None
    assert not any(
        [n.ready("x"), n.status("x"), n.stopping(), n.reloading(), n.watchdog(), n.tick(0.0), n.notify(ERRNO=1)]
    )
    n.forget_in_child()


def test_an_unsupported_address_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llm_worker.supervisor.sdnotify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()
    assert "unsupported NOTIFY_SOCKET" in caplog.text


def test_a_missing_socket_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-here"), "WATCHDOG_USEC": "200000"})
    with caplog.at_level(logging.WARNING, logger="llm_worker.supervisor.sdnotify"):
        assert not n.ready()
        assert not n.tick(1.0)
        assert not n.stopping()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once, not per call
    n.close()


def test_a_vanished_socket_never_raises(socket_path: str, receiver: socket.socket) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": socket_path})
    assert n.ready()
    receiver.close()
    os.unlink(socket_path)
    assert not n.status("after")
    with bound_socket(socket_path) as again:  # systemd re-executed: the same path, a new socket
        assert n.status("back")
        assert receive(again) == {"STATUS": "back"}
    n.close()


def test_a_receiver_that_stopped_reading_never_blocks(
    notifier: Notifier, receiver: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a receiver that reads nothing: its queue fills, and sends must fail fast instead of blocking.
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="llm_worker.supervisor.sdnotify"):
        results = [notifier.status(f"message {i} " + "x" * 512) for i in range(5000)]
    assert time.monotonic() - started < 2.0
    assert results[0] and not results[-1]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    # When it reads again, notifications resume.
    receiver.setblocking(False)
    try:
        while receiver.recv(4096):
            pass
    except BlockingIOError:
        pass
    receiver.settimeout(RECV_TIMEOUT)
    assert notifier.ready()
    assert receive(receiver) == {"READY": "1"}


# ---- fork and exec ----------------------------------------------------------------------


def test_the_variables_leave_the_environment(
    monkeypatch: pytest.MonkeyPatch, socket_path: str, receiver: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env()
    assert n.watchdog_interval == pytest.approx(0.2)
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    # A process started from here inherits none of them.
    probe = "import os; print(sorted(k for k in os.environ if k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert n.ready()
    assert receive(receiver) == {"READY": "1"}
    n.close()


def test_the_given_mapping_is_left_alone_when_asked(socket_path: str, receiver: socket.socket) -> None:
    environ = {"NOTIFY_SOCKET": socket_path}
    Notifier.from_env(environ, unset_environment=False).close()
    assert environ == {"NOTIFY_SOCKET": socket_path}
    Notifier.from_env(environ).close()
    assert environ == {}


def test_forget_in_child_closes_the_socket(notifier: Notifier, receiver: socket.socket) -> None:
    fd = notifier.fileno()
    inode = os.fstat(fd).st_ino
    notifier.forget_in_child()
    assert notifier.fileno() == -1 and not notifier.enabled
    try:
        assert os.fstat(fd).st_ino != inode  # the number may have been reused, never by our socket
    except OSError:
        pass
    assert not notifier.ready() and not notifier.tick(1e9)
    assert_nothing_sent(receiver)


def credentials(sock: socket.socket) -> tuple[dict[str, str], int]:
    """One datagram and its sender's pid, as the kernel vouches for it (SCM_CREDENTIALS)."""
    creds = struct.Struct("3i")  # struct ucred: pid, uid, gid
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds.size))
    pids = [
        creds.unpack(cdata[: creds.size])[0]
        for level, kind, cdata in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert len(pids) == 1
    return fields(data), pids[0]


def test_a_real_process_notifies_from_its_own_pid_and_its_fork_stays_silent(
    socket_path: str, receiver: socket.socket
) -> None:
    # Given systemd's view: NotifyAccess=main accepts datagrams whose sender pid is the main pid.
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    script = textwrap.dedent("""
        import os
        from llm_worker.supervisor.sdnotify import Notifier

        notifier = Notifier.from_env()
        pid = os.fork()
        if pid == 0:  # a worker: no variables, no socket, no messages
            notifier.forget_in_child()
            leaked = "NOTIFY_SOCKET" in os.environ or notifier.ready() or notifier.tick()
            os._exit(1 if leaked else 0)
        _, status = os.waitpid(pid, 0)
        notifier.ready(status="child exit %d" % os.waitstatus_to_exitcode(status))
    """)
    env = {**os.environ, "NOTIFY_SOCKET": socket_path, "WATCHDOG_USEC": "30000000"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        got, sender = credentials(receiver)
    finally:
        assert proc.wait(timeout=30) == 0
    assert got == {"READY": "1", "STATUS": "child exit 0"}
    assert sender == proc.pid
    assert_nothing_sent(receiver)
