"""The plugin author's one import: everything a provider, fallback strategy, filter or metric sink needs.

A plugin is a module (or object) with ``@hookimpl`` functions, published under
the ``llm_worker`` entry-point group of its package::

    [options.entry_points]
    llm_worker =
        my_sink = my_package.sink

or named in ``LLM_WORKER_PLUGINS`` for one host. The hooks, when each is
called and what it returns, are in ``llm_worker.plugin.spec``; the guide with a
working module per hook is docs/plugins.md. A minimal metric sink::

    from llm_worker.plugin import COMPLETED, Record, hookimpl

    @hookimpl
    def llm_worker_record(event: Record) -> None:
        if event.type == COMPLETED:
            print(event.model, event.duration)

Keep per-process state on an object in the process's stash, not in module
globals: ``llm_worker_worker_started(worker)`` is called once in each process
and puts it there, and the other hooks take ``worker`` to read it back::

    COUNTS = StashKey[Counter[str]]()

    @hookimpl
    def llm_worker_worker_started(worker: WorkerContext) -> None:
        worker.stash[COUNTS] = Counter()

    @hookimpl
    def llm_worker_record(event: Record, worker: WorkerContext) -> None:
        worker.stash[COUNTS][event.type] += 1

A provider plugin reads its own settings as the core declares its own, so that
a bad value stops start-up naming the variable, the value and what is allowed
(``env``, ``load_section`` and the ``llm_worker_settings`` hook), and speaks
HTTP through ``JsonHttp``, which keeps the job's deadline and turns every
failure into a ``ProviderError`` (``events`` reads Server-Sent Events,
``retry_after_seconds`` a ``Retry-After`` header, ``wait_from_headers`` a
429's headers). ``llm_worker/plugins/anthropic.py`` and ``openrouter.py`` are
two providers written on this module alone.
"""

from llm_worker.host.shm import SharedState
from llm_worker.plugin.attempts import Attempt, Plan
from llm_worker.plugin.context import Stash, StashKey, WorkerContext
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.openai_shapes import ToolCalls, ollama_tool_call, openai_content, openai_messages
from llm_worker.plugin.providers import (
    INCOMPLETE,
    Completion,
    Deadline,
    Embeddings,
    Health,
    Incomplete,
    ModelInfo,
    OnChunk,
    Provider,
    ProviderError,
    RateLimited,
    endpoint_names,
)
from llm_worker.plugin.ratelimit import retry_after_seconds, wait_from_headers
from llm_worker.plugin.spec import hookimpl
from llm_worker.plugin.transport import JsonHttp, Response, ServerSentEvent, sse_events
from llm_worker.protocol.jobs import (
    Answer,
    ChatRequest,
    Decoded,
    EmbeddingsRequest,
    ErrorKind,
    GenerateRequest,
    JobError,
    Message,
    RequestRejected,
)
from llm_worker.protocol.records import (
    BREAKER_CLOSED,
    BREAKER_HALF_OPEN,
    BREAKER_OPENED,
    COMPLETED,
    DEAD_LETTERED,
    FAILED,
    MODEL_LOADED,
    MODEL_LOADING,
    MODEL_UNLOADED,
    PARKED,
    RETRIED,
    STARTED,
    Record,
)
from llm_worker.settings.config import SettingError, Settings, load_section
from llm_worker.settings.sections import env

__all__ = [
    "hookimpl",
    # the process a hook runs in, and the plugins' state in it
    "WorkerContext",
    "Stash",
    "StashKey",
    "Settings",
    # a plugin's own settings, read from the environment and checked at start (the llm_worker_settings hook)
    "env",
    "load_section",
    "SettingError",
    # providers
    "Provider",
    "Completion",
    "Embeddings",
    "ModelInfo",
    "Health",
    "Deadline",
    "OnChunk",
    "ProviderError",
    "RateLimited",
    "retry_after_seconds",
    "wait_from_headers",
    "Incomplete",
    "INCOMPLETE",
    # speaking HTTP to a provider's API
    "JsonHttp",
    "Response",
    "ServerSentEvent",
    "sse_events",
    # OpenAI's chat-completions shapes, for OpenAI-compatible APIs
    "openai_messages",
    "openai_content",
    "ollama_tool_call",
    "ToolCalls",
    "endpoint_names",
    # jobs, errors and fallbacks
    "Decoded",
    "ChatRequest",
    "GenerateRequest",
    "EmbeddingsRequest",
    "Answer",
    "ErrorKind",
    "JobError",
    "RequestRejected",
    "Attempt",
    "Plan",
    # metric sinks
    "Record",
    "STARTED",
    "COMPLETED",
    "FAILED",
    "RETRIED",
    "DEAD_LETTERED",
    "PARKED",
    "MODEL_LOADING",
    "MODEL_LOADED",
    "MODEL_UNLOADED",
    "BREAKER_OPENED",
    "BREAKER_HALF_OPEN",
    "BREAKER_CLOSED",
    # testing a plugin as the service calls it (for a provider, the simulator: llm_worker.devtools.simulator)
    "PluginManager",
    "Found",
    "SharedState",
    "Message",
]
