"""The supervisor: the single-threaded process that forks and watches everything else."""

from __future__ import annotations

import os
from collections.abc import Callable

from llm_worker.config import Settings
from llm_worker.pluginmanager import Found
from llm_worker.supervisor.arbiter import Arbiter
from llm_worker.supervisor.children import Child

__all__ = ["Arbiter", "run"]


def run(settings: Settings, reload: Callable[[], Settings], plugins: list[Found]) -> int:
    """Supervise until drained or stopped; return the process exit code."""
    return Arbiter(settings, reload, {"http": spawn_http, "models": spawn_models}, plugins).run()


def spawn_http(arbiter: Arbiter) -> Child | None:
    """Fork the HTTP process (none when HEALTH_CHECK_PORT is 0)."""
    from llm_worker import http

    settings = arbiter.settings
    if settings.http.port == 0:
        return None
    parent = os.getpid()
    child = Child(pid=0, kind="http")
    return arbiter.children.fork(child, lambda: arbiter.in_child(
        lambda: http.serve(settings, arbiter.state, parent, arbiter.plugins)))


def spawn_models(arbiter: Arbiter) -> Child:
    """Fork the model manager, the one process that loads and unloads models."""
    from llm_worker import models

    settings = arbiter.settings
    parent = os.getpid()
    child = Child(pid=0, kind="models")
    return arbiter.children.fork(child, lambda: arbiter.in_child(
        lambda: models.run_manager(settings, arbiter.state, parent, arbiter.plugins)))
