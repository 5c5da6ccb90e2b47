"""What a process tells its plugins about itself (``llm_worker_worker_started``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llm_worker.host.shm import SharedState
from llm_worker.settings.config import Settings


@dataclass(frozen=True)
class WorkerContext:
    settings: Settings
    worker_id: str  # "<WORKER_ID>:<pid>"
    role: Literal["worker", "http", "models"]
    queue: str | None  # the queue a worker serves; None in the HTTP and model manager processes
    shared: SharedState  # the host's shared-memory tables, for built-ins that write statistics
    slot: int | None  # this worker's slot in ``shared.slots``; None elsewhere
