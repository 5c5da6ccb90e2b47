"""Content rules, as filters: BLOCKED_PATTERNS on prompts, MAX_RESPONSE_LENGTH on answers.

With ENABLE_CONTENT_FILTERING on, a job whose prompt text matches one of the
BLOCKED_PATTERNS regular expressions is refused, and the reason says which
pattern matched (not the text that matched it). Generated text longer than
MAX_RESPONSE_LENGTH characters is cut to it, with doneReason ``length``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import Answer, Decoded, RequestRejected
from llm_worker.settings.config import Settings

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

_settings: Settings | None = None
_patterns: list[re.Pattern[str]] = []


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    global _settings, _patterns
    _settings = worker.settings
    filters = worker.settings.filters
    _patterns = [re.compile(p) for p in filters.blocked_patterns] if filters.content_filtering else []


@hookimpl
def llm_worker_filter_request(job: Decoded) -> None:
    if not _patterns:
        return
    text = job.prompt_text()
    for pattern in _patterns:
        if pattern.search(text):
            raise RequestRejected(f"prompt matches BLOCKED_PATTERNS entry {pattern.pattern!r}")


@hookimpl
def llm_worker_filter_response(result: Answer) -> None:
    if _settings is None:
        return
    cut(result, _settings.filters.max_response_length)


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
