"""What a process tells its plugins about itself, and where they keep their state in it.

Each process (a worker, the HTTP process, the model manager) builds one
``WorkerContext`` and hands it to ``llm_worker_worker_started``; the plugin
manager then gives the same context to every other hook that asks for
``worker``. A plugin keeps what it opened for the process on
``worker.stash``, under a ``StashKey`` of its own, never in a module global:
two plugin managers in one process (a test's, say) each have their own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar, cast

from llm_worker.host.shm import SharedState
from llm_worker.settings.config import Settings

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key to one value in a ``Stash``; make one per value, at module level: ``STATE = StashKey[MyState]()``."""

    __slots__ = ()


class Stash:
    """One process's plugin state, each value under a ``StashKey`` (pytest's ``config.stash``)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._values[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._values[key])

    def get(self, key: StashKey[T], default: D = None) -> T | D:  # type: ignore[assignment]
        """The value under ``key``, or ``default`` when this process set none (the plugin is idle here)."""
        return cast("T | D", self._values.get(key, default))

    def __contains__(self, key: StashKey[Any]) -> bool:
        return key in self._values

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._values[key]


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    worker_id: str  # "<WORKER_ID>:<pid>"
    role: Literal["worker", "http", "models"]
    queue: str | None  # the queue a worker serves; None in the HTTP and model manager processes
    shared: SharedState  # the host's shared-memory tables, for built-ins that write statistics
    slot: int | None  # this worker's slot in ``shared.slots``; None elsewhere
    # What plugins opened for this process: set in llm_worker_worker_started, read by the other hooks.
    stash: Stash = field(default_factory=Stash, repr=False, compare=False)
