"""Service children: the one-of-a-kind helpers beside the workers (the HTTP process, the model manager).

Each kind has a spawn function, is kept at one process while the supervisor
runs, and is respawned with backoff when it dies: at once after a long life,
doubling from 0.1 s while it keeps dying young, so a crash loop does not spin.
A spawn function that returns None (HTTP with port 0) means "never, for these
settings".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_worker.host.backoff import compute_backoff
from llm_worker.supervisor.children import RESPAWN_CAP, Child, Exit

if TYPE_CHECKING:
    from llm_worker.host.shm import SharedState
    from llm_worker.plugin.manager import Found
    from llm_worker.settings.config import Settings


@dataclass(frozen=True)
class Launch:
    """What a spawn function is given: the settings, the shared state, the plugins, and a way to fork.

    ``fork(child, body)`` forks; the child resets what it inherited from the
    supervisor (signal handlers, the systemd socket) and runs ``body``.
    """

    settings: Settings
    state: SharedState
    plugins: list[Found]
    fork: Callable[[Child, Callable[[], object]], Child]


Spawn = Callable[[Launch], Child | None]
LIVED_LONG = 10.0  # a service child that lived this long was not crash-looping
FIRST_BACKOFF = 0.1


@dataclass
class Service:
    kind: str
    spawn: Spawn
    child: Child | None = None
    streak: int = 0  # deaths in a row, each after a short life
    respawn_at: float = 0.0  # monotonic; inf: never (its spawn declined)


class Services:
    """The service children by kind: which is running, and when each may be spawned again."""

    def __init__(self, spawns: Mapping[str, Spawn]) -> None:
        self.by_kind = {kind: Service(kind, spawn) for kind, spawn in spawns.items()}

    def __contains__(self, kind: str) -> bool:
        return kind in self.by_kind

    def __iter__(self) -> Iterator[Service]:
        return iter(self.by_kind.values())

    def running(self) -> list[Child]:
        return [s.child for s in self if s.child is not None]

    def due(self, now: float) -> list[Service]:
        """Kinds with no process that may be spawned now."""
        return [s for s in self if s.child is None and now >= s.respawn_at]

    def spawned(self, service: Service, child: Child | None) -> None:
        service.child = child
        service.respawn_at = 0.0 if child is not None else float("inf")

    def exited(self, ex: Exit) -> tuple[Service, float | None]:
        """Forget a dead service child; return its service and the respawn delay (None: it was asked to stop)."""
        service = self.by_kind[ex.child.kind]
        service.child = None
        if ex.child.term_sent:
            service.respawn_at = 0.0
            return service, None
        now = time.monotonic()
        service.streak = 1 if now - ex.child.spawned > LIVED_LONG else service.streak + 1
        delay = compute_backoff(service.streak, FIRST_BACKOFF, cap=RESPAWN_CAP)
        service.respawn_at = now + delay
        return service, delay

    def reset(self) -> None:
        """New settings: a kind that declined to run may run now (HUP)."""
        for service in self:
            if service.child is None:
                service.respawn_at = 0.0
