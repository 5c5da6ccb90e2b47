"""Fallback on a timeout: try once more asking for a shorter answer.

Half the job's num_predict, or 256 tokens when it set none (Ollama's own
default is no limit): a shorter answer within the job's time is worth more
than none. Load-time options such as num_ctx are left alone: changing them
would make Ollama reload the model, the slowest thing it does (and the
provider pins them to MODEL_LOAD_OPTIONS anyway). Once per job; embeddings,
and jobs that already ask for a single token, are left alone.
"""

from __future__ import annotations

from llm_worker.plugin.attempts import Attempt, Plan
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import EmbeddingsRequest, ErrorKind, JobError

UNSET_NUM_PREDICT = 256  # what a job that set no num_predict is cut to


@hookimpl(tryfirst=True)
def llm_worker_fallback(error: JobError, attempt: Attempt) -> Plan | None:
    if error.kind is not ErrorKind.TIMEOUT or attempt.reduced or attempt.task is None:
        return None
    request = attempt.task.request
    if isinstance(request, EmbeddingsRequest):
        return None
    options = request.options
    asked = options.num_predict if options is not None and options.num_predict and options.num_predict > 0 else None
    shorter = UNSET_NUM_PREDICT if asked is None else asked // 2
    if shorter < 1:
        return None  # nothing left to cut: let the next strategy (or the retry) have it
    return Plan(reason=f"timeout: asking for at most {shorter} tokens", options={"num_predict": shorter})
