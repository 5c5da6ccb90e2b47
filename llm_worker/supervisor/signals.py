"""Signals, queued for the main loop: handlers do nothing, the kernel's byte is the queue.

Python's C-level handler writes each signal's number to the wakeup fd before
any Python code runs, so a pipe registered with ``signal.set_wakeup_fd`` is
both the queue and the alarm clock: the loop sleeps in ``select`` on it and
reads the numbers when it wakes. No I/O and no state change in a handler.
"""

from __future__ import annotations

import os
import select
import signal

HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGCHLD,
    signal.SIGUSR1,
)


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler is needed for the wakeup fd to fire; the byte is enough."""


class SignalQueue:
    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self) -> None:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _ignore)

    def wait(self, timeout: float) -> list[int]:
        """Sleep until a signal arrives or ``timeout`` passes; return the signals, in order."""
        try:
            ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries select for us
            ready = [self._read]
        if not ready:
            return []
        try:
            data = os.read(self._read, 4096)
        except BlockingIOError:
            return []
        return list(data)

    def reset_in_child(self) -> None:
        """In a freshly forked child: default handlers, no wakeup fd, no pipe."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self._read)
        os.close(self._write)
