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


class PluginManager:
    """The plugins of one process; build a new one per process (and per test)."""

    def __init__(self, disabled: set[str] | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._sources: dict[str, str] = {}
        if disabled is None:
            disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        self.disabled = disabled
        for name in disabled:
            self._pm.set_blocked(name)

    def load(self) -> PluginManager:
        """Register every plugin of the entry-point group, then check the hooks."""
        found = set()
        for ep in entry_points(group=hookspecs.PROJECT):
            found.add(ep.name)
            if ep.name in self.disabled or self._pm.has_plugin(ep.name):
                continue
            dist = ep.dist
            source = f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"
            self.register(ep.load(), ep.name, source)
        # Running from a source tree that was never installed: the built-ins
        # still register, under the same names, so behaviour does not change.
        for name in BUILTINS:
            if name not in found and name not in self.disabled:
                self.register(importlib.import_module(f"llm_worker.plugins.{name}"), name, "llm-worker (source tree)")
        for module in filter(None, (m.strip() for m in os.environ.get(EXTRA_ENV, "").split(","))):
            if module not in self.disabled and not self._pm.has_plugin(module):
                self.register(importlib.import_module(module), module, f"{EXTRA_ENV}")
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
