"""The model manager: the one process that loads and unloads models (role "models").

A child of the supervisor, like the HTTP process, so that slow calls to Ollama
(a pull, a two-minute load) stall nothing else. Workers never decide about
models; they say in shared memory which model each busy worker holds
(``Slot.model``) and when each model was last used (``model_last_used``).

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

import redis

from llm_worker import exitcodes, logs
from llm_worker.host.backoff import compute_backoff
from llm_worker.host.layout import MAX_LOADED, NAME, SlotState
from llm_worker.host.loadboard import ASKED, DEMAND, PRELOAD, WHY, LoadBoard
from llm_worker.host.procs import exit_with_parent, worker_id
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.models import fleet
from llm_worker.models import policy as modelpolicy
from llm_worker.models.policy import Loaded
from llm_worker.models.pullprogress import PullProgress
from llm_worker.plugin.context import WorkerContext
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.plugins.ollama import LoadOptionsRefused, OllamaProvider
from llm_worker.protocol import records
from llm_worker.protocol.jobs import ErrorKind, iso
from llm_worker.protocol.records import Record
from llm_worker.queue.keys import Keys
from llm_worker.queue.parking import Parking, parked_models
from llm_worker.queue.reliable import connect
from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.models.manager")
ASK_TIMEOUT = 10.0  # /api/tags, /api/ps and an unload: quick answers, or Ollama is in trouble
PULL_TIMEOUT = 6 * 3600.0  # a whole pull; a stalled one fails sooner, after OLLAMA_TIMEOUT without a byte
RETRY_CAP = 300.0  # longest wait between two tries of a failed preload or pull
TICK = 0.05  # seconds between looks at the load board
DEMAND_RETRY = 60.0  # seconds before a model whose load by demand failed is loaded by demand again


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
    provider = next((p for p in manager.providers(settings) if isinstance(p, OllamaProvider)), None)
    if provider is None:  # the Ollama plugin is disabled: there are no models to manage
        LoadBoard(state.loads).serve("")  # nor loads to wait for
        log.warning("no Ollama provider: the model manager has nothing to manage")
        state.header.models_ready = 1
        while True:
            time.sleep(3600)
    models = ModelManager(settings, state, provider, manager, my_id)
    client = connect(settings)
    keys = Keys(settings.redis.key_prefix, settings.queue.dead_letter)
    models.fleet = fleet.Fleet(client, keys, settings.worker.id)
    models.parking = Parking(client, keys, settings.worker.id)
    models.start()
    interval = settings.models.manage_interval / 1000
    next_turn = time.monotonic() + interval
    next_share = time.monotonic()
    while True:
        models.serve_loads()
        now = time.monotonic()
        if now >= next_share:
            models.share()
            next_share = now + fleet.PUBLISH_EVERY
        if now >= next_turn:
            models.turn()
            next_turn = time.monotonic() + interval
        time.sleep(TICK)


@dataclass(frozen=True)
class LoadOutcome:
    """What the loader thread hands back: one load, done or failed."""

    index: int
    model: str
    why: int
    seconds: float | None
    error: ProviderError | None


class ModelManager:
    def __init__(
        self, settings: Settings, state: SharedState, provider: OllamaProvider, plugins: PluginManager, worker_id: str
    ) -> None:
        self.settings = settings
        self.state = state
        self.provider = provider
        self.plugins = plugins
        self.worker_id = worker_id
        m = settings.models
        self.unload_after = m.unload_timeout / 1000
        self.preloads = _unique(m.preload) if m.preload_enabled else []
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
        self.asked_seen: dict[int, float] = {}  # model index -> the last request on the board we served
        self.loading: set[str] = set()  # labels the loader thread has in hand
        self.to_load: queue.Queue[tuple[int, str, int]] = queue.Queue()
        self.outcomes: queue.Queue[LoadOutcome] = queue.Queue()
        self.loader: threading.Thread | None = None
        self.fleet: fleet.Fleet | None = None  # where this host publishes what it holds (set by run_manager)
        self.parking: Parking | None = None
        self.demand_retry: dict[str, float] = {}  # label -> when a failed load by demand may be tried again

    # ---- start ---------------------------------------------------------------------

    def start(self) -> None:
        m = self.settings.models
        # From now on jobs wait for this manager's loads instead of loading through their own calls.
        self.board.serve(self.provider.name)
        self.board.forget_unfinished()  # a load the previous manager began died with it; its waiters still wait
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
                log.error(f"cannot preload now, Ollama does not answer: {exc.message}; trying again later")
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
                    log.info(f"{model} is loaded already", extra={"model": model})
                else:
                    self.preload(model)
        self.state.header.models_ready = 1
        log.info("models ready", extra={"preloaded": sorted(self.preloaded), "failed": sorted(self.retry_at)})

    def missing(self, models: list[str]) -> list[str]:
        try:
            self.refresh_available()
        except ProviderError:
            return list(models)  # Ollama unreachable: try them all, each pull says why it failed
        return [m for m in models if model_label(m) not in self.available]

    def pull(self, model: str) -> bool:
        log.info(f"pulling {model}", extra={"model": model})
        progress = PullProgress(
            lambda text, fields: log.info(f"pulling {model}: {text}", extra={"model": model, **fields})
        )
        try:
            self.provider.pull(model, Deadline(PULL_TIMEOUT), progress)
        except ProviderError as exc:
            log.error(f"pulling {model} failed: {exc.message}", extra={"model": model})
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
            log.critical(f"Ollama refused {exc.setting} while preloading {model}: {exc.message}; fix {exc.setting}")
            self._load_failed(LoadOutcome(index, model, PRELOAD, None, exc))
            raise SystemExit(exitcodes.USAGE) from None
        except ProviderError as exc:
            self._load_failed(LoadOutcome(index, model, PRELOAD, None, exc))
            delay = self._retry_later(model)
            log.error(f"preloading {model} failed: {exc.message}; trying again in {delay:.1f}s", extra={"model": model})
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
            row = self.board.board.rows[index]
            if row.asked <= self.asked_seen.get(index, 0.0) or row.started or row.resident:
                continue
            self.asked_seen[index] = row.asked
            self._start_load(index, labels[index], ASKED)

    def _start_load(self, index: int, label: str, why: int) -> None:
        """Make room, then hand the load to the loader thread."""
        self._make_room()
        self._began(index, label, why)
        self.loading.add(label)
        self.to_load.put((index, label, why))
        if self.loader is None:
            self.loader = threading.Thread(target=self._load_forever, daemon=True, name="loader")
            self.loader.start()

    # ---- the fleet: what this host holds, and loads for jobs no host holds -------------------

    def share(self) -> None:
        """Publish what this host holds (models/fleet.py); with MODEL_AFFINITY, load by demand. Never raises."""
        if self.fleet is None:
            return
        held = fleet.held_here(self.state, self.board, self._slots_of)
        size = self.cache_size()
        try:
            self.fleet.publish(held, size)
            if self.settings.models.affinity:
                self._load_by_demand(held, size)
        except redis.RedisError as exc:
            self._complain(f"model manager: Redis unreachable: {exc}")

    def _load_by_demand(self, held: dict[str, fleet.ModelHeld], size: int) -> None:
        """Load one model that parked jobs wait for and no host holds, when it evicts no busy model here."""
        if self.loading or not fleet.has_room(held, size):
            return
        memory = modelpolicy.memory_in_use(self.state.readings)
        if memory is not None and memory.ratio > self.settings.models.memory_threshold:  # no room after all
            return
        assert self.fleet is not None and self.parking is not None
        elsewhere = {label for host, h in self.fleet.read().items() if host != self.fleet.me for label in h.models}
        now = time.monotonic()
        for label in parked_models(self.fleet.redis, self.parking.keys, self.state.pool_names()):
            if label in held or label in elsewhere or self.demand_retry.get(label, 0.0) > now:
                continue
            if self.available and label not in self.available:  # Ollama lacks it: loading would fail
                continue
            index = self._index(label)
            if index == 0 or not self.parking.claim(label):
                continue
            self._start_load(index, label, DEMAND)
            return

    def _slots_of(self, label: str) -> int:
        return self.provider.model_slots(label, False)

    def _load_forever(self) -> None:
        """The loader thread: one load at a time, as Ollama's scheduler loads one at a time."""
        while True:
            index, model, why = self.to_load.get()
            try:
                seconds = self.provider.load(
                    model, Deadline(self.settings.models.load_timeout / 1000), keep_alive=self.provider.keep_alive
                )
            except ProviderError as exc:
                self.outcomes.put(LoadOutcome(index, model, why, None, exc))
            except Exception as exc:  # a bug must not leave the waiting jobs waiting for ever
                log.exception(f"loading {model} failed")
                self.outcomes.put(LoadOutcome(index, model, why, None, ProviderError(repr(exc), ErrorKind.UNKNOWN)))
            else:
                self.outcomes.put(LoadOutcome(index, model, why, seconds, None))

    def _make_room(self) -> None:
        """Before a load, unload the least recently used idle model past MODEL_CACHE_SIZE - 1."""
        try:
            models = self.survey()
            self.unload_all(modelpolicy.over_cache(models, self.cache_size() - 1), modelpolicy.CACHE_SIZE, models)
        except ProviderError as exc:  # the load itself will say what is wrong
            log.warning(f"could not make room before a load: {exc.message}")

    def cache_size(self) -> int:
        return modelpolicy.cache_size(self.settings.models.cache_size, self.state.readings)

    def _began(self, index: int, model: str, why: int) -> None:
        self.board.begin(index, why)
        log.info(f"loading {model} ({WHY[why]})", extra={"model": model_label(model), "reason": WHY[why]})
        self._record(records.MODEL_LOADING, model_label(model), reason=WHY[why])

    def _loaded(self, outcome: LoadOutcome) -> None:
        self.board.succeeded(outcome.index, outcome.seconds or 0.0)
        self._count_load(outcome.model, outcome.seconds, WHY[outcome.why])

    def _load_failed(self, outcome: LoadOutcome) -> None:
        assert outcome.error is not None
        self.board.failed(outcome.index, outcome.error)
        label = model_label(outcome.model)
        if outcome.why == DEMAND:  # not again for a while: the jobs' own loads will say what is wrong
            self.demand_retry[label] = time.monotonic() + DEMAND_RETRY
        log.error(
            f"loading {outcome.model} failed: {outcome.error.message}",
            extra={"model": label, "reason": WHY[outcome.why], "errorType": outcome.error.kind.value},
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
            self.refresh_available()
            self.retry_due()
            models = self.survey()
            now = time.monotonic()
            models = self.unload_all(modelpolicy.idle(models, now, self.unload_after), modelpolicy.IDLE, models)
            models = self.unload_all(modelpolicy.over_cache(models, self.cache_size()), modelpolicy.CACHE_SIZE, models)
            self.relieve_memory(models)
        except ProviderError as exc:
            self._complain(f"model manager: Ollama unreachable: {exc.message}")
            return
        except Exception as exc:  # a bug must not end the manager; the next turn tries again
            if repr(exc) != self.complaint:
                log.exception("model manager turn failed")
            self.complaint = repr(exc)
            return
        if self.complaint:
            log.info("model manager back at work")
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
        running = self.provider.running(Deadline(ASK_TIMEOUT))
        now = time.monotonic()
        header = self.state.header
        # A worker's slot names the model of the provider call it is in (-1 between calls).
        busy = {
            slot.model for slot in self.state.slots if slot.up() and slot.state == SlotState.BUSY and slot.model >= 0
        }
        self._publish(running)
        out = []
        resident = set()
        for info in running:
            label = model_label(info.name)
            index = self._index(label)
            resident.add(index)
            if label not in self.first_seen and self.surveyed_once and label not in self.loading:
                # Loaded by a job's request (Ollama loads on demand), not by us: counted all the same.
                self._count_load(info.name, None, "on demand")
            # A model new in /api/ps was loaded since the last look; its jobs may say it was used later.
            last_used = max(self.first_seen.setdefault(label, self.surveyed), header.model_last_used[index])
            preloaded = self.preloaded.get(label)
            protected = preloaded is not None and now - preloaded < self.unload_after
            out.append(Loaded(info.name, label, info.vram or info.size, last_used, index in busy, protected))
        for label in set(self.first_seen) - {m.label for m in out}:  # Ollama let it go on its own
            del self.first_seen[label]
        for index in range(1, self.state.header.model_count):  # what the workers may call without waiting
            self.board.set_resident(index, index in resident)
        self.surveyed = now
        self.surveyed_once = True
        return out

    def _publish(self, running: list[Any]) -> None:
        """What Ollama has loaded, for /status and /metrics (the manager is the writer of these readings)."""
        r = self.state.readings
        shown = running[:MAX_LOADED]
        for i, info in enumerate(shown):
            r.loaded_names[i].value = info.name.encode()[: NAME - 1]
            r.loaded_vram[i] = float(info.vram)
            r.loaded_bytes[i] = float(info.vram or info.size)
        r.loaded_count = len(shown)

    def unload_all(self, chosen: list[Loaded], reason: str, models: list[Loaded]) -> list[Loaded]:
        """Unload each of ``chosen``; return ``models`` without those that went."""
        gone = {m.name for m in chosen if self.unload(m, reason)}
        return [m for m in models if m.name not in gone]

    def relieve_memory(self, models: list[Loaded]) -> None:
        """Past the threshold, unload idle models, least recently used first, until under it or none is left."""
        threshold = self.settings.models.memory_threshold
        memory = modelpolicy.memory_in_use(self.state.readings)
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
                        f"{memory.source} memory at {memory.ratio:.0%}, past {threshold:.0%}, and no idle model "
                        "to unload",
                        extra={"loaded": [m.label for m in models]},
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
        idle_seconds = round(max(0.0, time.monotonic() - model.last_used), 1)
        try:
            self.provider.unload(model.name, Deadline(ASK_TIMEOUT))
        except ProviderError as exc:
            log.warning(f"unloading {model.name} failed: {exc.message}", extra={"model": model.label, "reason": reason})
            return False
        self.state.header.model_unloads[self._index(model.label)] += 1
        self.board.set_resident(self._index(model.label), False)
        self.first_seen.pop(model.label, None)
        self.preloaded.pop(model.label, None)
        log.info(
            f"model unloaded: {model.label} ({reason})",
            extra={"model": model.label, "reason": reason, "idleSeconds": idle_seconds, **why},
        )
        self._record(records.MODEL_UNLOADED, model.label, reason=reason, idleSeconds=idle_seconds, **why)
        return True

    def _count_load(self, model: str, seconds: float | None, reason: str) -> None:
        """Count a load; ``seconds`` is None for one we only saw done (a job's request loaded it)."""
        label = model_label(model)
        index = self._index(label)
        header = self.state.header
        if seconds is not None:  # our own load: it happened just now
            header.model_load_seconds[index] = seconds
            self.first_seen[label] = time.monotonic()
        header.model_loads[index] += 1
        took = round(seconds, 3) if seconds is not None else None
        log.info(
            f"model loaded: {label}" + (f" in {seconds:.2f}s" if seconds is not None else "") + f" ({reason})",
            extra={"model": label, "loadSeconds": took, "reason": reason},
        )
        self._record(records.MODEL_LOADED, label, loadSeconds=took, reason=reason)

    def _record(self, kind: str, label: str, **data: Any) -> None:
        now = iso()
        body = {"model": label, "workerId": self.worker_id, "timestamp": now, **data}
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
