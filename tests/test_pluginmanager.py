"""The plugin manager: starting plugins one by one, their state per process, refusing wrappers, loading once."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pluggy
import pytest
import redis
import testplugins
import urllib3
from support import events, eventually

from llm_worker import hookimpl
from llm_worker.host.shm import SharedState
from llm_worker.plugin.context import StashKey, WorkerContext
from llm_worker.plugin.manager import (
    CALLED_ONE_BY_ONE,
    EXTRA_ENV,
    Found,
    PluginManager,
    PluginStartError,
    discover,
)
from llm_worker.plugins import content
from llm_worker.protocol import jobs
from llm_worker.protocol.jobs import Answer, ErrorKind, JobError, RequestRejected
from llm_worker.protocol.records import COMPLETED, Record
from llm_worker.settings import config
from llm_worker.settings.config import Settings

TESTS = Path(__file__).parent


class Starts:
    """A plugin that notes the roles of the processes it started in."""

    def __init__(self) -> None:
        self.roles: list[str] = []

    @hookimpl
    def llm_worker_worker_started(self, worker: WorkerContext) -> None:
        self.roles.append(worker.role)


class FailsToStart:
    def __init__(self, why: str) -> None:
        self.why = why

    @hookimpl
    def llm_worker_worker_started(self) -> None:
        raise RuntimeError(self.why)


def context(role: str, settings: Settings | None = None) -> WorkerContext:
    return WorkerContext(
        settings or Settings(),
        "test:1",
        role,
        "llm-chat" if role == "worker" else None,  # type: ignore[arg-type]
        SharedState(1),
        0 if role == "worker" else None,
    )


def llm_worker_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(TESTS), **env}
    return subprocess.run(
        [sys.executable, "-m", "llm_worker.cli", *args], env=environ, capture_output=True, text=True, timeout=60
    )


# ---- llm_worker_worker_started, one plugin at a time ------------------------------------


def test_a_plugin_that_fails_to_start_is_named_and_the_plugins_after_it_still_start() -> None:
    # Given a plugin that raises, registered last and so called first
    starts = Starts()
    plugins = PluginManager(disabled=set())
    plugins.load([Found("starts", starts, "test"), Found("broken", FailsToStart("no licence"), "test")])
    # When a process starts its plugins
    with pytest.raises(PluginStartError) as caught:
        plugins.worker_started(context("http"))
    # Then the error names the plugin, and the one called after it started anyway
    assert str(caught.value) == "plugin 'broken' raised RuntimeError('no licence')"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert starts.roles == ["http"]


def test_every_plugin_that_fails_to_start_is_named() -> None:
    plugins = PluginManager(disabled=set()).load(
        [Found("one", FailsToStart("bad port"), "test"), Found("two", FailsToStart("no token"), "test")]
    )
    with pytest.raises(
        PluginStartError,
        match=r"plugin 'two' raised RuntimeError\('no token'\); "
        r"plugin 'one' raised RuntimeError\('bad port'\)",
    ):
        plugins.worker_started(context("worker"))


def test_tryfirst_and_trylast_order_the_start() -> None:
    order: list[str] = []
    late = SimpleNamespace(llm_worker_worker_started=hookimpl(trylast=True)(lambda: order.append("late")))
    early = SimpleNamespace(llm_worker_worker_started=hookimpl(tryfirst=True)(lambda: order.append("early")))
    plain = SimpleNamespace(llm_worker_worker_started=hookimpl(lambda: order.append("plain")))
    PluginManager(disabled=set()).load(
        [Found("early", early, "test"), Found("late", late, "test"), Found("plain", plain, "test")]
    ).worker_started(context("worker"))
    assert order == ["early", "plain", "late"]


def test_a_worker_whose_plugin_fails_to_start_stops_the_supervisor_naming_the_plugin(service) -> None:  # type: ignore[no-untyped-def]
    svc = service(
        ready=False,
        WORKER_POOLS="llm-chat=1",
        LLM_WORKER_PLUGINS="testplugins_start",
        TESTPLUGINS_START_RAISES_IN="worker",
        WORKER_BOOT_RETRIES="2",
    )
    assert svc.wait(60) == 3
    log = svc.tail(200)
    assert "workers cannot boot" in log
    assert "plugin 'testplugins_start' raised RuntimeError('no licence for the worker process')" in log


def test_the_http_process_starts_the_built_ins_after_a_plugin_that_failed_to_start(service, r: redis.Redis) -> None:  # type: ignore[no-untyped-def]
    # Given a plugin that raises as the HTTP process and the model manager start it
    svc = service(
        WORKER_POOLS="llm-chat=1",
        LLM_WORKER_PLUGINS="testplugins_start",
        TESTPLUGINS_START_RAISES_IN="http,models",
        ADMIN_TOKEN="t0ken",
    )
    # When an operator forces a breaker open over HTTP
    forced = urllib3.request(
        "POST", svc.url + "/admin/breakers/force-open?key=ollama:llama3.2", headers={"Authorization": "Bearer t0ken"}
    )
    assert forced.status == 200
    # Then the built-in events sink, started after it in the HTTP process, publishes the transition
    eventually(lambda: events(r, "llm.breaker.opened"), what="the breaker event from the HTTP process")
    log = svc.tail(400)
    assert "plugin 'testplugins_start' raised RuntimeError('no licence for the http process')" in log
    assert "plugin 'testplugins_start' raised RuntimeError('no licence for the models process')" in log


# ---- a plugin's state: one object per process, on its context's stash ------------------------

SEEN = StashKey[list[str]]()


class Stashes:
    """Keeps what it sees on the stash of the process that started it, as a plugin with state does."""

    @hookimpl
    def llm_worker_worker_started(self, worker: WorkerContext) -> None:
        worker.stash[SEEN] = [worker.role]

    @hookimpl
    def llm_worker_filter_request(self, worker: WorkerContext) -> None:
        worker.stash[SEEN].append("request")

    @hookimpl
    def llm_worker_filter_response(self, worker: WorkerContext) -> None:
        worker.stash[SEEN].append("response")

    @hookimpl
    def llm_worker_fallback(self, worker: WorkerContext) -> None:
        worker.stash[SEEN].append("fallback")

    @hookimpl
    def llm_worker_record(self, worker: WorkerContext) -> None:
        worker.stash[SEEN].append("record")


def a_job(settings: Settings, prompt: str = "Why is the sky blue?") -> jobs.Decoded:
    job = {
        "id": "job-1",
        "type": "chat",
        "userId": "user-1",
        "request": {"messages": [{"role": "user", "content": prompt}]},
    }
    return jobs.decode(msgspec.json.encode(job), settings)


def a_record() -> Record:
    return Record(COMPLETED, "test:1", "2026-01-01T00:00:00.000Z", outcome="completed")


def test_every_hook_gets_the_context_its_process_started_with_and_two_managers_keep_apart() -> None:
    # Given one plugin loaded in two plugin managers of one process (the HTTP process has two)
    plugin = Stashes()
    http, worker = context("http"), context("worker")
    first = PluginManager(disabled=set()).load([Found("stashes", plugin, "test")])
    second = PluginManager(disabled=set()).load([Found("stashes", plugin, "test")])
    first.worker_started(http)
    second.worker_started(worker)
    # When each calls every hook that can take `worker`
    job = a_job(Settings())
    for plugins in (first, second):
        plugins.filter_request(job)
        plugins.filter_response(job, Answer(response={}, model="m"))
        plugins.fallback(job, JobError("x", ErrorKind.PROVIDER), None)  # type: ignore[arg-type]
        plugins.record(a_record())
    # Then each hook found the state its own manager's start put on its own context
    assert http.stash[SEEN] == ["http", "request", "response", "fallback", "record"]
    assert worker.stash[SEEN] == ["worker", "request", "response", "fallback", "record"]


def test_a_built_in_filter_keeps_its_settings_per_process_not_per_module() -> None:
    # Given the content filter started in two plugin managers, with different BLOCKED_PATTERNS
    strict = config.load({"ENABLE_CONTENT_FILTERING": "true", "BLOCKED_PATTERNS": "sky"}).settings
    relaxed = config.load({"ENABLE_CONTENT_FILTERING": "false", "MAX_RESPONSE_LENGTH": "3"}).settings
    guarded = PluginManager(disabled=set()).load([Found("content", content, "test")])
    lenient = PluginManager(disabled=set()).load([Found("content", content, "test")])
    guarded.worker_started(context("worker", strict))
    lenient.worker_started(context("worker", relaxed))  # started last: a module global would now rule both
    # Then each filters with the settings it started with
    with pytest.raises(RequestRejected, match="BLOCKED_PATTERNS entry 'sky'"):
        guarded.filter_request(a_job(strict))
    lenient.filter_request(a_job(relaxed))
    answer = Answer(response={"response": "Because of Rayleigh scattering"}, model="m")
    lenient.filter_response(a_job(relaxed), answer)
    assert answer.response == {"response": "Bec", "doneReason": "length"}


def test_a_hook_that_asks_for_worker_before_its_process_started_the_plugins_fails_naming_it() -> None:
    plugins = PluginManager(disabled=set()).load([Found("stashes", Stashes(), "test")])
    with pytest.raises(
        JobError, match=r"request filter plugin 'stashes' failed: NotStarted\(.*worker_started never ran"
    ):
        plugins.filter_request(a_job(Settings()))


# ---- wrappers are refused where the manager calls one plugin at a time ----------------------


@pytest.mark.parametrize("hook", CALLED_ONE_BY_ONE)
@pytest.mark.parametrize("kind", ["wrapper", "hookwrapper"])
def test_a_wrapper_of_a_hook_called_one_plugin_at_a_time_is_refused_at_load(hook: str, kind: str) -> None:
    def wrap() -> Any:
        return (yield)

    plugin = SimpleNamespace(**{hook: hookimpl(**{kind: True})(wrap)})
    plugins = PluginManager(disabled=set())
    with pytest.raises(pluggy.PluginValidationError, match=f"plugin 'wrapping': {hook} cannot be a wrapper"):
        plugins.load([Found("wrapping", plugin, "test")])
    assert "wrapping" not in [info.name for info in plugins.plugins()]


def test_a_wrapper_of_the_providers_hook_is_pluggys_and_allowed() -> None:
    seen: list[int] = []

    @hookimpl(wrapper=True)
    def llm_worker_providers() -> Any:
        providers = yield
        seen.append(len(providers))
        return providers

    plugins = PluginManager(disabled=set())
    plugins.load(
        [
            Found("testplugins", testplugins, "test"),
            Found("counting", SimpleNamespace(llm_worker_providers=llm_worker_providers), "test"),
        ]
    )
    assert [p.name for p in plugins.providers(Settings())] == ["crasher"] and seen == [1]


def test_start_up_refuses_a_wrapped_sink_naming_the_plugin_and_the_hook(tmp_path: Path) -> None:
    (tmp_path / "wrapped_sink.py").write_text(
        "from llm_worker import hookimpl\n\n\n"
        "@hookimpl(wrapper=True)\n"
        "def llm_worker_record(event):\n"
        "    return (yield)\n"
    )
    proc = llm_worker_cli("plugins", LLM_WORKER_PLUGINS="wrapped_sink", PYTHONPATH=str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "plugin 'wrapped_sink': llm_worker_record cannot be a wrapper" in proc.stderr


# ---- an installed plugin's module named again in LLM_WORKER_PLUGINS --------------------------


def test_an_installed_plugins_module_named_in_llm_worker_plugins_is_loaded_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(EXTRA_ENV, "llm_worker.plugins.audit,testplugins")
    with caplog.at_level(logging.INFO, logger="llm_worker.plugins"):
        found = discover(disabled=set())
    names = [f.name for f in found]
    assert names.count("audit") == 1 and "llm_worker.plugins.audit" not in names and "testplugins" in names
    assert "llm_worker.plugins.audit is already loaded as plugin 'audit'" in caplog.text
    loaded = [info.name for info in PluginManager(disabled=set()).load(found).plugins()]
    assert loaded.count("audit") == 1 and "testplugins" in loaded


def test_llm_worker_plugins_lists_an_installed_plugin_once_when_its_module_is_named_again() -> None:
    proc = llm_worker_cli("plugins", LLM_WORKER_PLUGINS="llm_worker.plugins.audit")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert names.count("audit") == 1 and "llm_worker.plugins.audit" not in names
