"""A streaming job's chunk channel: ``llm:stream:<id>``, appended to as the provider's text arrives."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from llm_worker.queue.reliable import STREAM_MAXLEN

log = logging.getLogger("llm_worker.worker")


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

    def __call__(self, text: str, thinking: str = "") -> None:
        # A thinking model's reasoning rides in its own field, so that a reader that
        # knows only "content" never mixes it into the answer (an addition to PROTOCOL.md).
        self._add(
            {"event": "chunk", "content": text, "thinking": thinking}
            if thinking
            else {"event": "chunk", "content": text}
        )

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
            log.warning(
                "stream chunks are not reaching Redis; the result will carry the text", extra={"error": str(exc)}
            )
