"""The supervisor: the single-threaded process that forks and watches everything else."""

from __future__ import annotations

import os
from collections.abc import Callable

from llm_worker.plugin.manager import Found
from llm_worker.settings.config import Settings
from llm_worker.supervisor.arbiter import Arbiter
from llm_worker.supervisor.children import Child
from llm_worker.supervisor.services import Launch

__all__ = ["Arbiter", "run"]


def run(settings: Settings, reload: Callable[[], Settings], plugins: list[Found]) -> int:
    """Supervise until drained or stopped; return the process exit code."""
    return Arbiter(settings, reload, {"http": spawn_http, "models": spawn_models}, plugins).run()


def spawn_http(launch: Launch) -> Child | None:
    """Fork the HTTP process (none when HEALTH_CHECK_PORT is 0)."""
    from llm_worker.http import app as http

    settings = launch.settings
    if settings.http.port == 0:
        return None
    parent = os.getpid()
    return launch.fork(Child(pid=0, kind="http"), lambda: http.serve(settings, launch.state, parent, launch.plugins))


def spawn_models(launch: Launch) -> Child:
    """Fork the model manager, the one process that loads and unloads models."""
    from llm_worker.models import manager as models

    settings = launch.settings
    parent = os.getpid()
    return launch.fork(
        Child(pid=0, kind="models"), lambda: models.run_manager(settings, launch.state, parent, launch.plugins)
    )
