"""The systemd notification protocol (sd_notify(3)), standard library only.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket)
and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. Messages are
``KEY=VALUE`` lines in one datagram. Without ``NOTIFY_SOCKET`` every call is a
no-op, so the supervisor calls these unconditionally, in and out of systemd.

The supervisor (the unit's main process, ``NotifyAccess=main``) owns the one
Notifier and calls ``tick()`` every turn of its loop: it pings at half the
watchdog interval, so a wedged loop stops pinging and systemd restarts it.
Creating the Notifier removes the three variables from the environment, as
sd_notify's ``unset_environment`` does, so that forked children and anything
they exec do not inherit them; a forked child calls ``forget_in_child()`` to
close its copy of the socket.

Nothing here raises into the caller or blocks: the socket is non-blocking and
CLOEXEC, and a failed send (a full receive queue, a vanished socket) is logged
once at warning and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("llm_worker.supervisor.sdnotify")

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | None:
    """Map NOTIFY_SOCKET to an AF_UNIX address: ``@name`` is the abstract ``\\0name``."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # vsock: and other kinds systemd may pass: not spoken here


def watchdog_usec(environ: MutableMapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours), else None."""
    pid = environ.get("WATCHDOG_PID", "")
    usec = environ.get("WATCHDOG_USEC", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value if value > 0 else None


class Notifier:
    """Speaks sd_notify to systemd from the main process; a no-op without NOTIFY_SOCKET."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval: float | None = watchdog_usec / 1e6 if watchdog_usec and address else None
        self._last_ping = float("-inf")
        self._failing = False
        self._sock: socket.socket | None = None
        if address is not None:
            try:
                kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                self._sock = socket.socket(socket.AF_UNIX, kind)
            except OSError as exc:
                log.warning("systemd notifications off: no socket", extra={"error": str(exc)})
                self.watchdog_interval = None

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] = os.environ, *, unset_environment: bool = True) -> Notifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID, then remove them from ``environ``."""
        raw = environ.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("systemd notifications off: unsupported NOTIFY_SOCKET", extra={"notifySocket": raw})
        usec = watchdog_usec(environ)
        if unset_environment:
            for name in ENV_VARS:
                environ.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        """The socket's descriptor, or -1 when there is none."""
        return self._sock.fileno() if self._sock is not None else -1

    # ---- messages ----------------------------------------------------------------

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        return self.notify(READY=1, STATUS=status) if status is not None else self.notify(READY=1)

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``."""
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def reloading(self) -> bool:
        """A reload has begun; send ``ready()`` when it ends, refused or not."""
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def watchdog(self, now: float | None = None) -> bool:
        """Ping the watchdog now; ``tick()`` is the paced form."""
        self._last_ping = time.monotonic() if now is None else now
        return self.notify(WATCHDOG=1)

    def watchdog_due(self, now: float) -> bool:
        """Whether half the watchdog interval has passed since the last ping."""
        return self.watchdog_interval is not None and now - self._last_ping >= self.watchdog_interval / 2

    def tick(self, now: float | None = None) -> bool:
        """Call every loop turn: pings at half the interval, never more often. True when it pinged."""
        now = time.monotonic() if now is None else now
        return self.watchdog(now) if self.watchdog_due(now) else False

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram (``notify(MAINPID=pid, ERRNO=5)``). True when sent."""
        if self._sock is None or self.address is None or not fields:
            return False
        # A newline inside a value would start a bogus field of its own.
        text = "\n".join(f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:  # EAGAIN on a full queue, ENOENT or ECONNREFUSED on a gone socket
            if not self._failing:
                log.warning(
                    "systemd notification not delivered; carrying on",
                    extra={"error": str(exc), "fields": sorted(fields)},
                )
                self._failing = True
            return False
        if self._failing:
            log.info("systemd notifications delivered again")
            self._failing = False
        return True

    # ---- lifetime ------------------------------------------------------------------

    def forget_in_child(self) -> None:
        """Call in a forked child: close the inherited socket; the child then notifies nothing.

        systemd with NotifyAccess=main would refuse a child's messages anyway; this
        also keeps a long-lived child from holding the supervisor's socket open.
        """
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.watchdog_interval = None
