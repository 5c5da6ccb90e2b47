"""The simulated Ollama, minus HTTP: models, the scheduler, slots, faults, stats and the cost of work.

A request's handler runs on its connection's thread; ``bind`` tells the
engine, for that thread, which endpoint it serves and how to see that its
client has left, so that a wait (for the scheduler, a load, a slot) can end
when the client goes, as a Go handler's does with its request's context.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_worker.devtools.simulator.config import Fault, SimulatorConfig, parse_duration, parse_keep_alive
from llm_worker.devtools.simulator.faults import FaultBook
from llm_worker.devtools.simulator.models import (
    LOAD_DEFAULTS,
    LOAD_OPTIONS,
    LoadKey,
    ModelCatalog,
    ModelInfo,
    normalize_name,
)
from llm_worker.devtools.simulator.models import not_found_message as _not_found_text
from llm_worker.devtools.simulator.protocol import ApiError, OptionError, Options, from_map
from llm_worker.devtools.simulator.scheduler import Runner, Scheduler
from llm_worker.devtools.simulator.stats import (
    POLL_SECONDS,
    ClientGone,
    Counters,
    ServerBusy,
    SimStats,
    SlotFigures,
    Stopping,
)
from llm_worker.devtools.simulator.versions import OllamaVersion


@dataclass
class RequestContext:
    """What the engine knows of the request its thread serves."""

    endpoint: str = ""
    gone: Callable[[], bool] = lambda: False  # whether the client has closed its connection
    abort: Fault | None = None  # an abort fault: the answer ends after abort.after_chunks pieces, without done


_NO_CONTEXT = RequestContext()


class Engine:
    """The state every request handler works on; safe across threads."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.version = OllamaVersion(config.ollama_version)
        self.messages = self.version.messages()
        self.stopping = threading.Event()
        self.counters = Counters()
        self.slot_figures = SlotFigures()
        self.faults = FaultBook(config.faults, config.seed)
        self.catalog = ModelCatalog(config.models)
        self._load_times = {normalize_name(k): v / 1000 for k, v in config.model_load_ms.items()}
        self.default_keep_alive = parse_duration(config.keep_alive, 300.0)
        self._load_defaults = tuple({**LOAD_DEFAULTS, "num_ctx": config.num_ctx}[n] for n in LOAD_OPTIONS)
        self.scheduler = Scheduler(
            num_parallel=config.num_parallel,
            max_queue=config.max_queue,
            max_loaded=config.loaded_limit,
            default_keep_alive=self.default_keep_alive,
            counters=self.counters,
            figures=self.slot_figures,
            load_seconds=self._load_seconds,
        )
        self._local = threading.local()

    # ---- the request a thread serves ----------------------------------------------

    def bind(self, context: RequestContext) -> None:
        self._local.context = context

    def unbind(self) -> None:
        self._local.context = _NO_CONTEXT

    def context(self) -> RequestContext:
        return getattr(self._local, "context", _NO_CONTEXT)

    # ---- time -------------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Spend simulated time; raise Stopping if the simulator stops, ClientGone if the client leaves.

        A request's work ends with its client, as the runner's call does with
        the request's context: its slot and its hold on the model go back.
        """
        deadline = time.monotonic() + seconds
        while seconds > 0:
            if self.stopping.wait(min(seconds, POLL_SECONDS)):
                raise Stopping
            seconds = deadline - time.monotonic()
            if seconds > 0 and self.context().gone():
                raise ClientGone

    def stop(self) -> None:
        self.stopping.set()
        self.scheduler.stop()
        self.slot_figures.stop()

    def _load_seconds(self, name: str) -> float:
        return self._load_times.get(name, self.config.load_ms / 1000)

    # ---- reading a request ----------------------------------------------------------

    def not_found_message(self, name: str, endpoint: str | None = None) -> str:
        """Return Ollama's text for a missing model on this endpoint (default: the bound request's)."""
        wording = self.config.not_found_style or self.version.not_found_wording(
            self.context().endpoint if endpoint is None else endpoint
        )
        return _not_found_text(name, wording)

    def require_model(self, name: str) -> ModelInfo:
        """Return the named model, or raise Ollama's 400 or 404 for this endpoint."""
        endpoint = self.context().endpoint
        if not name:
            # parseAndValidateModelRef fails on "": generate and embed answer their not-found fallback.
            if endpoint in ("generate", "embed"):
                raise ApiError(404, "model '' not found")
            raise ApiError(400, "model is required")
        info = self.catalog.find(normalize_name(name))
        if info is None:
            raise ApiError(404, self.not_found_message(name))
        return info

    def keep_alive(self, value: float | str | None) -> float | None:
        """Return a request's keep_alive in seconds; None when it sent none (the instance keeps its own)."""
        if value is None:
            return None
        try:
            return parse_keep_alive(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    def options(self, raw: dict[str, object] | None) -> Options:
        """Read a request's options; a wrong type is Ollama's 500 (scheduleRunner → handleScheduleError)."""
        try:
            return from_map(raw)
        except OptionError as exc:
            raise ApiError(500, str(exc)) from None

    def load_key(self, options: Options) -> LoadKey:
        """Return the options a loaded instance is bound to, defaults filled in."""
        values = [getattr(options, name) for name in LOAD_OPTIONS]
        return tuple(d if v is None else v for v, d in zip(values, self._load_defaults, strict=True))

    # ---- scheduling -----------------------------------------------------------------

    def load(self, info: ModelInfo, options: Options, keep_alive: float | None) -> int:
        """Have the model loaded (a request with nothing to say); return the ns spent on it."""
        started = time.perf_counter_ns()
        runner = self._get_runner(info, options, keep_alive)
        self.scheduler.release(runner)
        return max(1, time.perf_counter_ns() - started)

    def begin(self, info: ModelInfo, options: Options, keep_alive: float | None) -> Run:
        """Get the model from the scheduler (loading it if need be), then one of its slots, in line if need be."""
        started = time.perf_counter_ns()
        runner = self._get_runner(info, options, keep_alive)
        # Ollama's load_duration: the time until the scheduler handed the model over.
        load_ns = max(1, time.perf_counter_ns() - started)
        try:
            taken_at = runner.slots.acquire(self.context().gone)
        except BaseException:
            self.scheduler.release(runner)
            raise
        return Run(self, runner, taken_at, load_ns)

    def _get_runner(self, info: ModelInfo, options: Options, keep_alive: float | None) -> Runner:
        try:
            return self.scheduler.get_runner(info, self.load_key(options), keep_alive, self.context().gone)
        except ServerBusy:
            raise ApiError(503, self.messages["busy"]) from None

    def stats(self) -> SimStats:
        slots = self.slot_figures.snapshot()
        return self.counters.fill(
            faults_fired=self.faults.fired,
            faults=self.faults.active(),
            slots=self.config.num_parallel,
            **self.scheduler.figures(),
            **slots,
        )

    def reset(self) -> None:
        """Forget the counters and unload every model; faults stay as they are."""
        self.scheduler.unload_all()
        self.counters.reset()
        self.slot_figures.reset()
        self.scheduler.reset_figures()
        self.faults.reset_fired()


class Run:
    """One request's hold on a loaded model and one of its slots; close() gives both back."""

    __slots__ = ("_engine", "runner", "taken_at", "load_ns", "_open")

    def __init__(self, engine: Engine, runner: Runner, taken_at: float, load_ns: int) -> None:
        self._engine = engine
        self.runner = runner
        self.taken_at = taken_at
        self.load_ns = load_ns
        self._open = True

    @property
    def model(self) -> str:
        return self.runner.name

    def close(self) -> None:
        if self._open:
            self._open = False
            self.runner.slots.release(self.taken_at)
            self._engine.scheduler.release(self.runner)
