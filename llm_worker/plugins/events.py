"""The event stream of PROTOCOL.md, as a metric sink: every event onto ``llm:events``.

Entries are ``{type, data}`` with ``data`` as JSON, trimmed to about 100,000
entries. Writes do not wait for Redis's reply (see queue.DeferredEvents): an
event costs the job no round trip. A job's outcome is written before its
event, so a reader of the stream never sees an event for an outcome that did
not happen; if the worker dies in between, that one event is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llm_worker.plugin.context import StashKey
from llm_worker.plugin.spec import hookimpl
from llm_worker.protocol.records import Record
from llm_worker.queue.connection import connect
from llm_worker.queue.keys import Keys
from llm_worker.queue.reliable import DeferredEvents, Event

if TYPE_CHECKING:
    from llm_worker.plugin.context import WorkerContext

SENDER = StashKey[DeferredEvents]()  # this process's own Redis connection, opened after fork


@hookimpl
def llm_worker_worker_started(worker: WorkerContext) -> None:
    settings = worker.settings
    keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
    worker.stash[SENDER] = DeferredEvents(connect(settings), keys.events)


@hookimpl
def llm_worker_record(event: Record, worker: WorkerContext) -> None:
    sender = worker.stash.get(SENDER)
    if sender is not None:
        sender.send(Event(event.type, event.data))
