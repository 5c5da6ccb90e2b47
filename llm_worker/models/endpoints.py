"""Several Ollama servers, one model manager: which preloads each takes, and a thread for each.

One process manages every Ollama of OLLAMA_BASE_URL, each with a
``ModelManager`` of its own on a thread of its own: a two-minute load, or an
Ollama that does not answer, holds up only its own endpoint. The process is
ready (``models_ready``) once every endpoint has tried its preloads. A thread
that dies takes the process with it, as a single manager would: the
supervisor starts a new one.

Preloads are spread, not copied: each model of MODEL_PRELOAD_LIST goes to the
endpoint that has it loaded already, else to the one with the fewest models so
far (ties: the first). A model in demand on more than one endpoint is loaded
there by the jobs' own routing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn, Protocol

from llm_worker.host.stats import model_label
from llm_worker.plugin.providers import Deadline, ProviderError

if TYPE_CHECKING:
    from llm_worker.host.shm import SharedState
    from llm_worker.plugins.ollama import OllamaProvider
    from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.models.manager")
TICK = 0.05  # seconds between looks at the load board


class Manager(Protocol):
    """What ``drive`` runs: one endpoint's ``ModelManager``."""

    name: str

    def start(self) -> None: ...

    def serve_loads(self) -> None: ...

    def turn(self) -> None: ...


def place_preloads(settings: Settings, providers: list[OllamaProvider], timeout: float) -> list[list[str]]:
    """Each endpoint's share of MODEL_PRELOAD_LIST, in the order of ``providers``; ``timeout``: for each /api/ps."""
    m = settings.models
    wanted = m.preload if m.preload_enabled else []
    if len(providers) == 1:
        return [list(wanted)]
    with ThreadPoolExecutor(len(providers)) as pool:
        loaded = list(pool.map(lambda provider: _loaded_labels(provider, timeout), providers))
    return spread(wanted, loaded)


def spread(models: list[str], loaded: list[set[str] | None]) -> list[list[str]]:
    """Place each model on one endpoint: where it is loaded, else the one holding fewest; None: did not answer.

    Endpoints that did not answer take none while another did (theirs would
    only fail and wait); when none answered, all share them.
    """
    answered = [i for i, labels in enumerate(loaded) if labels is not None] or list(range(len(loaded)))
    count = {i: len(loaded[i] or ()) for i in answered}
    out: list[list[str]] = [[] for _ in loaded]
    for model in dict.fromkeys(models):
        label = model_label(model)
        holder = next((i for i in answered if label in (loaded[i] or ())), None)
        if holder is None:
            holder = min(answered, key=lambda i: (count[i], i))
            count[holder] += 1
        out[holder].append(model)
    return out


def _loaded_labels(provider: OllamaProvider, timeout: float) -> set[str] | None:
    try:
        return {model_label(m.name) for m in provider.running(Deadline(timeout))}
    except ProviderError:
        return None


def drive(
    managers: list[Manager],
    state: SharedState,
    interval: float,
    chore: Callable[[], None] | None = None,
    every: float = 1.0,
) -> NoReturn:
    """Run each endpoint's manager on its own thread; mark the host's models ready once all preloaded. Never returns.

    ``chore`` runs on this (the main) thread every ``every`` seconds: the host's
    part that no one endpoint owns (publishing what the host holds, models/fleet.py).
    Raises what a manager's thread died of (a SystemExit with its exit code included).
    """
    ended: queue.Queue[BaseException] = queue.Queue()
    started = [threading.Event() for _ in managers]
    for manager, event in zip(managers, started):
        threading.Thread(
            target=_run, args=(manager, event, ended, interval), daemon=True, name=f"manager-{manager.name}"
        ).start()
    ready = False
    next_chore = time.monotonic()
    while True:
        try:
            failure: BaseException | None = ended.get(timeout=TICK)
        except queue.Empty:
            failure = None
        if failure is not None:
            raise failure
        if chore is not None and time.monotonic() >= next_chore:
            chore()
            next_chore = time.monotonic() + every
        if not ready and all(event.is_set() for event in started):
            state.header.models_ready = 1
            ready = True


def _run(manager: Manager, started: threading.Event, ended: queue.Queue[BaseException], interval: float) -> None:
    """One endpoint's manager: preload, then serve loads and turn every MODEL_MANAGER_INTERVAL."""
    try:
        manager.start()
        started.set()
        next_turn = time.monotonic() + interval
        while True:
            manager.serve_loads()
            if time.monotonic() >= next_turn:
                manager.turn()
                next_turn = time.monotonic() + interval
            time.sleep(TICK)
    except BaseException as exc:  # the process's main thread raises it: the supervisor sees the manager die
        if not isinstance(exc, SystemExit):
            log.exception(f"the model manager of {manager.name} failed")
        ended.put(exc)
