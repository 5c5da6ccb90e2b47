"""The supervisor's children: forking them, knowing them, stopping them, reaping them."""

from __future__ import annotations

import enum
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

from llm_worker import exitcodes

# The longest wait before a child that keeps dying (worker or service) is forked again:
# a crash loop costs a fork every half minute, and a fixed cause is picked up within one.
RESPAWN_CAP = 30.0


class Handback(enum.Enum):
    """What a dead worker's held jobs count as when they go back to their queue."""

    CRASH = "crash"  # it died on its own, or was killed for hanging: the crash count rises
    UNCOUNTED = "uncounted"  # we stopped it (QUIT, drain timeout, reload): not the job's fault


@dataclass
class Child:
    pid: int
    kind: str  # "worker", or a service child's: "http", "models"
    slot: int = -1
    pool: str = ""
    generation: int = 0  # the settings generation it was started with (HUP raises it)
    spawned: float = field(default_factory=time.monotonic)
    term_sent: float = 0.0  # when we asked it to stop
    kill_at: float = 0.0  # when to SIGKILL it if it has not exited
    handback: Handback = Handback.CRASH
    reason: str = ""


@dataclass(frozen=True)
class Exit:
    child: Child
    code: int | None  # exit status, when it exited
    signal: int | None  # the signal that killed it, when one did

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with {self.code}"


class Children:
    """Every live child by pid, with fork and reap."""

    def __init__(self) -> None:
        self.by_pid: dict[int, Child] = {}

    def __len__(self) -> int:
        return len(self.by_pid)

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self.by_pid.values()))

    def workers(self, pool: str | None = None) -> list[Child]:
        return [c for c in self.by_pid.values() if c.kind == "worker" and (pool is None or c.pool == pool)]

    def fork(self, child: Child, in_child: Callable[[], NoReturn]) -> Child:
        """Fork; the child runs ``in_child`` (which must never return)."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            code = exitcodes.SUPERVISOR_ERROR
            try:
                in_child()
            except SystemExit as exc:  # a child's own verdict, named by its exit code (exitcodes.py)
                code = exc.code if isinstance(exc.code, int) else exitcodes.SUPERVISOR_ERROR
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        child.pid = pid
        self.by_pid[pid] = child
        return child

    def reap(self) -> list[Exit]:
        """Collect every child that has exited, without blocking."""
        exits = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue
            if os.WIFSIGNALED(status):
                exits.append(Exit(child, None, os.WTERMSIG(status)))
            else:
                exits.append(Exit(child, os.waitstatus_to_exitcode(status), None))
        return exits

    @staticmethod
    def send(child: Child, sig: int) -> None:
        try:
            os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, child: Child, sig: int, *, grace: float, handback: Handback, reason: str, wake: bool = True) -> None:
        """Ask a child to stop with ``sig``; SIGKILL it if it is still there after ``grace``.

        ``wake`` also sends SIGCONT, so that a stopped process acts on ``sig``
        (a drain); a hung worker is not woken, it is killed and recovered.
        """
        if child.term_sent and child.handback is Handback.CRASH:
            handback = Handback.CRASH  # a hang stays a hang, whatever stops it later
        now = time.monotonic()
        child.term_sent = child.term_sent or now
        child.kill_at = now + grace if not child.kill_at else min(child.kill_at, now + grace)
        child.handback = handback
        child.reason = child.reason or reason
        self.send(child, sig)
        if wake and sig != signal.SIGKILL:
            self.send(child, signal.SIGCONT)

    def kill_overdue(self) -> list[Child]:
        """SIGKILL every child whose grace has run out; return them."""
        now = time.monotonic()
        overdue = [c for c in self.by_pid.values() if c.kill_at and now >= c.kill_at]
        for child in overdue:
            self.send(child, signal.SIGKILL)
            child.kill_at = now + 3600  # once; reap() will see it go
        return overdue
