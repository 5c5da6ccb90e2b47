"""Facts about processes on this host."""

from __future__ import annotations

import os
import time


def worker_id(host: str, pid: int) -> str:
    """A process's id in Redis keys, results and events: ``WORKER_ID:pid`` (one rule, for every role)."""
    return f"{host}:{pid}"


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(parent: int, every: float = 0.5) -> None:
    """Exit this process once ``parent`` is no longer its parent (run it in a daemon thread)."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)
