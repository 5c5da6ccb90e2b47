"""Fallback on out-of-memory: ask the provider to unload its idle models, then try again.

Once per job; after that the model fallback may move the job to a smaller model.
"""

from __future__ import annotations

from llm_worker.plugin.attempts import Attempt, Plan
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import ErrorKind, JobError


@hookimpl(tryfirst=True)
def llm_worker_fallback(error: JobError, attempt: Attempt) -> Plan | None:
    if error.kind is not ErrorKind.MEMORY or attempt.unloaded:
        return None
    return Plan(reason="out of memory: unloaded idle models", unload_idle=True)
