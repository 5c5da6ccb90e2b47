"""llm-worker: runs LLM jobs from Redis queues on GPU hosts, next to Ollama.

The import package is deliberately small at the top: plugin authors need
``hookimpl`` and ``RequestRejected``; everything else lives in its own room
(``llm_worker.settings.config``, ``llm_worker.queue.reliable``, ``llm_worker.supervisor``, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"

from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.jobs import RequestRejected

__all__ = ["__version__", "hookimpl", "RequestRejected"]
