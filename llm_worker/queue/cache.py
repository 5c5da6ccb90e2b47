"""The response cache: answers to deterministic requests, kept in Redis for identical ones.

A request is deterministic when it asks for temperature 0 or gives a seed
(and every embeddings request is). Its key is a hash of the provider, the
model, the job type and the request as validated (every field, in a fixed
order), so two requests share an answer only when nothing in them differs.
RESPONSE_CACHE_TTL=0 turns it off.
"""

from __future__ import annotations

import hashlib
import logging

import msgspec
import redis

from llm_worker.protocol.jobs import Answer, EmbeddingsRequest, Task
from llm_worker.queue.keys import Keys

log = logging.getLogger("llm_worker.worker")
_encode = msgspec.json.Encoder().encode


class Cached(msgspec.Struct, array_like=True):
    response: dict  # type: ignore[type-arg]
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None


class ResponseCache:
    def __init__(self, client: redis.Redis, prefix: str, ttl: int) -> None:
        self.redis = client
        self._key = Keys(prefix, dead_letter="").cache  # the cache has no use for the dead-letter list
        self.ttl = ttl

    def key_of(self, provider: str, task: Task) -> str | None:
        """The cache key of a call, or None when its answer may differ from one time to the next."""
        if self.ttl <= 0:
            return None
        request = task.request
        if not isinstance(request, EmbeddingsRequest):
            options = request.options
            if options is None or (options.temperature != 0 and options.seed is None) or request.stream:
                return None
        digest = hashlib.sha256(
            b"\0".join([provider.encode(), task.model.encode(), task.type.encode(), _encode(request)])
        )
        return self._key(digest.hexdigest())

    def get(self, key: str) -> Answer | None:
        try:
            blob = self.redis.get(key)
        except redis.RedisError as exc:  # a cache that cannot answer is a miss, not a failure
            log.debug("response cache unreachable", extra={"error": str(exc)})
            return None
        if blob is None:
            return None
        try:
            hit = msgspec.json.decode(blob, type=Cached)
        except msgspec.MsgspecError:
            return None
        return Answer(hit.response, hit.model, hit.prompt_tokens, hit.completion_tokens, cache_hit=True)

    def put(self, key: str, answer: Answer) -> None:
        try:
            self.redis.set(
                key,
                _encode(Cached(answer.response, answer.model, answer.prompt_tokens, answer.completion_tokens)),
                ex=self.ttl,
            )
        except redis.RedisError as exc:
            log.debug("response cache unreachable", extra={"error": str(exc)})
