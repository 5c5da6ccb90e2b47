"""The plugin contract: every hook llm-worker calls, documented for plugin authors.

A plugin is a module or object with functions marked ``@llm_worker.hookimpl``
and named after the specs below, published under the entry-point group
``llm_worker`` (see docs/plugins.md). A hook implementation may take any
subset of a spec's parameters, by name.

The supervisor imports every plugin once, before it forks, and checks that
each hook it implements exists here (a misspelled hook stops start-up).
Hooks run in the worker processes, after fork, one job at a time;
``llm_worker_worker_started``, ``llm_worker_providers`` and the sinks also run
in the HTTP process and in the model manager process. Do not start threads or
open connections at import time: do it in ``llm_worker_worker_started``.

Keep what a process opens on an object in its ``worker.stash``, never in a
module global: ``llm_worker_worker_started(worker)`` puts it there under a
``StashKey`` of the plugin's own, and every hook but ``llm_worker_providers``
may take the same ``worker`` and read it back::

    SOCKET = StashKey[socket.socket]()

    @hookimpl
    def llm_worker_worker_started(worker: WorkerContext) -> None:
        worker.stash[SOCKET] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @hookimpl
    def llm_worker_record(event: Record, worker: WorkerContext) -> None:
        sock = worker.stash.get(SOCKET)  # None where this process did not start the plugin

llm-worker calls every hook but ``llm_worker_providers`` one plugin at a time,
so that a failure names its plugin: a ``wrapper=True`` or ``hookwrapper=True``
implementation of one of them is refused when plugins load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from llm_worker.plugin.attempts import Attempt, Plan
    from llm_worker.plugin.context import WorkerContext
    from llm_worker.plugin.providers import Provider
    from llm_worker.protocol.jobs import Answer, Decoded, JobError
    from llm_worker.protocol.records import Record
    from llm_worker.settings.config import Settings

PROJECT = "llm_worker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@hookspec
def llm_worker_settings() -> list[type]:
    """Return the sections of settings this plugin reads from the environment with ``load_section``.

    Called by ``llm-worker run`` before anything forks, and by ``llm-worker
    check-config``: each section is read from the environment, and a bad value
    stops start-up with exit code 2 and the variable, the value and what is
    allowed, as a bad core setting does; ``check-config`` prints each one,
    secrets masked. A section is a ``msgspec.Struct`` whose fields are
    declared as ``Settings``' are, ``Annotated[int, env("MY_TIMEOUT", "doc",
    ge=1)] = 30``; the plugin reads it again where it needs it
    (``load_section(MySettings)`` in ``llm_worker_providers``, say).

    :return: the section structs, each once; an empty list for none.
    """


# --------------------------------------------------------------------------
# Life of a process
# --------------------------------------------------------------------------


@hookspec
def llm_worker_worker_started(worker: WorkerContext) -> None:
    """Prepare for work in this process: open connections, read settings.

    Called once in each worker process when it has booted, before its first
    job, and once in the HTTP process and in the model manager process. Every
    plugin is called, even after one raised; then an error naming each plugin
    that raised stops the worker from booting (and, repeated, the supervisor),
    while the HTTP process and the model manager log it and go on. Fail here
    rather than on every job.

    :param worker: the process's identity and settings: ``worker.settings``,
        ``worker.worker_id`` (``<WORKER_ID>:<pid>``), ``worker.queue`` (None
        outside workers), ``worker.role`` ("worker", "http" or "models"); and
        ``worker.stash``, where the plugin keeps what it opens for this
        process (``worker.stash[KEY] = state``). The later hooks get the same
        ``worker``.
    """


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


@hookspec
def llm_worker_providers(settings: Settings) -> list[Provider]:
    """Return the providers this plugin offers, built from ``settings``.

    Called once in each worker process when it boots (and again after HUP),
    in the HTTP process (whose sampler probes the provider's health and
    models) and in the model manager process (role "models"). A job's model
    goes to the first provider whose ``serves(model)`` is true; plugins
    registered later are asked first, so a third-party provider can claim
    models before the built-in Ollama provider (which serves every model).

    :param settings: the host's settings, read-only.
    :return: a list of objects implementing ``llm_worker.plugin.providers.Provider``;
        an empty list when the plugin has nothing to offer with these settings.
    """


# --------------------------------------------------------------------------
# Fallbacks
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def llm_worker_fallback(job: Decoded, error: JobError, attempt: Attempt, worker: WorkerContext) -> Plan | None:
    """Say what to try after a model call failed, or None to let the failure stand.

    Called after every failed attempt while the job has attempts and time
    left, for errors worth a fallback (not validation errors). An open
    circuit breaker is one of them: ``error`` is then a
    ``llm_worker.host.breaker.BreakerOpen``. Strategies are asked in turn (those
    marked ``tryfirst`` first) and the first Plan wins: stops at the first
    non-None result. The built-ins: reduce parameters once on a timeout,
    unload idle models once on out-of-memory, then the next of FALLBACK_MODELS.

    :param job: the job, as validated and filtered (``job.job``: its fields;
        ``job.tasks``: the calls it makes).
    :param error: the failure, with ``error.kind`` (an ``ErrorKind``) and
        ``error.message``; a ``ProviderError`` also has ``.status``.
    :param attempt: the attempt that failed: its number and the job's budget,
        the model, the models already tried, the seconds left, and
        ``attempt.breaker_open(model)``.
    :param worker: this process's context, as ``llm_worker_worker_started``
        got it: ``worker.stash[KEY]`` is what the plugin put there.
    :return: a ``llm_worker.plugin.attempts.Plan`` (another model, overridden
        options, unload idle models first), or None.
    """


# --------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------


@hookspec
def llm_worker_filter_request(job: Decoded, worker: WorkerContext) -> None:
    """Check or change a job before it runs.

    Called for every job after validation, before its first attempt, each
    time the job is taken: a retried job (``job.job.retry_count`` > 0) is
    filtered again, and so is a job handed back by a worker that died or
    stopped. A filter that counts quota must not count such a job twice (key
    the count on ``job.job.id``). Change a call by assigning
    ``job.tasks[i].model`` or ``job.tasks[i].request`` (or their fields).
    Refuse the job by raising ``llm_worker.RequestRejected(reason)``: it
    fails with errorType ``validation`` and that reason, and is not retried.
    Any other exception fails the job too, with an error naming this plugin.

    :param worker: this process's context, as ``llm_worker_worker_started``
        got it: ``worker.settings``, and ``worker.stash[KEY]`` for the
        plugin's own state.
    """


@hookspec
def llm_worker_filter_response(job: Decoded, result: Answer, worker: WorkerContext) -> None:
    """Check or change a job's answer before it is written.

    Called once per successful job (and once per request of a batch), before
    its result is written. Change ``result.response`` in place; refuse it by
    raising ``llm_worker.RequestRejected(reason)``. Any other exception fails
    the job with an error naming this plugin. A streaming job's chunks were
    already sent: what its reader saw cannot be redacted here.

    :param result: the answer: ``result.response`` (the result's response
        object), ``result.model``, ``result.text``, token counts.
    :param worker: this process's context, as for ``llm_worker_filter_request``.
    """


# --------------------------------------------------------------------------
# Metric sinks
# --------------------------------------------------------------------------


@hookspec
def llm_worker_record(event: Record, worker: WorkerContext) -> None:
    """Receive one job, model or breaker event.

    Called in the process where the event happened, after it happened (a
    job's outcome after its result was written). Every sink gets every event.
    A sink must be quick: it runs on the job path. A sink that raises is
    logged (at most once a minute per plugin) and the job goes on.

    :param event: a ``llm_worker.protocol.records.Record``: ``event.type`` (e.g.
        ``llm.request.completed``, ``llm.breaker.opened``), ``event.data`` as
        published on the ``llm:events`` stream, and typed fields (job id,
        queue, job type, model, outcome, duration, tokens, ...).
    :param worker: this process's context, as ``llm_worker_worker_started``
        got it: ``worker.stash[KEY]`` is the connection or counters the
        plugin opened there (absent where it opened none).
    """
