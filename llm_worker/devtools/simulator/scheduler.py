"""Ollama's scheduler (server/sched.go, v0.33): which model is loaded, loads, evictions and the queue.

The rules it follows, each as sched.go has it:

- A request for a model that is loaded with the same load options takes it at
  once (getRunner, useLoadedRunner): it never queues, whatever else happens.
- Any other request (its model not loaded, or loaded with other options) joins
  the scheduler's queue, a channel of OLLAMA_MAX_QUEUE places (``max_queue``,
  default 512). When every place is taken it is refused at once with 503
  "server busy, please try again.  maximum pending requests exceeded"
  (ErrMaxQueue; server/routes.go handleScheduleError). With ``max_queue`` 0
  the channel is unbuffered: a request gets in only while the scheduler idles.
- One loop takes queued requests in order, one at a time, and blocks while it
  loads or makes room (processPending). So one model loads at a time, and
  every request that needs a load waits behind the one in hand.
- A load takes ``load_ms`` and runs under the context of the request that
  asked for it: when that client goes away the load is aborted (llm
  WaitUntilRunning: "client connection closed before llama-server finished
  loading, aborting load"). Requests for the same model queued behind it then
  start a load of their own; while a load lasts, they only wait. A queued
  request whose client has left is skipped when its turn comes.
- After a load every queued request for that model takes the instance: one
  load serves them all.
- At most ``max_loaded`` models stay loaded (OLLAMA_MAX_LOADED_MODELS; 0 means
  Ollama's default of 3 per GPU, 3 on CPU: defaultModelsPerGPU). To make room,
  or to reload a model with other options, the scheduler expires one model
  (findRunnerToUnload): the first idle one in ByDurationAndName order (shortest
  keep_alive first, a negative one, "forever", last; ties by the model's file
  path, here its blob name), else the first in that order even though busy. It
  never overcommits: it waits until some model is unloaded, which a busy
  victim is once its requests finish, its keep_alive having been set to 0. A
  request with an explicit keep_alive that uses the victim meanwhile resets
  that, and the wait lasts until some model unloads (processCompleted).
- An idle model unloads after its keep_alive (the request's, else the
  instance's, else OLLAMA_KEEP_ALIVE, ``keep_alive``): a request that sends
  none keeps the instance's (useLoadedRunner only sets a given one).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llm_worker.devtools.simulator.config import FOREVER
from llm_worker.devtools.simulator.models import LoadKey, ModelInfo, needs_reload, rfc3339
from llm_worker.devtools.simulator.stats import (
    POLL_SECONDS,
    ClientGone,
    Counters,
    ServerBusy,
    SlotFigures,
    SlotPool,
    Stopping,
)

FOREVER_AT = "2318-01-01T00:00:00Z"  # what /api/ps shows for keep_alive < 0


class Runner:
    """One loaded instance of a model: its load options, users, keep_alive and slots."""

    def __init__(self, info: ModelInfo, key: LoadKey, keep_alive: float, slots: SlotPool) -> None:
        self.info = info
        self.key = key
        self.keep_alive = keep_alive  # Ollama's sessionDuration
        self.slots = slots
        self.refs = 0  # requests holding it (waiting for a slot or in one); it cannot expire meanwhile
        self.expires = FOREVER  # monotonic; counts while refs == 0
        self.expires_at: float | None = None  # wall clock; Ollama sets expiresAt when the model goes idle

    @property
    def name(self) -> str:
        return self.info.name

    def running(self) -> dict[str, Any]:
        """Return the instance as /api/ps lists it (a never-idle instance: now + keep_alive, as Ollama)."""
        expires_at = self.expires_at_or_now()
        shown = FOREVER_AT if math.isinf(expires_at) else rfc3339(expires_at)
        return {**self.info.listing(), "expires_at": shown, "size_vram": self.info.size, "context_length": self.key[0]}

    def expires_at_or_now(self) -> float:
        return self.expires_at if self.expires_at is not None else time.time() + self.keep_alive

    def eviction_order(self) -> tuple[float, str]:
        """sched.go ByDurationAndName: shortest sessionDuration first, then the model file's path."""
        return self.keep_alive, self.info.blob_path


class Pending:
    """A request in the scheduler's queue; ``done`` is set once it has its runner, or an error."""

    __slots__ = ("info", "key", "keep_alive", "done", "runner", "error", "gone")

    def __init__(self, info: ModelInfo, key: LoadKey, keep_alive: float | None) -> None:
        self.info = info
        self.key = key
        self.keep_alive = keep_alive
        self.done = threading.Event()
        self.runner: Runner | None = None
        self.error: BaseException | None = None
        self.gone = False  # its client left; the scheduler skips it or aborts its load


class Scheduler:
    """Loaded models and the queue in front of them, served by one thread as Ollama's processPending is."""

    def __init__(
        self,
        *,
        num_parallel: int,
        max_queue: int,
        max_loaded: int,
        default_keep_alive: float,
        counters: Counters,
        figures: SlotFigures,
        load_seconds: Callable[[str], float],
    ) -> None:
        self._num_parallel = num_parallel
        self._max_queue = max_queue
        self._max_loaded = max_loaded
        self._default_keep_alive = default_keep_alive
        self._counters = counters
        self._figures = figures
        self._load_seconds = load_seconds
        self._cond = threading.Condition(threading.RLock())
        self._loaded: dict[str, Runner] = {}
        self._pending: deque[Pending] = deque()  # the channel's buffer: OLLAMA_MAX_QUEUE places
        self._handed: Pending | None = None  # sent straight to the idle loop, as to a waiting receiver
        self._idle = True  # the loop waits for a request (Ollama's processPending blocked on its channel)
        self._stopping = threading.Event()
        self._unloaded = 0  # unload events, which the loop watches while it makes room
        self.loading: str | None = None
        self.reset_figures()
        self._thread = threading.Thread(target=self._run, name="ollama-simulator:scheduler", daemon=True)
        self._thread.start()

    # ---- what request handlers call -----------------------------------------------

    def get_runner(self, info: ModelInfo, key: LoadKey, keep_alive: float | None, gone: Callable[[], bool]) -> Runner:
        """Return a runner of the model loaded with these options, holding it; queue for one if need be."""
        with self._cond:
            if self._stopping.is_set():
                raise Stopping
            self._expire_locked()
            runner = self._loaded.get(info.name)
            if runner is not None and not needs_reload(runner.key, key):
                self._use_locked(runner, keep_alive)
                return runner
            pending = self._enqueue_locked(Pending(info, key, keep_alive))
        while not pending.done.wait(POLL_SECONDS):
            if gone():
                self._abandon(pending)
                raise ClientGone
        if pending.error is not None:
            raise pending.error
        assert pending.runner is not None
        return pending.runner

    def release(self, runner: Runner) -> None:
        """A request is done with a runner: once idle it expires after its keep_alive (at once if 0)."""
        with self._cond:
            runner.refs -= 1
            if runner.refs > 0:
                return
            runner.expires = time.monotonic() + runner.keep_alive
            runner.expires_at = time.time() + runner.keep_alive
            if runner.keep_alive <= 0:
                self._drop_locked(runner)

    def expire(self, name: str) -> None:
        """Unload a model now, or once its requests finish (sched.go expireRunner: keep_alive 0)."""
        with self._cond:
            runner = self._loaded.get(name)
            if runner is not None:
                runner.expires_at = time.time()
                self._expire_now_locked(runner)

    def expire_all(self) -> None:
        """After an out-of-memory error while running, expire every loaded model (expireRunnersForRuntimeOOM)."""
        with self._cond:
            for runner in list(self._loaded.values()):
                self._expire_now_locked(runner)

    def running(self) -> list[Runner]:
        """Return the loaded models, the longest left to live first (server/routes.go PsHandler)."""
        with self._cond:
            self._expire_locked()
            runners = list(self._loaded.values())
        return sorted(runners, key=lambda r: -r.expires_at_or_now())

    def figures(self) -> dict[str, Any]:
        with self._cond:
            self._expire_locked()
            unloading = [name for name, r in self._loaded.items() if r.keep_alive <= 0 and r.refs > 0]
            return {
                "loaded": list(self._loaded),
                "loading": self.loading,
                "unloading": unloading,
                "pending": self._waiting_locked(),
                "max_pending": self.max_pending,
                "rejected_busy": self.rejected,
                "parallel": {name: r.slots.slots for name, r in self._loaded.items()},
            }

    def reset_figures(self) -> None:
        with self._cond:
            self.max_pending = self._waiting_locked()
            self.rejected = 0

    def unload_all(self) -> None:
        """Forget every loaded model at once (/_sim/reset); requests holding one finish on it."""
        with self._cond:
            self._loaded.clear()
            self._unloaded += 1
            self._cond.notify_all()

    def stop(self) -> None:
        """Fail every queued request with Stopping and end the loop; a load in hand stops too."""
        with self._cond:
            self._stopping.set()
            queued = [self._handed] if self._handed is not None else []
            self._handed = None
            queued += self._pending
            self._pending.clear()
            for pending in queued:
                self._fail_locked(pending, Stopping())
            self._cond.notify_all()

    # ---- the loop (processPending) ------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._handed is None and not self._pending and not self._stopping.is_set():
                    self._idle = True
                    self._cond.wait()
                if self._stopping.is_set():
                    return
                pending = self._handed or self._pending.popleft()
                self._handed = None
                self._idle = False
                if pending.gone:  # "pending request cancelled or timed out, skipping scheduling"
                    continue
            try:
                self._schedule(pending)
            except Stopping:
                with self._cond:
                    self._fail_locked(pending, Stopping())
                return

    def _schedule(self, pending: Pending) -> None:
        """Serve one queued request: use, reload, make room, or load, as processPending's inner loop."""
        name = pending.info.name
        while True:
            with self._cond:
                self._expire_locked()
                runner = self._loaded.get(name)
                if runner is not None and not needs_reload(runner.key, pending.key):
                    self._serve_locked(pending, runner)
                    return
                if runner is not None:
                    victim: Runner | None = runner  # a reload unloads the old instance first
                elif len(self._loaded) >= self._max_loaded:
                    victim = self._victim_locked()
                else:
                    victim = None
                if victim is not None:
                    self._make_room_locked(victim)
                    continue
            loaded = self._load(pending)
            with self._cond:
                if loaded is None:
                    self._fail_locked(pending, ClientGone())
                else:
                    self._loaded[name] = loaded
                    self._serve_locked(pending, loaded)
            return

    def _victim_locked(self) -> Runner | None:
        """findRunnerToUnload: the first idle runner in ByDurationAndName order, else the first."""
        runners = sorted(self._loaded.values(), key=Runner.eviction_order)
        idle = [r for r in runners if r.refs == 0]
        chosen = idle or runners
        return chosen[0] if chosen else None

    def _make_room_locked(self, victim: Runner) -> None:
        """Expire the victim and wait until some model unloads (any unload wakes Ollama's loop)."""
        seen = self._unloaded
        self._expire_now_locked(victim)
        while self._unloaded == seen:
            if self._stopping.is_set():
                raise Stopping
            self._cond.wait(self._until_next_expiry_locked())
            self._expire_locked()

    def _load(self, pending: Pending) -> Runner | None:
        """Spend the load time; give up, counting an aborted load, if the requesting client leaves."""
        name = pending.info.name
        with self._cond:
            self.loading = name
        try:
            deadline = time.monotonic() + self._load_seconds(name)
            while not pending.gone:
                left = deadline - time.monotonic()
                if left <= 0:
                    keep_alive = self._default_keep_alive if pending.keep_alive is None else pending.keep_alive
                    slots = SlotPool(pending.info.parallel(self._num_parallel), self._figures)
                    self._counters.event(self._counters.loads, name)
                    return Runner(pending.info, pending.key, keep_alive, slots)
                if self._stopping.wait(min(POLL_SECONDS, left)):
                    raise Stopping
            self._counters.event(self._counters.aborted_loads, name)
            return None
        finally:
            with self._cond:
                self.loading = None

    # ---- bookkeeping, under the lock ------------------------------------------------

    def _enqueue_locked(self, pending: Pending) -> Pending:
        """Send on the scheduler's channel: to the idle loop, else into a free place, else ErrMaxQueue."""
        if self._idle:
            self._handed, self._idle = pending, False
        elif len(self._pending) < self._max_queue:  # a gone request holds its place until skipped
            self._pending.append(pending)
        else:
            self.rejected += 1
            raise ServerBusy
        self.max_pending = max(self.max_pending, self._waiting_locked())
        self._cond.notify_all()
        return pending

    def _waiting_locked(self) -> int:
        """Count the queued requests whose clients are still there (the gone keep their place till skipped)."""
        return sum(not p.gone for p in self._pending) + (self._handed is not None and not self._handed.gone)

    def _use_locked(self, runner: Runner, keep_alive: float | None) -> None:
        runner.refs += 1
        if keep_alive is not None:
            runner.keep_alive = keep_alive

    def _serve_locked(self, pending: Pending, runner: Runner) -> None:
        self._use_locked(runner, pending.keep_alive)
        if pending.gone:  # left at the last moment: the instance goes idle at once
            self.release(runner)
        else:
            pending.runner = runner
        pending.done.set()

    def _fail_locked(self, pending: Pending, error: BaseException) -> None:
        pending.error = error
        pending.done.set()

    def _abandon(self, pending: Pending) -> None:
        """The client left: the loop skips or aborts its request, or it lets go of the runner just given."""
        with self._cond:
            pending.gone = True
            runner, pending.runner = pending.runner, None
            if runner is not None:
                self.release(runner)  # the lock is re-entrant

    def _expire_now_locked(self, runner: Runner) -> None:
        runner.keep_alive = 0.0
        if runner.refs == 0:
            self._drop_locked(runner)

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for runner in [r for r in self._loaded.values() if r.refs == 0 and r.expires <= now]:
            self._drop_locked(runner)

    def _until_next_expiry_locked(self) -> float:
        now = time.monotonic()
        idle = [r.expires - now for r in self._loaded.values() if r.refs == 0 and not math.isinf(r.expires)]
        return max(0.0, min(idle, default=1.0))

    def _drop_locked(self, runner: Runner) -> None:
        if self._loaded.get(runner.name) is runner:
            del self._loaded[runner.name]
            self._counters.event(self._counters.unloads, runner.name)
            self._unloaded += 1
            self._cond.notify_all()
