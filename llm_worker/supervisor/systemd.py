"""What the supervisor tells systemd: READY, STATUS, WATCHDOG, STOPPING, RELOADING.

READY=1 goes out once, when every wanted worker has booted, the HTTP port
is bound (or HTTP is off) and the model manager has made its preloads; after a reload, READY=1 again once no worker of
the old settings is left. STATUS= says how many workers are up and how many
jobs finished in the last minute. WATCHDOG=1 comes from ``turn()``, which the
loop calls every turn: a wedged loop stops the pings and systemd restarts it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from llm_worker.host.layout import SlotState
from llm_worker.host.shm import SharedState
from llm_worker.supervisor.sdnotify import Notifier

STATUS_EVERY = 5.0


class SystemdLink:
    def __init__(self, notifier: Notifier, state: SharedState, http_wanted: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.state = state
        self.http_wanted = http_wanted
        self.ready_sent = False
        self.reloading = False
        self.status_due = 0.0
        self.finished: deque[tuple[float, int]] = deque()  # (when, jobs finished so far), the last minute

    def turn(self, old_workers_left: bool) -> None:
        """Once per loop turn: watchdog, readiness, status."""
        now = time.monotonic()
        self.notifier.tick(now)
        if not self.ready_sent and self._up():
            self.ready_sent = True
            self.notifier.ready(self.status_text(now))
        elif self.reloading and not old_workers_left and self._up():
            self.reloading = False
            self.notifier.ready(self.status_text(now))
        if now >= self.status_due:
            self.status_due = now + STATUS_EVERY
            self.notifier.status(self.status_text(now))

    def _up(self) -> bool:
        header = self.state.header
        up = sum(1 for s in self.state.slots if s.up())
        return (
            up >= header.workers_wanted
            and (header.http_bound == 1 or not self.http_wanted())
            and bool(header.models_ready)
        )

    def status_text(self, now: float) -> str:
        done = sum(slot.jobs_done for slot in self.state.slots)  # per slot, it only grows
        self.finished.append((now, done))
        while self.finished and now - self.finished[0][0] > 60:
            self.finished.popleft()
        first_time, first_done = self.finished[0]
        span = max(now - first_time, 1.0)
        per_minute = (done - first_done) * 60 / span if span >= 5 else 0.0
        up = sum(1 for s in self.state.slots if s.up())
        busy = sum(1 for s in self.state.slots if s.up() and s.state == SlotState.BUSY)
        return f"{up} of {self.state.header.workers_wanted} workers up, {busy} busy, {per_minute:.0f} jobs/min"

    def stopping(self) -> None:
        self.notifier.stopping()

    def reload_started(self) -> None:
        self.reloading = True
        self.notifier.reloading()

    def reload_refused(self) -> None:
        """A refused reload still ends the reload, or systemd waits in 'reloading'."""
        self.reloading = False
        self.notifier.ready(self.status_text(time.monotonic()))
