"""One typed facade over pluggy: loading, blocking, checking and calling plugins.

Built-in plugins are published under the ``llm_worker`` entry-point group by
this distribution, exactly like third-party ones, so that they are listed,
blocked and ordered the same way.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from llm_worker import hookspecs
from llm_worker.config import Settings
from llm_worker.providers import Provider

BUILTINS = ("ollama",)
DISABLE_ENV = "LLM_WORKER_DISABLE_PLUGINS"
EXTRA_ENV = "LLM_WORKER_PLUGINS"  # modules to load without an entry point, like pytest's -p


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

    The supervisor calls this once before it forks, so workers inherit the
    imported modules and boot fast; each worker then registers them in a
    plugin manager of its own and calls their hooks after fork.
    """
    disabled = _disabled() if disabled is None else disabled
    out: list[Found] = []
    names: set[str] = set()
    for ep in entry_points(group=hookspecs.PROJECT):
        if ep.name in disabled or ep.name in names:
            continue
        dist = ep.dist
        source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
        out.append(Found(ep.name, ep.load(), source))
        names.add(ep.name)
    # Running from a source tree that was never installed: the built-ins
    # still register, under the same names, so behaviour does not change.
    for name in BUILTINS:
        if name not in names and name not in disabled:
            out.append(Found(name, importlib.import_module(f"llm_worker.plugins.{name}"), "llm-worker (source tree)"))
            names.add(name)
    for module in filter(None, (m.strip() for m in os.environ.get(EXTRA_ENV, "").split(","))):
        if module not in disabled and module not in names:
            out.append(Found(module, importlib.import_module(module), EXTRA_ENV))
            names.add(module)
    return out


def _disabled() -> set[str]:
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


class PluginManager:
    """The plugins of one process; build a new one per process (and per test)."""

    def __init__(self, disabled: set[str] | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}
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

    def providers(self, settings: Settings) -> list[Provider]:
        # pluggy calls the most recently registered plugin first, so a
        # third-party provider is asked before the built-in catch-all.
        results = self._pm.hook.llm_worker_providers(settings=settings)
        return [provider for batch in results for provider in batch]
