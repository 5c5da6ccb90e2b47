"""Plugins that only tests load (through LLM_WORKER_PLUGINS=testplugins).

``crash-*`` models kill the worker that runs them with SIGKILL: a job that
kills its worker every time, as a segfaulting native library would.
TESTPLUGINS_BOOT_SECONDS slows every worker's boot by that much.
"""

from __future__ import annotations

import os
import signal
import time

from llm_worker import hookimpl


class CrashingProvider:
    name = "crasher"

    def serves(self, model: str) -> bool:
        return model.startswith("crash-")

    def chat(self, model, request, deadline, on_chunk):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGKILL)

    generate = chat

    def embed(self, model, inputs, deadline, options=None):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signal.SIGKILL)

    def models(self):  # type: ignore[no-untyped-def]
        return []

    def health(self, timeout):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def close(self) -> None:
        pass


@hookimpl
def llm_worker_providers(settings):  # type: ignore[no-untyped-def]
    # TESTPLUGINS_BOOT_SECONDS makes every worker slow to boot, as a provider
    # that opens connections or loads a client library can be.
    time.sleep(float(os.environ.get("TESTPLUGINS_BOOT_SECONDS", "0")))
    return [CrashingProvider()]


@hookimpl
def llm_worker_record(event):  # type: ignore[no-untyped-def]
    # TESTPLUGINS_SINK_RAISES: a metric sink that fails on every event.
    if os.environ.get("TESTPLUGINS_SINK_RAISES"):
        raise RuntimeError("the metric backend is down")


@hookimpl
def llm_worker_filter_request(job):  # type: ignore[no-untyped-def]
    # TESTPLUGINS_FILTER_RAISES: a request filter with a bug.
    if os.environ.get("TESTPLUGINS_FILTER_RAISES"):
        raise KeyError("user-tier")
