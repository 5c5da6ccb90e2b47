"""The model manager: the one process that loads and unloads models (role "models").

A child of the supervisor, like the HTTP process, so that slow calls to Ollama
(a pull, a two-minute load) stall nothing else. Workers never decide about
models; they say in shared memory which model each busy worker holds on which
endpoint (``Slot.model``, ``Slot.provider``) and when each model was last used
there (the load board's ``last_used``).

Each Ollama of OLLAMA_BASE_URL (one per GPU, say) is an endpoint with models
of its own, and gets a ``ModelManager`` of its own, on a thread of its own
(endpoints.py): its cache size, idle unloads, memory, loads and loader thread
are its own, so a slow load or a dead server on one holds up no other. All
that follows is per endpoint.

At start it pulls the preloaded models Ollama lacks (MODEL_AUTO_PULL), loads
MODEL_PRELOAD_LIST, then sets ``models_ready``: readiness waits for the
attempt, not its success, and a failed preload is tried again on later turns.
From then on it is also the host's only loader (see loadboard.py): a worker
whose model is not resident asks on the board, and a loader thread loads it
once, under OLLAMA_MODEL_LOAD_TIMEOUT, whatever the asking jobs' deadlines;
room is made first (MODEL_CACHE_SIZE), so that Ollama never has to evict on
its own terms (the model with the shortest keep_alive, server/sched.go).
Every MODEL_MANAGER_INTERVAL it reads what Ollama has (/api/tags) and has
loaded (/api/ps, the truth: Ollama also evicts on its own), pulls the allowed
models still missing, and unloads (see modelpolicy.py): models unused for
MODEL_UNLOAD_TIMEOUT, the least recently used past MODEL_CACHE_SIZE, and,
while GPU (or host) memory is past MODEL_MEMORY_THRESHOLD, the least recently
used until it is not. Each load and unload is a log line, an llm.model.*
event for the sinks and a count in shared memory.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from llm_worker import exitcodes, logs
from llm_worker.host.backoff import compute_backoff
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import MAX_LOADED, MODEL_NAME_BYTES, SlotState
from llm_worker.host.loadboard import ASKED, DEMAND, PRELOAD, UNSERVED, WHY, LoadBoard
from llm_worker.host.procs import exit_with_parent, worker_id
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.models import endpoints as several
from llm_worker.models import fleet
from llm_worker.models import policy as modelpolicy
from llm_worker.models.policy import Loaded
from llm_worker.models.pullprogress import PullProgress
from llm_worker.plugin.context import WorkerContext
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Deadline, ProviderError, endpoint_of
from llm_worker.plugins.ollama import LoadOptionsRefused, OllamaProvider
from llm_worker.protocol import records
from llm_worker.protocol.jobs import ErrorKind, iso
from llm_worker.protocol.records import Record
from llm_worker.queue.connection import connect
from llm_worker.queue.keys import Keys
from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.models.manager")
ASK_TIMEOUT = 10.0  # /api/tags, /api/ps and an unload: quick answers, or Ollama is in trouble
PULL_TIMEOUT = 6 * 3600.0  # a whole pull; a stalled one fails sooner, after OLLAMA_TIMEOUT without a byte
RETRY_CAP = 300.0  # longest wait between two tries of a failed preload or pull
DRAIN_POLL = 0.05  # seconds between looks at a draining model's calls


def run_manager(settings: Settings, state: SharedState, supervisor_pid: int, plugins: list[Found]) -> NoReturn:
    """The manager child's life: preload, then manage every MODEL_MANAGER_INTERVAL until the supervisor goes."""
    logs.setup(settings.log, role="models", workerId=settings.worker.id)
    threading.Thread(target=exit_with_parent, args=(supervisor_pid,), daemon=True, name="parent-watch").start()
    my_id = worker_id(settings.worker.id, os.getpid())
    manager = PluginManager().load(plugins)
    try:
        manager.worker_started(WorkerContext(settings, my_id, "models", None, state, None))
    except Exception:
        log.exception("a plugin failed to start in the model manager; its sink may be silent here")
    providers = [p for p in manager.providers(settings) if isinstance(p, OllamaProvider)]
    if not providers:  # the Ollama plugin is disabled: there are no models to manage
        LoadBoard(state.loads).serve("")  # nor loads to wait for
        log.warning("no Ollama provider: the model manager has nothing to manage")
        state.header.models_ready = 1
        while True:
            time.sleep(3600)
    table = EndpointTable(state.providers, state.lock)
    recording = threading.Lock()  # the sinks are called from every endpoint's thread
    preloads = several.place_preloads(settings, providers, ASK_TIMEOUT)
    managers = [
        ModelManager(
            settings,
            state,
            provider,
            manager,
            my_id,
            endpoint=table.register(endpoint_of(provider), provider.name, provider.url),
            endpoints=len(providers),
            preloads=mine,
            recording=recording,
        )
        for provider, mine in zip(providers, preloads)
    ]
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
    duty = fleet.FleetDuty(settings, state, fleet.Fleet(client, keys, settings.worker.id), managers)
    several.drive(managers, state, settings.models.manage_interval / 1000, duty.share, fleet.PUBLISH_EVERY)


@dataclass(frozen=True)
class LoadOutcome:
    """What the loader thread hands back: one load, done or failed."""

    index: int
    model: str
    why: int
    seconds: float | None
    error: ProviderError | None


class ModelManager:
    """The models of one endpoint (one Ollama server): its preloads, loads, unloads and memory."""

    def __init__(
        self,
        settings: Settings,
        state: SharedState,
        provider: OllamaProvider,
        plugins: PluginManager,
        worker_id: str,
        *,
        endpoint: int = 0,
        endpoints: int = 1,
        preloads: list[str] | None = None,
        recording: threading.Lock | None = None,
    ) -> None:
        """``endpoint``: the server's index in the endpoint table; ``endpoints``: how many Ollama servers
        the host has; ``preloads``: this one's share of MODEL_PRELOAD_LIST (default: all of it)."""
        self.settings = settings
        self.state = state
        self.provider = provider
        self.plugins = plugins
        self.worker_id = worker_id
        self.endpoint = endpoint
        self.endpoints = endpoints
        self.name = endpoint_of(provider) if provider is not None else "ollama"
        self.recording = recording or threading.Lock()
        m = settings.models
        self.unload_after = m.unload_timeout / 1000
        if preloads is None:
            preloads = m.preload if m.preload_enabled else []
        self.preloads = _unique(preloads)
        self.first_seen: dict[str, float] = {}  # label -> when it was loaded, as near as we know
        self.surveyed = time.monotonic()  # the last look at /api/ps: what is new since was loaded after it
        self.surveyed_once = False  # what the first look finds was loaded before us (a respawn): not counted
        self.preloaded: dict[str, float] = {}  # label -> when we preloaded it
        self.retry_at: dict[str, tuple[float, int]] = {}  # a failed preload or pull -> (next try, tries so far)
        self.pulls: list[str] = []  # missing models to pull once ready
        self.available: set[str] = set()  # labels Ollama has, as last listed
        self.memory_acted = -float("inf")  # when memory pressure last made us unload
        self.memory_warned = False  # "no idle model to unload", said once while the pressure lasts
        self.complaint = ""  # the trouble last logged, so that an outage is one line, not one a turn
        self.board = LoadBoard(state.loads)
        self.block = state.loads.endpoints[endpoint]  # this endpoint's rows of the board
        self.asked_seen: dict[int, float] = {}  # model index -> the last request on the board we served
        self.loading: set[str] = set()  # labels the loader thread has in hand
        self.to_load: queue.Queue[tuple[int, str, int]] = queue.Queue()
        self.outcomes: queue.Queue[LoadOutcome] = queue.Queue()
        self.loader: threading.Thread | None = None
        self.demanded: queue.Queue[str] = queue.Queue()  # loads the fleet duty asks of this endpoint
        # The endpoint's thread and its loader thread both look at what is loaded and unload (the loader to
        # make room): one at a time, so that a stale /api/ps cannot mark a model just unloaded resident again.
        self.looking = threading.RLock()
        self.demand_failed: dict[str, float] = {}  # label -> when a load by demand last failed here (monotonic)

    # ---- start ---------------------------------------------------------------------

    def start(self) -> None:
        m = self.settings.models
        # From now on jobs wait for this manager's loads instead of loading through their own calls.
        self.board.serve(self.provider.name)
        self.board.forget_unfinished(self.endpoint)  # a load the previous manager began died with it
        # Asks older than a waiting job gives a manager (loadboard.UNSERVED) are not served: their jobs went
        # on without us or are gone, and loading each would evict models for nobody. Newer ones still wait.
        now = time.monotonic()
        for index, row in enumerate(self.block.rows):
            if now - row.asked > UNSERVED:
                self.asked_seen[index] = row.asked
        self.block.cache_size = self.cache_size()  # routing reads it: room for more models here
        for model in self.preloads:
            self.state.model_index(model_label(model), add=True)
        if m.auto_pull:
            self.pulls = self.missing(_unique([*m.preload, *m.allowed]))
            for model in [p for p in self.pulls if p in self.preloads]:
                self.pulls.remove(model)
                self.pull(model)
        try:  # a manager that was respawned finds its preloads loaded already
            loaded = {model_label(m.name) for m in self.provider.running(Deadline(ASK_TIMEOUT))}
        except ProviderError as exc:
            if self.preloads:
                log.error(f"cannot preload now, Ollama{self.on} does not answer: {exc.message}; trying again later")
            for model in self.preloads:
                self._retry_later(model)
        else:
            now = time.monotonic()
            for label in loaded:  # loaded before we started (a respawn): known, not counted as loads
                self.first_seen.setdefault(label, now)
            self.surveyed_once = True
            for model in self.preloads:
                if model_label(model) in loaded:
                    self.preloaded[model_label(model)] = self.first_seen[model_label(model)] = time.monotonic()
                    log.info(f"{model} is loaded already{self.on}", extra={"model": model, **self.where})
                else:
                    self.preload(model)
        log.info(
            f"models ready{self.on}",
            extra={"preloaded": sorted(self.preloaded), "failed": sorted(self.retry_at), **self.where},
        )

    @property
    def on(self) -> str:
        """Where, in log lines ("on ollama@2 (its URL)"), when the host has several Ollama servers; "" with one."""
        return f" on {self.name} ({self.provider.url})" if self.endpoints > 1 else ""

    @property
    def where(self) -> dict[str, str]:
        """The endpoint, for log lines and events, when the host has several Ollama servers."""
        return {"endpoint": self.name} if self.endpoints > 1 else {}

    def missing(self, models: list[str]) -> list[str]:
        try:
            self.refresh_available()
        except ProviderError:
            return list(models)  # Ollama unreachable: try them all, each pull says why it failed
        return [m for m in models if model_label(m) not in self.available]

    def pull(self, model: str) -> bool:
        log.info(f"pulling {model}{self.on}", extra={"model": model, **self.where})
        progress = PullProgress(
            lambda text, fields: log.info(f"pulling {model}{self.on}: {text}", extra={"model": model, **fields})
        )
        try:
            self.provider.pull(model, Deadline(PULL_TIMEOUT), progress)
        except ProviderError as exc:
            log.error(f"pulling {model}{self.on} failed: {exc.message}", extra={"model": model, **self.where})
            if exc.kind == ErrorKind.NETWORK:  # Ollama down: try again; a registry's "no such model" is final
                self._retry_later(model)
                self.pulls.append(model)
            return False
        self.retry_at.pop(model, None)
        return True

    def preload(self, model: str) -> bool:
        index = self._index(model_label(model))
        self._began(index, model, PRELOAD)
        try:
            seconds = self.provider.load(model, Deadline(self.settings.models.load_timeout / 1000), keep_alive=-1)
        except LoadOptionsRefused as exc:
            # Our settings check each option's type as Ollama v0.33 does; a server that
            # still refuses one is another version. Every load would fail the same way.
            log.critical(
                f"Ollama{self.on} refused {exc.setting} while preloading {model}: {exc.message}; fix {exc.setting}"
            )
            self._load_failed(LoadOutcome(index, model, PRELOAD, None, exc))
            raise SystemExit(exitcodes.USAGE) from None
        except Exception as exc:  # a ProviderError, or a bug: either way the row must not stay "loading"
            if not isinstance(exc, ProviderError):
                log.exception(f"preloading {model}{self.on} failed")
                exc = ProviderError(repr(exc), ErrorKind.UNKNOWN)
            self._load_failed(LoadOutcome(index, model, PRELOAD, None, exc))
            delay = self._retry_later(model)
            log.error(
                f"preloading {model}{self.on} failed: {exc.message}; trying again in {delay:.1f}s",
                extra={"model": model, **self.where},
            )
            return False
        self.retry_at.pop(model, None)
        self.preloaded[model_label(model)] = time.monotonic()
        self._loaded(LoadOutcome(index, model, PRELOAD, seconds, None))
        return True

    # ---- loads the workers ask for --------------------------------------------------

    def serve_loads(self) -> None:
        """Hand newly asked-for loads to the loader thread, and record the loads it finished."""
        while True:
            try:
                outcome = self.outcomes.get_nowait()
            except queue.Empty:
                break
            self.loading.discard(model_label(outcome.model))
            if outcome.error is None:
                self._loaded(outcome)
            else:
                self._load_failed(outcome)
        labels = self.state.model_labels()
        for index in range(1, len(labels)):
            row = self.block.rows[index]
            if row.asked <= self.asked_seen.get(index, 0.0) or row.started or row.resident:
                continue
            self.asked_seen[index] = row.asked
            self._start_load(index, labels[index], ASKED)
        while True:  # loads the fleet asked for (models/fleet.py), from the process's main thread
            try:
                label = self.demanded.get_nowait()
            except queue.Empty:
                break
            index = self._index(label)
            if index > 0 and not self.board.row(self.endpoint, index).started and label not in self.loading:
                self._start_load(index, label, DEMAND)

    def _start_load(self, index: int, label: str, why: int) -> None:
        """Make room, then hand the load to the loader thread."""
        self._make_room()
        self._began(index, label, why)
        self.loading.add(label)
        self.to_load.put((index, label, why))
        if self.loader is None:
            self.loader = threading.Thread(target=self._load_forever, daemon=True, name=f"loader-{self.name}")
            self.loader.start()

    def demand(self, label: str) -> None:
        """Load ``label`` here for parked jobs no host holds (any thread; the manager's own starts it)."""
        self.demanded.put(label)

    def _load_forever(self) -> None:
        """The loader thread: one load at a time, as Ollama's scheduler loads one at a time."""
        while True:
            index, model, why = self.to_load.get()
            try:
                self._room_for(model, Deadline(self.settings.models.load_timeout / 1000))
                seconds = self.provider.load(
                    model, Deadline(self.settings.models.load_timeout / 1000), keep_alive=self.provider.keep_alive
                )
            except ProviderError as exc:
                self.outcomes.put(LoadOutcome(index, model, why, None, exc))
            except Exception as exc:  # a bug must not leave the waiting jobs waiting for ever
                log.exception(f"loading {model}{self.on} failed")
                self.outcomes.put(LoadOutcome(index, model, why, None, ProviderError(repr(exc), ErrorKind.UNKNOWN)))
            else:
                self.outcomes.put(LoadOutcome(index, model, why, seconds, None))

    def _room_for(self, model: str, deadline: Deadline) -> None:
        """In the loader thread, before a load on a full endpoint: wait until a loaded model is idle, and unload it.

        Ollama evicts a busy model only once its requests stop, and every
        request of ours sets its keep_alive again (server/sched.go
        processPending, useLoadedRunner, v0.33): asked to load while each
        loaded model is busy, it would wait until one went idle for
        MODEL_UNLOAD_TIMEOUT. So the least recently used model is marked
        draining (the host takes no new jobs for it here: workerproc/affinity.py)
        until its calls end, and is unloaded then; the load goes ahead.
        """
        victim: Loaded | None = None
        try:
            while deadline.left() > 0:
                models = self.survey()
                if model_label(model) in {m.label for m in models} or len(models) < self.cache_size():
                    return
                idle = modelpolicy.evictable(models)
                if idle:
                    self.unload(idle[0], modelpolicy.CACHE_SIZE)
                    return
                now_victim = next((m for m in models if victim is not None and m.label == victim.label), None)
                if now_victim is not None and not now_victim.busy:  # its last call ended: it goes, protected or not
                    self.unload(now_victim, modelpolicy.CACHE_SIZE)
                    return
                if victim is None or now_victim is None:
                    if victim is not None:  # it went on its own: it drains no more
                        self.block.rows[self._index(victim.label)].draining = 0
                    # An idle model (one just preloaded, which evictable() spares) before a busy one.
                    victim = min(models, key=lambda m: (m.busy, m.last_used))
                    self.block.rows[self._index(victim.label)].draining = 1
                    log.info(
                        f"{victim.label}{self.on} drains to make room for {model_label(model)}",
                        extra={"model": victim.label, "for": model_label(model), **self.where},
                    )
                time.sleep(DRAIN_POLL)
        except ProviderError as exc:  # the load itself will say what is wrong
            log.warning(f"could not make room{self.on} for {model}: {exc.message}")
        finally:
            if victim is not None:
                self.block.rows[self._index(victim.label)].draining = 0

    def _make_room(self) -> None:
        """Before a load, unload the least recently used idle model past MODEL_CACHE_SIZE - 1."""
        try:
            models = self.survey()
            self.unload_all(modelpolicy.over_cache(models, self.cache_size() - 1), modelpolicy.CACHE_SIZE, models)
        except ProviderError as exc:  # the load itself will say what is wrong
            log.warning(f"could not make room{self.on} before a load: {exc.message}")

    def cache_size(self) -> int:
        """MODEL_CACHE_SIZE, or Ollama's own default, per endpoint (models/policy.py)."""
        return modelpolicy.cache_size(self.settings.models.cache_size, self.state.readings, self.endpoints)

    def _began(self, index: int, model: str, why: int) -> None:
        self.board.begin(self.endpoint, index, why)
        log.info(
            f"loading {model}{self.on} ({WHY[why]})",
            extra={"model": model_label(model), "reason": WHY[why], **self.where},
        )
        self._record(records.MODEL_LOADING, model_label(model), reason=WHY[why])

    def _loaded(self, outcome: LoadOutcome) -> None:
        self.board.succeeded(self.endpoint, outcome.index, outcome.seconds or 0.0)
        self._count_load(outcome.model, outcome.seconds, WHY[outcome.why])

    def _load_failed(self, outcome: LoadOutcome) -> None:
        assert outcome.error is not None
        self.board.failed(self.endpoint, outcome.index, outcome.error)
        label = model_label(outcome.model)
        if outcome.why == DEMAND:  # not again for a while: the jobs' own loads will say what is wrong
            self.demand_failed[label] = time.monotonic()
        log.error(
            f"loading {outcome.model}{self.on} failed: {outcome.error.message}",
            extra={"model": label, "reason": WHY[outcome.why], "errorType": outcome.error.kind.value, **self.where},
        )
        self._record(
            records.MODEL_LOAD_FAILED,
            label,
            reason=WHY[outcome.why],
            error=outcome.error.message,
            errorType=outcome.error.kind.value,
        )

    def _retry_later(self, model: str) -> float:
        tries = self.retry_at.get(model, (0.0, 0))[1] + 1
        delay = compute_backoff(tries, self.settings.models.manage_interval / 1000, cap=RETRY_CAP)
        self.retry_at[model] = (time.monotonic() + delay, tries)
        return delay

    # ---- every interval --------------------------------------------------------------

    def turn(self) -> None:
        """Retry what failed, then unload what should go. Never raises: the next turn tries again."""
        try:
            self.block.cache_size = self.cache_size()  # GPUs are counted by the sampler, maybe after our start
            self.refresh_available()
            self.retry_due()
            models = self.survey()
            now = time.monotonic()
            models = self.unload_all(modelpolicy.idle(models, now, self.unload_after), modelpolicy.IDLE, models)
            models = self.unload_all(modelpolicy.over_cache(models, self.cache_size()), modelpolicy.CACHE_SIZE, models)
            self.relieve_memory(models)
        except ProviderError as exc:
            self._complain(f"model manager: Ollama{self.on} unreachable: {exc.message}")
            return
        except Exception as exc:  # a bug must not end the manager; the next turn tries again
            if repr(exc) != self.complaint:
                log.exception("model manager turn failed")
            self.complaint = repr(exc)
            return
        if self.complaint:
            log.info(f"model manager back at work{self.on}")
            self.complaint = ""

    def refresh_available(self) -> None:
        self.available = {model_label(m.name) for m in self.provider.available(Deadline(ASK_TIMEOUT))}

    def retry_due(self) -> None:
        now = time.monotonic()
        for model in [p for p in self.pulls if self.retry_at.get(p, (0.0, 0))[0] <= now]:
            self.pulls.remove(model)
            if model_label(model) not in self.available:
                self.pull(model)
        for model in self.preloads:
            due = self.retry_at.get(model)
            if due is not None and due[0] <= now and model not in self.pulls:
                self.preload(model)

    def survey(self) -> list[Loaded]:
        """What Ollama has loaded now, with what shared memory says of its use."""
        with self.looking:
            return self._survey()

    def _survey(self) -> list[Loaded]:
        running = self.provider.running(Deadline(ASK_TIMEOUT))
        now = time.monotonic()
        # A worker's slot names the model and endpoint of the call it is in or bound for (-1 between calls).
        busy = {
            slot.model
            for slot in self.state.slots
            if slot.up() and slot.state == SlotState.BUSY and slot.model >= 0 and slot.provider == self.endpoint
        }
        self._publish(running)
        out = []
        resident = set()
        for info in running:
            label = model_label(info.name)
            index = self._index(label)
            resident.add(index)
            row = self.block.rows[index]
            if label not in self.first_seen and self.surveyed_once and label not in self.loading:
                # Loaded by a job's request (Ollama loads on demand), not by us: counted all the same.
                self._count_load(info.name, None, "on demand")
            if label not in self.first_seen or not row.slots:  # how many calls it serves at once, for other hosts
                row.slots = self.provider.slots_of(info)
            # A model new in /api/ps was loaded since the last look; its jobs may say it was used later.
            last_used = max(self.first_seen.setdefault(label, self.surveyed), row.last_used)
            preloaded = self.preloaded.get(label)
            protected = preloaded is not None and now - preloaded < self.unload_after
            out.append(Loaded(info.name, label, info.vram or info.size, last_used, index in busy, protected))
        for label in set(self.first_seen) - {m.label for m in out}:  # Ollama let it go on its own
            del self.first_seen[label]
        for index in range(1, self.state.header.model_count):  # what the workers may call without waiting
            self.board.set_resident(self.endpoint, index, index in resident)
        self.surveyed = now
        self.surveyed_once = True
        return out

    def _publish(self, running: list[Any]) -> None:
        """What Ollama has loaded, for /status, /metrics and routing (the manager writes these readings)."""
        block = self.block
        shown = running[:MAX_LOADED]
        for i, info in enumerate(shown):
            block.loaded_names[i].value = info.name.encode()[: MODEL_NAME_BYTES - 1]
            block.loaded_vram[i] = float(info.vram)
            block.loaded_bytes[i] = float(info.vram or info.size)
        block.loaded_count = len(shown)

    def unload_all(self, chosen: list[Loaded], reason: str, models: list[Loaded]) -> list[Loaded]:
        """Unload each of ``chosen``; return ``models`` without those that went."""
        gone = {m.name for m in chosen if self.unload(m, reason)}
        return [m for m in models if m.name not in gone]

    def relieve_memory(self, models: list[Loaded]) -> None:
        """Past the threshold, unload idle models, least recently used first, until under it or none is left."""
        threshold = self.settings.models.memory_threshold
        memory = modelpolicy.memory_in_use(self.state.readings)
        if memory is not None:  # this endpoint's part of it, with several
            everyone = sum(sum(b.loaded_bytes[: b.loaded_count]) for b in self.state.loads.endpoints)
            own = float(sum(m.bytes for m in models))
            memory = modelpolicy.endpoint_share(memory, own, max(everyone, own), self.endpoints)
        if memory is None or memory.ratio <= threshold:
            self.memory_warned = False
            return
        # GPU readings come from the sampler, every HOST_SAMPLE_INTERVAL: until it has
        # read them again, they still count the memory of the models we just unloaded.
        if (
            memory.source == "gpu"
            and time.monotonic() - self.memory_acted < 2 * self.settings.http.sample_interval / 1000
        ):
            return
        tried: set[str] = set()
        while memory.ratio > threshold:
            candidates = [m for m in modelpolicy.evictable(models) if m.name not in tried]
            if not candidates:
                if not self.memory_warned:
                    log.warning(
                        f"{memory.source} memory{self.on} at {memory.ratio:.0%}, past {threshold:.0%}, and no idle "
                        "model to unload",
                        extra={"loaded": [m.label for m in models], **self.where},
                    )
                self.memory_warned = True
                return
            victim = candidates[0]
            tried.add(victim.name)
            if not self.unload(victim, modelpolicy.MEMORY, memoryRatio=round(memory.ratio, 3)):
                continue
            self.memory_acted = time.monotonic()
            after = self.survey()  # what really went: Ollama may have let others go meanwhile
            still = {m.name for m in after}
            memory = memory.without(sum(m.bytes for m in models if m.name not in still))
            models = after

    # ---- loads and unloads, counted -------------------------------------------------------

    def unload(self, model: Loaded, reason: str, **why: Any) -> bool:
        with self.looking:
            return self._unload(model, reason, **why)

    def _unload(self, model: Loaded, reason: str, **why: Any) -> bool:
        idle_seconds = round(max(0.0, time.monotonic() - model.last_used), 1)
        try:
            self.provider.unload(model.name, Deadline(ASK_TIMEOUT))
        except ProviderError as exc:
            log.warning(
                f"unloading {model.name}{self.on} failed: {exc.message}",
                extra={"model": model.label, "reason": reason, **self.where},
            )
            return False
        index = self._index(model.label)
        self.block.rows[index].unloads += 1
        self.board.set_resident(self.endpoint, index, False)
        self.first_seen.pop(model.label, None)
        self.preloaded.pop(model.label, None)
        log.info(
            f"model unloaded: {model.label}{self.on} ({reason})",
            extra={"model": model.label, "reason": reason, "idleSeconds": idle_seconds, **why, **self.where},
        )
        self._record(records.MODEL_UNLOADED, model.label, reason=reason, idleSeconds=idle_seconds, **why)
        return True

    def _count_load(self, model: str, seconds: float | None, reason: str) -> None:
        """Count a load; ``seconds`` is None for one we only saw done (a job's request loaded it)."""
        label = model_label(model)
        index = self._index(label)
        if seconds is not None:  # our own load: it happened just now (the board has its seconds)
            self.first_seen[label] = time.monotonic()
        self.block.rows[index].loads += 1
        took = round(seconds, 3) if seconds is not None else None
        log.info(
            f"model loaded: {label}{self.on}" + (f" in {seconds:.2f}s" if seconds is not None else "") + f" ({reason})",
            extra={"model": label, "loadSeconds": took, "reason": reason, **self.where},
        )
        self._record(records.MODEL_LOADED, label, loadSeconds=took, reason=reason)

    def _record(self, kind: str, label: str, **data: Any) -> None:
        now = iso()
        body = {"model": label, "workerId": self.worker_id, "timestamp": now, **data, **self.where}
        with self.recording:  # each endpoint's thread records; a sink need not be thread-safe
            self.plugins.record(Record(kind, self.worker_id, now, body, model=label))

    def _index(self, label: str) -> int:
        # As the stats sink does: with ALLOWED_MODELS set, models outside it count as "other".
        add = not self.settings.models.allowed or label in {model_label(p) for p in self.preloads}
        return self.state.model_index(label, add=add)

    def _complain(self, trouble: str) -> None:
        if trouble != self.complaint:
            log.warning(trouble)
            self.complaint = trouble


def _unique(models: list[str]) -> list[str]:
    """Each model once, by label (llama3.2 and llama3.2:latest are one), in order."""
    by_label: dict[str, str] = {}
    for model in models:
        by_label.setdefault(model_label(model), model)
    return list(by_label.values())
