"""A provider plugin that only tests load (LLM_WORKER_PLUGINS=testplugins_ratelimit).

Models ``ratelimit-*`` stream a piece of their answer, then are rate limited:
as a gateway in front of a provider may cut a stream that is already running.
"""

from __future__ import annotations

from llm_worker.plugin import RateLimited, hookimpl


class MidStreamRateLimiter:
    name = "midstream"

    def serves(self, model: str) -> bool:
        return model.startswith("ratelimit-")

    def chat(self, model, request, deadline, on_chunk):  # type: ignore[no-untyped-def]
        if on_chunk is not None:
            on_chunk("Hello")
        raise RateLimited("rate limit reached mid-stream", retry_after=1.0)

    generate = chat

    def embed(self, model, inputs, deadline, options=None):  # type: ignore[no-untyped-def]
        raise RateLimited("rate limit reached", retry_after=1.0)

    def models(self):  # type: ignore[no-untyped-def]
        return []

    def health(self, timeout):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def close(self) -> None:
        pass


@hookimpl
def llm_worker_providers(settings):  # type: ignore[no-untyped-def]
    return [MidStreamRateLimiter()]
