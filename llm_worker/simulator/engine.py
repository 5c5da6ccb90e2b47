"""The simulated Ollama, minus HTTP: models, slots, faults, stats and the cost of work."""

from __future__ import annotations

import threading

from llm_worker.simulator.config import SimulatorConfig, parse_duration
from llm_worker.simulator.faults import MESSAGES, FaultBook
from llm_worker.simulator.models import (
    LOAD_DEFAULTS, LOAD_OPTIONS, LoadKey, ModelCatalog, ModelInfo, normalize_name, not_found_message,
)
from llm_worker.simulator.protocol import ApiError, Options
from llm_worker.simulator.stats import Counters, ServerBusy, SimStats, SlotPool, Stopping


class Engine:
    """The state every request handler works on; safe across threads."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stopping = threading.Event()
        self.counters = Counters()
        self.slots = SlotPool(config.slots, config.max_queue)
        self.faults = FaultBook(config.faults, config.seed)
        self.catalog = ModelCatalog(config.models, self.counters, self._load_seconds, self.pause,
                                    config.max_loaded)
        self._load_times = {normalize_name(k): v / 1000 for k, v in config.model_load_ms.items()}
        self.default_keep_alive = parse_duration(config.keep_alive, 300.0)
        self._load_defaults = tuple({**LOAD_DEFAULTS, "num_ctx": config.num_ctx}[n] for n in LOAD_OPTIONS)

    def pause(self, seconds: float) -> None:
        """Spend simulated time; raise Stopping if the simulator stops meanwhile."""
        if seconds > 0 and self.stopping.wait(seconds):
            raise Stopping

    def stop(self) -> None:
        self.stopping.set()
        self.slots.stop()

    def _load_seconds(self, name: str) -> float:
        return self._load_times.get(name, self.config.load_ms / 1000)

    def require_model(self, name: str) -> ModelInfo:
        """Return the named model, or raise Ollama's 400 or 404."""
        if not name:
            raise ApiError(400, "model is required")
        info = self.catalog.find(normalize_name(name))
        if info is None:
            raise ApiError(404, not_found_message(name, self.config.not_found_style))
        return info

    def keep_alive(self, value: float | str | None) -> float:
        try:
            return parse_duration(value, self.default_keep_alive)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def load_key(self, options: Options) -> LoadKey:
        """Return the options a loaded instance is bound to, defaults filled in."""
        values = [getattr(options, name) for name in LOAD_OPTIONS]
        return tuple(d if v is None else v for v, d in zip(values, self._load_defaults))

    def begin(self, info: ModelInfo, options: Options, keep_alive: float) -> Run:
        """Take a slot, in line if need be, and the model, loading it if need be."""
        try:
            taken_at = self.slots.acquire()
        except ServerBusy:
            raise ApiError(503, MESSAGES["busy"]) from None
        try:
            load_ns = self.catalog.acquire(info, self.load_key(options), keep_alive)
        except BaseException:
            self.slots.release(taken_at)
            raise
        return Run(self, info.name, keep_alive, taken_at, load_ns)

    def stats(self) -> SimStats:
        loaded = [m.info.name for m in self.catalog.running()]
        return self.counters.fill(loaded=loaded, faults_fired=self.faults.fired,
                                  faults=self.faults.active(), **self.slots.figures())

    def reset(self) -> None:
        """Forget the counters and unload every model; faults stay as they are."""
        self.catalog.reset()
        self.counters.reset()
        self.slots.reset()
        self.faults.reset_fired()


class Run:
    """One request's hold on a slot and a loaded model; close() gives both back."""

    __slots__ = ("_engine", "model", "keep_alive", "taken_at", "load_ns", "_open")

    def __init__(self, engine: Engine, model: str, keep_alive: float, taken_at: float, load_ns: int) -> None:
        self._engine = engine
        self.model = model
        self.keep_alive = keep_alive
        self.taken_at = taken_at
        self.load_ns = load_ns
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._engine.catalog.release(self.model, self.keep_alive)
            self._engine.slots.release(self.taken_at)
