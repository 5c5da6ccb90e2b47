"""Run a validated job against the providers: chat, generate, embeddings, batch.

Everything here raises JobError (ProviderError is one) for a failure the
result should report; what to do about it (retry, dead-letter) is decided by
the finisher, not here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from llm_worker.jobs import ChatRequest, Decoded, EmbeddingsRequest, ErrorKind, GenerateRequest, JobError, Result, Task, iso
from llm_worker.providers import Deadline, OnChunk, Provider
from llm_worker.queue import STREAM_MAXLEN

log = logging.getLogger("llm_worker.worker")


@dataclass
class Answer:
    """What a job produced, before it becomes a Result."""

    response: dict[str, Any]
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    fallback_used: bool = False
    cache_hit: bool = False

    @property
    def tokens(self) -> int | None:
        if self.prompt_tokens is None and self.completion_tokens is None:
            return None
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)


@dataclass
class StreamSink:
    """Appends a streaming job's chunks to ``llm:stream:<id>`` as they arrive.

    The stream's last entry (done or error) is written with the result, in the
    finish script, so it cannot disagree with it. A job run again after its
    worker died first appends ``{"event": "reset"}``: a reader drops the text
    it has and starts over (an addition to PROTOCOL.md, see docs/protocol.md).
    """

    client: redis.Redis
    key: str
    ttl: int
    published: int = 0
    broken: bool = field(default=False)

    def open(self) -> None:
        if self.client.exists(self.key):
            self._add({"event": "reset"})

    def __call__(self, text: str) -> None:
        self._add({"event": "chunk", "content": text})

    def _add(self, entry: dict[str, str]) -> None:
        if self.broken:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.xadd(self.key, entry, maxlen=STREAM_MAXLEN, approximate=True)
            if self.published == 0:
                pipe.expire(self.key, self.ttl)
            pipe.execute()
            self.published += 1
        except redis.RedisError as exc:
            # The whole text is in the result; a reader of the stream sees a gap
            # rather than the job failing for want of its chunk channel.
            self.broken = True
            log.warning("stream chunks are not reaching Redis; the result will carry the text", extra={"error": str(exc)})


class Executor:
    """Routes each model call to the first provider that serves its model."""

    def __init__(self, providers: list[Provider]) -> None:
        self.providers = providers

    def provider_for(self, model: str) -> Provider:
        for provider in self.providers:
            if provider.serves(model):
                return provider
        raise JobError(f"no provider serves model {model!r}", ErrorKind.MODEL)

    def run(self, decoded: Decoded, deadline: Deadline, sink: StreamSink | None) -> Answer:
        if decoded.job.type == "batch":
            return self._batch(decoded, deadline)
        return self.run_task(decoded.tasks[0], deadline, sink)

    def run_task(self, task: Task, deadline: Deadline, on_chunk: OnChunk | None) -> Answer:
        provider = self.provider_for(task.model)
        request = task.request
        if isinstance(request, EmbeddingsRequest):
            options: dict[str, Any] = {}
            if request.truncate is not None:
                options["truncate"] = request.truncate
            if request.keep_alive is not None:
                options["keep_alive"] = request.keep_alive
            if request.options is not None:
                options["options"] = request.options
            vectors = provider.embed(task.model, request.inputs(), deadline, options)
            return Answer({"embeddings": vectors.vectors}, vectors.model or task.model, vectors.prompt_tokens, None)
        if isinstance(request, ChatRequest):
            done = provider.chat(task.model, request, deadline, on_chunk)
            response = {"message": done.message or {"role": "assistant", "content": done.text}, "doneReason": done.done_reason}
        else:
            assert isinstance(request, GenerateRequest)
            done = provider.generate(task.model, request, deadline, on_chunk)
            response = {"response": done.text, "doneReason": done.done_reason}
        return Answer(response, done.model or task.model, done.prompt_tokens, done.completion_tokens)

    def _batch(self, decoded: Decoded, deadline: Deadline) -> Answer:
        """Run a batch's requests in order; each gets its own result.

        One failed request fails only its own entry. When every request failed
        in a way worth retrying (the provider is down), the whole batch is
        retried instead of answering with nothing but failures.
        """
        job = decoded.job
        results: list[Result] = []
        errors: list[JobError] = []
        prompt = completion = 0
        for index, task in enumerate(decoded.tasks):
            started = time.monotonic()
            sub_id = f"{job.id}:{index}"
            try:
                answer = self.run_task(task, deadline, None)
            except JobError as exc:
                errors.append(exc)
                results.append(Result(job_id=sub_id, success=False, error=exc.message, error_type=exc.kind.value,
                                      model=task.model, requested_model=task.model, correlation_id=job.correlation_id,
                                      processing_time=_ms(time.monotonic() - started), completed_at=iso()))
                continue
            prompt += answer.prompt_tokens or 0
            completion += answer.completion_tokens or 0
            results.append(Result(job_id=sub_id, success=True, response=answer.response, model=answer.model,
                                  requested_model=task.model, tokens_used=answer.tokens, prompt_tokens=answer.prompt_tokens,
                                  completion_tokens=answer.completion_tokens, correlation_id=job.correlation_id,
                                  processing_time=_ms(time.monotonic() - started), completed_at=iso()))
        if errors and len(errors) == len(results) and all(e.retryable for e in errors):
            raise errors[0]
        return Answer({"results": results}, decoded.model, prompt, completion)


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))
