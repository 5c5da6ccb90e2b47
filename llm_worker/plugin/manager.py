"""One typed facade over pluggy: loading, blocking, checking and calling plugins.

Built-in plugins are published under the ``llm_worker`` entry-point group by
this distribution, exactly like third-party ones, so that they are listed,
blocked and ordered the same way. A manager belongs to one process: the
``WorkerContext`` its ``worker_started`` gets, and the plugins' state on that
context's stash, goes to every hook called after it that asks for ``worker``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
from msgspec import Struct

from llm_worker.plugin import spec as hookspecs
from llm_worker.plugin.providers import Provider
from llm_worker.protocol.jobs import Answer, Decoded, ErrorKind, JobError, RequestRejected
from llm_worker.settings.config import Settings, load_section

if TYPE_CHECKING:
    from llm_worker.plugin.attempts import Attempt, Plan
    from llm_worker.plugin.context import WorkerContext
    from llm_worker.protocol.records import Record

log = logging.getLogger("llm_worker.plugins")

# Built-ins, in the order they register: the Ollama provider first, so that
# every other provider (asked in reverse order) claims its models before it.
BUILTINS = (
    "ollama",
    "openai",
    "limits",
    "content",
    "fallback_timeout",
    "fallback_memory",
    "fallback_model",
    "stats",
    "events",
    "audit",
)
DISABLE_ENV = "LLM_WORKER_DISABLE_PLUGINS"
EXTRA_ENV = "LLM_WORKER_PLUGINS"  # modules to load without an entry point, like pytest's -p
# Hooks the manager calls one implementation at a time, so that a failure names
# its plugin: pluggy's wrappers cannot wrap such a call.
CALLED_ONE_BY_ONE = (
    "llm_worker_worker_started",
    "llm_worker_fallback",
    "llm_worker_filter_request",
    "llm_worker_filter_response",
    "llm_worker_record",
)


class PluginStartError(Exception):
    """A plugin's ``llm_worker_worker_started`` raised; the message names each plugin that did."""


class NotStarted(Exception):
    """A hook asked for ``worker`` in a plugin manager whose ``worker_started`` was never called."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # the distribution and version it comes from
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class Found:
    """A plugin found and imported, not yet registered anywhere."""

    name: str
    plugin: object
    source: str


def discover(disabled: set[str] | None = None) -> list[Found]:
    """Find and import every plugin: the entry-point group, then LLM_WORKER_PLUGINS.

    Built-ins come first, in BUILTINS order, then third-party plugins by name:
    registration order is what pluggy reverses to call providers, so a
    third-party provider is asked before the built-in catch-all.

    The supervisor calls this once before it forks, so workers inherit the
    imported modules and boot fast; each worker then registers them in a
    plugin manager of its own and calls their hooks after fork.
    """
    disabled = _disabled() if disabled is None else disabled
    points = {ep.name: ep for ep in entry_points(group=hookspecs.PROJECT) if ep.name not in disabled}
    out: list[Found] = []
    for name in BUILTINS:
        if name in disabled:
            continue
        ep = points.pop(name, None)
        if ep is not None:
            out.append(Found(name, ep.load(), _source(ep)))
        else:  # a source tree that was never installed: the same built-in, imported directly
            out.append(Found(name, importlib.import_module(f"llm_worker.plugins.{name}"), "llm-worker (source tree)"))
    for name, ep in sorted(points.items()):
        out.append(Found(name, ep.load(), _source(ep)))
    names = {found.name for found in out}
    for module in filter(None, (m.strip() for m in os.environ.get(EXTRA_ENV, "").split(","))):
        if module in disabled or module in names:
            continue
        plugin = importlib.import_module(module)
        twin = next((found for found in out if found.plugin is plugin), None)
        if twin is not None:  # an installed plugin's module named again: register it once, as installed
            log.info(f"{EXTRA_ENV}: {module} is already loaded as plugin {twin.name!r} ({twin.source})")
            continue
        out.append(Found(module, plugin, EXTRA_ENV))
        names.add(module)
    return out


def _source(ep: Any) -> str:
    dist = ep.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class PluginManager:
    """The plugins of one process; build a new one per process (and per test)."""

    def __init__(self, disabled: set[str] | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}
        self._complained: dict[str, float] = {}
        self._worker: WorkerContext | None = None  # this process's, once worker_started gave it
        self.disabled = _disabled() if disabled is None else disabled
        for name in self.disabled:
            self._pm.set_blocked(name)

    def load(self, found: list[Found] | None = None) -> PluginManager:
        """Register plugins (``discover()``'s, unless given), then check every hook name."""
        for plugin in found if found is not None else discover(self.disabled):
            if plugin.name not in self.disabled and not self._pm.has_plugin(plugin.name):
                self.register(plugin.plugin, plugin.name, plugin.source)
        self._pm.check_pending()
        return self

    def register(self, plugin: object, name: str, source: str = "registered in code") -> None:
        self._pm.register(plugin, name)
        for hook in CALLED_ONE_BY_ONE:
            if any(
                impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
                for impl in getattr(self._pm.hook, hook).get_hookimpls()
            ):
                self._pm.unregister(plugin)
                raise pluggy.PluginValidationError(
                    plugin,
                    f"plugin {name!r}: {hook} cannot be a wrapper (wrapper=True or hookwrapper=True): "
                    "llm-worker calls it one plugin at a time; make it a plain @hookimpl",
                )
        self._sources[name] = source

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)
        self._sources.pop(name, None)

    def plugins(self) -> list[PluginInfo]:
        out = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:
                continue
            hooks = tuple(sorted(h.name for h in self._pm.get_hookcallers(plugin) or ()))
            out.append(PluginInfo(name, self._sources.get(name, "registered in code"), hooks))
        return out

    # ---- one typed method per hook ---------------------------------------

    def worker_started(self, worker: WorkerContext) -> None:
        """Start every plugin; if any raised, raise PluginStartError naming them once all were called.

        The caller decides: a worker does not boot, the HTTP process and the
        model manager log it and go on with the plugins that started. Either
        way ``worker`` is this process's from now on: the hooks called after
        this get it, with what each plugin put on ``worker.stash``.
        """
        self._worker = worker
        failed: list[tuple[str, Exception]] = []
        for impl in self._in_call_order("llm_worker_worker_started"):
            try:
                impl.function(**self._args(impl))
            except Exception as exc:
                failed.append((impl.plugin_name, exc))
        if failed:
            why = "; ".join(f"plugin {name!r} raised {exc!r}" for name, exc in failed)
            raise PluginStartError(why) from failed[0][1]

    def settings_sections(self) -> list[tuple[str, type]]:
        """Each plugin's own sections of settings (``llm_worker_settings``), with the plugin's name."""
        return [
            (impl.plugin_name, section)
            for impl in self._in_call_order("llm_worker_settings")
            for section in impl.function() or ()
        ]

    def check_settings(self, environ: Mapping[str, str] | None = None) -> list[tuple[str, Struct]]:
        """Read every plugin's settings from ``environ``; a bad one raises SettingError naming it."""
        return [(name, load_section(section, environ)) for name, section in self.settings_sections()]

    def providers(self, settings: Settings) -> list[Provider]:
        # pluggy calls the most recently registered plugin first, so a
        # third-party provider is asked before the built-in catch-all.
        results = self._pm.hook.llm_worker_providers(settings=settings)
        return [provider for batch in results for provider in batch]

    def fallback(self, job: Decoded, error: JobError, attempt: Attempt) -> Plan | None:
        """The first strategy's plan; a strategy that raises is logged and passed over."""
        for impl in self._in_call_order("llm_worker_fallback"):
            try:
                plan = impl.function(**self._args(impl, job=job, error=error, attempt=attempt))
            except Exception:
                self._complain(impl.plugin_name, "fallback strategy")
                continue
            if plan is not None:
                return plan
        return None

    def filter_request(self, job: Decoded) -> None:
        self._filter("llm_worker_filter_request", "request filter", job=job)

    def filter_response(self, job: Decoded, result: Answer) -> None:
        self._filter("llm_worker_filter_response", "response filter", job=job, result=result)

    def record(self, event: Record) -> None:
        """Give an event to every sink; a sink that raises never fails the job."""
        for impl in self._in_call_order("llm_worker_record"):
            try:
                impl.function(**self._args(impl, event=event))
            except Exception:
                self._complain(impl.plugin_name, "metric sink")

    # ---- calling plugins one by one, so a failure names its plugin --------

    def _filter(self, hook: str, role: str, **kwargs: Any) -> None:
        for impl in self._in_call_order(hook):
            try:
                impl.function(**self._args(impl, **kwargs))
            except RequestRejected:
                raise
            except Exception as exc:
                log.warning(f"{role} {impl.plugin_name} failed", exc_info=True)
                raise JobError(f"{role} plugin {impl.plugin_name!r} failed: {exc!r}", ErrorKind.UNKNOWN) from exc

    def _args(self, impl: Any, **available: Any) -> dict[str, Any]:
        """The arguments an implementation asked for (a hookimpl may take any subset), ``worker`` among them."""
        if "worker" in impl.argnames and self._worker is None:
            raise NotStarted(
                f"{impl.plugin_name} asks for `worker`, but this plugin manager's worker_started never ran"
            )
        available["worker"] = self._worker
        return {name: available[name] for name in impl.argnames}

    def _in_call_order(self, hook: str) -> list[Any]:
        # pluggy keeps implementations in reverse call order (tryfirst last).
        return list(reversed(getattr(self._pm.hook, hook).get_hookimpls()))

    def _complain(self, plugin: str, role: str) -> None:
        """Log a failing plugin at most once a minute: a broken sink must not flood the log."""
        now = time.monotonic()
        if now - self._complained.get(plugin, -math.inf) >= 60:
            self._complained[plugin] = now
            log.error(f"{role} {plugin} raised; carrying on (logged at most once a minute)", exc_info=True)
