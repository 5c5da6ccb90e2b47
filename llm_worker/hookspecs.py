"""The plugin contract: every hook llm-worker calls, documented for plugin authors.

A plugin is a module or object with functions marked ``@llm_worker.hookimpl``
and named after the specs below, published under the entry-point group
``llm_worker`` (see docs/plugins.md). Hooks run in each worker process, after
fork, so a plugin may open connections in them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from llm_worker.config import Settings
    from llm_worker.providers import Provider

PROJECT = "llm_worker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


@hookspec
def llm_worker_providers(settings: Settings) -> list[Provider]:
    """Return the providers this plugin offers, built from ``settings``.

    Called once in each worker process when it boots (and again after HUP).
    A job's model goes to the first provider whose ``serves(model)`` is true;
    plugins registered later are asked first, so a third-party provider can
    claim models before the built-in Ollama provider (which serves every model).

    :param settings: the host's settings, read-only.
    :return: a list of objects implementing ``llm_worker.providers.Provider``;
        an empty list when the plugin has nothing to offer with these settings.
    """
