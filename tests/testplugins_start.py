"""A plugin whose ``llm_worker_worker_started`` raises in the processes of TESTPLUGINS_START_RAISES_IN.

TESTPLUGINS_START_RAISES_IN is a comma-separated list of roles ("worker",
"http", "models"); the hook raises in those and does nothing elsewhere.
"""

from __future__ import annotations

import os

from llm_worker import hookimpl


@hookimpl
def llm_worker_worker_started(worker):  # type: ignore[no-untyped-def]
    if worker.role in os.environ.get("TESTPLUGINS_START_RAISES_IN", "").split(","):
        raise RuntimeError(f"no licence for the {worker.role} process")
