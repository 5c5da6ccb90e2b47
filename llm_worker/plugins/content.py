"""Content rules, as filters: BLOCKED_PATTERNS on prompts, MAX_RESPONSE_LENGTH on answers.

With ENABLE_CONTENT_FILTERING on, a job whose prompt text matches one of the
BLOCKED_PATTERNS regular expressions is refused, and the reason says which
pattern matched (not the text that matched it). Generated text longer than
MAX_RESPONSE_LENGTH characters is cut to it, with doneReason ``length``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llm_worker.plugin.context import StashKey
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import Answer, Decoded, RequestRejected

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

# BLOCKED_PATTERNS, compiled once per process; absent with ENABLE_CONTENT_FILTERING off.
PATTERNS = StashKey[list[re.Pattern[str]]]()


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    filters = worker.settings.filters
    if filters.content_filtering:
        worker.stash[PATTERNS] = [re.compile(p) for p in filters.blocked_patterns]


@hookimpl
def llm_worker_filter_request(job: Decoded, worker: WorkerContext) -> None:
    patterns = worker.stash.get(PATTERNS)
    if not patterns:
        return
    text = job.prompt_text()
    for pattern in patterns:
        if pattern.search(text):
            raise RequestRejected(f"prompt matches BLOCKED_PATTERNS entry {pattern.pattern!r}")


@hookimpl
def llm_worker_filter_response(result: Answer, worker: WorkerContext) -> None:
    cut(result, worker.settings.filters.max_response_length)


def cut(result: Answer, limit: int) -> None:
    """Shorten the generated text of ``result`` to ``limit`` characters, in place."""
    response = result.response
    message = response.get("message")
    if isinstance(message, dict) and len(message.get("content") or "") > limit:
        message["content"] = message["content"][:limit]
        response["doneReason"] = "length"
    elif isinstance(response.get("response"), str) and len(response["response"]) > limit:
        response["response"] = response["response"][:limit]
        response["doneReason"] = "length"
