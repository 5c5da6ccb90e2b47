"""Fallback to another model: the first of FALLBACK_MODELS not yet tried and not refused.

Skips models this job already tried, models outside ALLOWED_MODELS, and
models whose circuit breaker would refuse the call. Asked last, after the
strategies that retry the same model differently. ENABLE_MODEL_FALLBACK=false
turns it off.
"""

from __future__ import annotations

from llm_worker.host.stats import model_label
from llm_worker.plugin.attempts import Attempt, Plan
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import ErrorKind, JobError, model_allowed

NO_FALLBACK = frozenset({ErrorKind.VALIDATION, ErrorKind.UNKNOWN, ErrorKind.CRASHED})


@hookimpl(trylast=True)
def llm_worker_fallback(error: JobError, attempt: Attempt) -> Plan | None:
    settings = attempt.settings
    if not settings.fallback.enabled or error.kind in NO_FALLBACK:
        return None
    tried = {model_label(m) for m in attempt.tried}
    for model in settings.fallback.models:
        if model_label(model) in tried or not model_allowed(model, settings.models.allowed):
            continue
        if attempt.breaker_open(model):
            continue
        return Plan(reason=f"model fallback after {error.kind.value} on {attempt.model}", model=model)
    return None
