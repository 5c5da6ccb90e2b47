"""Fallback on a timeout: try once more with reduced parameters.

Half the num_predict (from 512 when the job set none) and half the num_ctx
(from 4096), not below 16 tokens and 512 of context: a shorter answer within
the job's time is worth more than none. Once per job; embeddings are left alone.
"""

from __future__ import annotations

from llm_worker.attempts import Attempt, Plan
from llm_worker.hookspecs import hookimpl
from llm_worker.jobs import EmbeddingsRequest, ErrorKind, JobError


@hookimpl(tryfirst=True)
def llm_worker_fallback(error: JobError, attempt: Attempt) -> Plan | None:
    if error.kind is not ErrorKind.TIMEOUT or attempt.reduced or attempt.task is None:
        return None
    request = attempt.task.request
    if isinstance(request, EmbeddingsRequest):
        return None
    options = request.options
    num_predict = options.num_predict if options is not None and options.num_predict and options.num_predict > 0 else 512
    num_ctx = options.num_ctx if options is not None and options.num_ctx else 4096
    return Plan(reason="timeout: reduced parameters",
                options={"num_predict": max(16, num_predict // 2), "num_ctx": max(512, num_ctx // 2)})
