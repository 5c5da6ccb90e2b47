"""Request limits and the model allow-list, as a request filter.

MAX_PROMPT_LENGTH (all messages of a chat, prompt and system of a generate,
each input of an embeddings request), MAX_MESSAGES, MAX_EMBEDDING_INPUTS,
MAX_BATCH_REQUESTS, MAX_NUM_PREDICT and MAX_NUM_CTX; and ALLOWED_MODELS. A job
over a limit is refused with a validation error naming the field. Option
types and ranges (temperature 0..2, top_p 0..1, ...) are checked earlier, when
the job is decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import ChatRequest, Decoded, EmbeddingsRequest, RequestRejected, model_allowed
from llm_worker.settings.config import Settings

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext


@hookimpl
def llm_worker_filter_request(job: Decoded, worker: WorkerContext) -> None:
    check(job, worker.settings)


def check(job: Decoded, settings: Settings) -> None:
    """Raise RequestRejected when the job breaks a limit of ``settings``."""
    limits = settings.limits
    if job.job.type == "batch" and len(job.tasks) > limits.max_batch_requests:
        raise RequestRejected(
            f"batch of {len(job.tasks)} requests is over MAX_BATCH_REQUESTS "
            f"({limits.max_batch_requests}) - at `$.request.requests`"
        )
    for task in job.tasks:
        path, request = task.path, task.request
        if not model_allowed(task.model, settings.models.allowed):
            raise RequestRejected(f"model {task.model!r} is not in ALLOWED_MODELS - at `{task.model_path}`")
        if isinstance(request, EmbeddingsRequest):
            inputs = request.inputs()
            if len(inputs) > limits.max_embedding_inputs:
                raise RequestRejected(
                    f"{len(inputs)} inputs is over MAX_EMBEDDING_INPUTS ({limits.max_embedding_inputs}) - at "
                    f"`{path}.input`"
                )
            longest = max(len(text) for text in inputs)
            if longest > limits.max_prompt_length:
                raise RequestRejected(
                    f"an input of {longest} characters is over MAX_PROMPT_LENGTH ({limits.max_prompt_length}) - "
                    f"at `{path}.input`"
                )
        else:
            if isinstance(request, ChatRequest) and len(request.messages) > limits.max_messages:
                raise RequestRejected(
                    f"{len(request.messages)} messages is over MAX_MESSAGES ({limits.max_messages}) - at "
                    f"`{path}.messages`"
                )
            chars = request.prompt_chars()
            if chars > limits.max_prompt_length:
                raise RequestRejected(
                    f"prompt of {chars} characters is over MAX_PROMPT_LENGTH ({limits.max_prompt_length}) - at `{path}`"
                )
        options = request.options
        if options is not None:
            if options.num_predict is not None and options.num_predict > limits.max_num_predict:
                raise RequestRejected(
                    f"num_predict {options.num_predict} is over MAX_NUM_PREDICT ({limits.max_num_predict}) - at "
                    f"`{path}.options.num_predict`"
                )
            if options.num_ctx is not None and options.num_ctx > limits.max_num_ctx:
                raise RequestRejected(
                    f"num_ctx {options.num_ctx} is over MAX_NUM_CTX ({limits.max_num_ctx}) - at "
                    f"`{path}.options.num_ctx`"
                )
