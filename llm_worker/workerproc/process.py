"""One worker process: boot, then take a job, run it, finish it; until told to stop.

The loop has rq's shape: a blocking take with a short timeout (so that a stop
is noticed within a second), Redis errors waited out with capped exponential
backoff, and the heartbeat kept in shared memory where the supervisor reads it.

Signals (the supervisor sends them): TERM finishes the job in hand and exits;
QUIT exits at once (the supervisor hands the job back, uncounted); INT is
ignored, because a terminal's Ctrl-C reaches every process of the group and
the supervisor turns it into an orderly drain.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import msgspec
import redis

from llm_worker import exitcodes, logs
from llm_worker.host.backpressure import PAUSE_CHECK, CallGate, PoolWatch, Reachability
from llm_worker.host.breaker import Breakers
from llm_worker.host.layout import AFFINITY, Pause, SlotState
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.procs import worker_id
from llm_worker.host.ratelimit import RateLimits
from llm_worker.host.shm import SharedState
from llm_worker.models.fleet import Fleet, FleetView
from llm_worker.plugin.context import WorkerContext
from llm_worker.plugin.manager import Found, PluginManager
from llm_worker.plugin.providers import Deadline, endpoint_of
from llm_worker.protocol import jobs
from llm_worker.protocol.jobs import Decoded, EmbeddingsRequest, Invalid, JobError, Malformed, decode, iso
from llm_worker.queue.cache import ResponseCache
from llm_worker.queue.connection import ClusterRefused, connect, refuse_cluster, waiting_helps
from llm_worker.queue.parking import Parking, Picked
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo
from llm_worker.settings.config import Settings
from llm_worker.workerproc.affinity import Affinity
from llm_worker.workerproc.execute import Executor
from llm_worker.workerproc.finish import Finisher, Recorded
from llm_worker.workerproc.outcome import Outcome
from llm_worker.workerproc.stream import StreamSink

log = logging.getLogger("llm_worker.worker")
T = TypeVar("T")
BACKOFF_CAP = 5.0
GATHER_POLL = 0.002  # seconds between looks at an empty queue while a batch waits for company


class BootError(Exception):
    """The worker cannot start with these settings; respawning will not help."""


class Quit(Exception):
    """Raised inside the loop when a stop must not wait for Redis to come back."""


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor hands a worker at fork."""

    settings: Settings
    queue: str
    slot: int
    supervisor_pid: int
    state: SharedState
    plugins: list[Found]  # discovered and imported by the supervisor before fork


def run_worker(spec: WorkerSpec) -> NoReturn:
    """The child's whole life after fork; never returns."""
    code = exitcodes.SUPERVISOR_ERROR
    try:
        code = WorkerProcess(spec).run()
    except BaseException:  # the last resort: a child must never return into the supervisor's code
        log.exception("worker failed")
    finally:
        logging.shutdown()
        os._exit(code)


class WorkerProcess:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = spec.settings
        self.queue_name = spec.queue
        self.slot = spec.state.slots[spec.slot]
        self.id = worker_id(self.settings.worker.id, os.getpid())
        self.stopping = False
        self.redis_lost = False
        self.connections = 0  # opened by our client; every one after the first follows a loss
        self.in_hand: list[bytes] = []  # payloads taken and not yet finished: kept when our list is reconciled
        self.affinity: Affinity | None = None  # model affinity's choices (MODEL_AFFINITY), set at boot

    # ---- life ---------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        logs.setup(self.settings.log, role="worker", workerId=self.id, queue=self.queue_name)
        try:
            self._boot()
        except BootError as exc:
            return self._boot_error("worker cannot boot", exc)
        except Quit:
            return exitcodes.WORKER_QUIT
        block = self.settings.queue.block_timeout / 1000
        raw: bytes | None = None
        try:
            while not self.stopping and os.getppid() == self.spec.supervisor_pid:
                self.slot.beat()
                picked = None
                if raw is None:
                    if self._paused():  # the jobs stay queued, for hosts that can serve them
                        time.sleep(PAUSE_CHECK)
                        continue
                    raw, picked = self._take(block)
                if raw is not None:
                    # Finishing a job takes the next one in the same round trip
                    # while the queue has work, so a busy worker blocks only when idle.
                    raw = self._handle_batch(self._gather(raw)) if self.gathers else self._handle(raw, picked)
            if raw is not None:  # taken with the last finish, then told to stop: give it back
                self._guard(self.reliable_queue.hand_back, self.id, raw, self.queue_name)
        except Quit:
            return exitcodes.WORKER_QUIT
        except BootError as exc:
            # Redis refused us mid-run (credentials revoked or changed): no fault of the
            # job in hand. The boot-error exit hands it back uncounted, and the supervisor
            # stops with this reason once respawned workers cannot boot either.
            return self._boot_error("Redis refused the worker while it ran", exc)
        finally:
            for provider in self.executor.providers:
                provider.close()
        return exitcodes.OK

    def _boot_error(self, what: str, exc: BootError) -> int:
        log.error(f"{what}: {exc}")
        self.slot.boot_error = str(exc).encode()[:255]
        return exitcodes.WORKER_BOOT_ERROR

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_term)
        # QUIT: stop now. The supervisor hands our job back; nothing to flush.
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(exitcodes.WORKER_QUIT))
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _wants_more(self) -> bool:
        """Whether to take another job now: asked as each job is finished, and while gathering.

        Not while jobs are parked (model affinity): the next take looks at them before the queue.
        """
        if self.affinity is not None and self.affinity.parked:
            return False
        return not self.stopping and os.getppid() == self.spec.supervisor_pid and not self._paused()

    def _take(self, block: float) -> tuple[bytes | None, Picked | None]:
        """The next job, in our processing list, and how it was taken when it was parked (its place chosen)."""
        if self.affinity is None:
            return self._guard(self.reliable_queue.take, self.queue_name, self.id, block), None
        if self.affinity.should_look():
            picked = self._guard(self.affinity.pick, self.id)
            if picked is not None:
                self.slot.counters.affinity[AFFINITY.index(picked.why)] += 1
                return picked.raw, picked
        raw = self._guard(self.reliable_queue.take, self.queue_name, self.id, self.affinity.block_for(block))
        return raw, None

    def _paused(self) -> bool:
        """Whether to take no jobs now (backpressure); probes a down provider now and then."""
        verdict = self.watch.verdict()
        if verdict.pause != self.slot.paused:
            if verdict.pause:
                log.info(f"taking no jobs: {verdict.why}")
            else:
                log.info("taking jobs again")
            self.slot.paused_why = verdict.why.encode()[:239]
            self.slot.paused = verdict.pause
        for name in verdict.down:
            if self.reach.probe_due(name):
                self._probe(name)
        return verdict.pause != Pause.NONE

    def _probe(self, name: str) -> None:
        provider = next(p for p in self.executor.providers if endpoint_of(p) == name)
        health = provider.health(timeout=2.0)
        self.slot.beat()
        if health.ok and self.reach.mark_up(name):
            log.warning(f"provider {name} answers again; workers take jobs")

    def _boot(self) -> None:
        try:
            self.plugins = PluginManager().load(self.spec.plugins)
            providers = self.plugins.providers(self.settings)
        except Exception as exc:  # a plugin that fails to load stops the host, loudly
            raise BootError(f"plugins failed to load: {exc!r}") from exc
        if not providers:
            raise BootError("no provider plugin is registered (is LLM_WORKER_DISABLE_PLUGINS blocking ollama?)")
        state = self.spec.state
        breakers = Breakers(state.breakers, state.lock, self.settings)
        self.client = connect(self.settings, on_connect=self._connected)
        cache = ResponseCache(self.client, self.settings.redis.key_prefix, self.settings.models.cache_ttl)
        self.reach = Reachability(state.providers, state.lock)
        pools = state.pool_names()
        priority = pools.index(self.settings.queue.priority) if self.settings.queue.priority in pools else -1
        gate = CallGate(
            state,
            self.spec.slot,
            self.settings.worker.max_in_flight,
            priority,
            add_labels=not self.settings.models.allowed,
        )
        limits = RateLimits(state, self.settings, add_labels=not self.settings.models.allowed)
        self.executor = Executor(
            providers,
            self.plugins,
            breakers,
            self.settings,
            self.id,
            cache,
            gate,
            self.reach,
            LoadBoard(state.loads),
            limits,
        )
        # Embeddings workers gather jobs into shared calls (ENABLE_BATCH_PROCESSING).
        self.gathers = (
            self.settings.worker.batching
            and self.settings.worker.batch_size > 1
            and self.queue_name == self.settings.queue.embeddings
        )
        self.watch = PoolWatch(state, self.slot.pool, providers, self.executor.endpoints_for, self.reach, breakers)
        self.reliable_queue = ReliableQueue(self.client, self.settings)
        self.affinity = self._affinity(LoadBoard(state.loads)) if self.settings.models.affinity else None
        info = WorkerInfo(
            queue=self.queue_name,
            host=self.settings.worker.id,
            hostname=os.uname().nodename,
            pid=os.getpid(),
            since=iso(),
        )
        try:
            self._guard(refuse_cluster, self.client)
        except ClusterRefused as exc:
            raise BootError(str(exc)) from None
        self._guard(self.reliable_queue.register, self.id, info, self.settings.worker.heartbeat_timeout)
        # The finisher's writes wait out a lost Redis like every other call of ours: it gets our guard.
        self.finisher = Finisher(
            self.reliable_queue, self.settings, self.id, self.queue_name, self._guard, self.plugins
        )
        context = WorkerContext(self.settings, self.id, "worker", self.queue_name, state, self.spec.slot)
        try:
            self.plugins.worker_started(context)
        except Exception as exc:
            raise BootError(f"a plugin failed to start: {exc!r}") from exc
        self.slot.state = SlotState.IDLE
        self.slot.beat()
        log.debug("worker ready")

    def _affinity(self, board: LoadBoard) -> Affinity | None:
        """Model affinity for this worker's queue; None where jobs are gathered (taken first in, first out)."""
        if self.gathers:
            return None
        keys = self.reliable_queue.keys

        def managed(model: str) -> bool:
            try:
                return board.manages(self.executor.provider_for(model).name)
            except JobError:  # no provider serves it: the job fails as it runs
                return False

        parking = Parking(self.client, keys, self.settings.worker.id)
        view = FleetView(Fleet(self.client, keys, self.settings.worker.id))
        return Affinity(self.settings, self.spec.state, board, parking, view, self.queue_name, managed)

    # ---- one job --------------------------------------------------------------

    def _handle(self, raw: bytes, picked: Picked | None = None) -> bytes | None:
        """Run one job to its outcome and record it; the next job, when the finish took one.

        A job taken from the queue (not ``picked`` from a parked list) whose model another
        host holds is parked instead, when model affinity is on.
        """
        taken = time.time()
        # In hand before decoding: finishing a malformed job writes to Redis, and a
        # reconcile on the way must not hand back the job being finished.
        self.in_hand = [raw]
        try:
            decoded = self._decode(raw)
            if not isinstance(decoded, Decoded):
                return self._reject(raw, decoded, take_next=self._wants_more()).next
            if picked is None and self.affinity is not None and self._park(decoded, taken):
                return None
            self.slot.begin(decoded.job.id, decoded.timeout)
            try:
                refused = self._admit(decoded, taken, picked)
                outcome = Outcome(error=refused) if refused is not None else self._execute(decoded)
                return self.finisher.record(decoded, taken, outcome, take_next=self._wants_more()).next
            finally:
                self.slot.end(SlotState.DRAINING if self.stopping else SlotState.IDLE)
        finally:
            self.in_hand = []

    def _decode(self, raw: bytes) -> Decoded | Malformed | Invalid:
        """The job, or why it cannot be run."""
        try:
            return decode(raw, self.settings)
        except (Malformed, Invalid) as exc:
            return exc
        except Exception as exc:  # whatever the decoder trips on, the payload must not kill us
            log.exception("payload could not be decoded")
            return Malformed(f"unreadable payload: {exc!r}")

    def _reject(self, raw: bytes, refusal: Malformed | Invalid, *, take_next: bool) -> Recorded:
        """Dead-letter a payload that is not a runnable job."""
        if isinstance(refusal, Invalid):
            return self.finisher.invalid(raw, refusal, take_next=take_next)
        return self.finisher.malformed(raw, refusal, take_next=take_next)

    def _admit(self, decoded: Decoded, taken: float, picked: Picked | None = None) -> JobError | None:
        """Pass the job through the request filters and announce it; the refusal, if a filter refused it."""
        try:
            self.plugins.filter_request(decoded)
        except JobError as exc:  # refused (validation), or a filter that broke
            return exc
        if picked is not None:  # how long affinity kept it parked, and why this worker took it
            self.finisher.started(decoded, taken, parkedMs=picked.waited_ms, affinity=picked.why)
        else:
            self.finisher.started(decoded, taken)
        return None

    def _park(self, decoded: Decoded, taken: float) -> bool:
        """Park a job taken from the queue for a host that holds its model, when affinity says so."""
        assert self.affinity is not None
        label = self._guard(self.affinity.park_as, decoded)
        if label is None:
            return False
        if self._guard(self.affinity.parking.park, self.id, decoded.raw, self.queue_name, label):
            self.slot.counters.affinity[AFFINITY.index("parked")] += 1
            self.finisher.parked(decoded, taken, label)
        self.affinity.parked = True
        return True

    def _execute(self, decoded: Decoded) -> Outcome:
        """Run an admitted job, its chunks streamed when it asks for them."""
        sink = None
        if decoded.stream:
            sink = StreamSink(
                self.client, self.reliable_queue.keys.stream(decoded.job.id), self.settings.queue.result_ttl
            )
            self._guard(sink.open)
        return self.executor.run(decoded, Deadline(decoded.timeout), sink)

    # ---- embeddings jobs, gathered ------------------------------------------------

    def _gather(self, first: bytes) -> list[tuple[bytes, float]]:
        """The first job and those that join it within BATCH_TIMEOUT, up to WORKER_BATCH_SIZE.

        What is waiting is taken at once; only an empty queue is waited on,
        by looking again every few milliseconds (a BLMOVE timeout is only as
        precise as Redis's 100 ms clock, five times BATCH_TIMEOUT's default).
        Every job taken sits in our processing list, held like any other.
        """
        w = self.settings.worker
        taken = [(first, time.time())]
        self.in_hand = [first]  # held while we gather: a reconcile must not hand them back
        until = time.monotonic() + w.batch_timeout / 1000
        while self._wants_more():
            more = self._guard(self.reliable_queue.take_waiting, self.queue_name, self.id, w.batch_size - len(taken))
            taken += [(raw, time.time()) for raw in more]
            self.in_hand += more
            left = until - time.monotonic()
            if len(taken) >= w.batch_size or left <= 0:
                break
            if not more:
                time.sleep(min(left, GATHER_POLL))
        return taken

    def _handle_batch(self, gathered: list[tuple[bytes, float]]) -> bytes | None:
        """Run gathered jobs: embeddings of one model and options share one call; any other runs alone.

        Their finishes take no next job: the loop gathers again.
        """
        if len(gathered) == 1:
            return self._handle(gathered[0][0])
        self.in_hand = [raw for raw, _ in gathered]
        ready: list[tuple[Decoded, float]] = []
        for raw, taken in gathered:
            decoded = self._decode(raw)
            if isinstance(decoded, Decoded):
                ready.append((decoded, taken))
            else:
                self._reject(raw, decoded, take_next=False)
        if not ready:
            self.in_hand = []
            return None
        self.slot.begin(ready[0][0].job.id, max(d.timeout for d, _ in ready))
        try:
            admitted = []
            for decoded, taken in ready:
                refused = self._admit(decoded, taken)
                if refused is not None:
                    self.finisher.record(decoded, taken, Outcome(error=refused), take_next=False)
                else:
                    admitted.append((decoded, taken))
            for group in _groups(admitted):
                if len(group) > 1 and self._run_together(group):
                    continue
                for decoded, taken in group:
                    self.slot.begin(decoded.job.id, decoded.timeout)  # the supervisor's watchdog follows each job
                    self.finisher.record(decoded, taken, self._execute(decoded), take_next=False)
        finally:
            self.in_hand = []
            self.slot.jobs_done += len(ready) - 1
            self.slot.end(SlotState.DRAINING if self.stopping else SlotState.IDLE)
        return None

    def _run_together(self, group: list[tuple[Decoded, float]]) -> bool:
        """One provider call for the group; False (nothing answered) when it failed."""
        jobs = [decoded for decoded, _ in group]
        timeout = min(d.timeout for d in jobs)
        self.slot.begin(jobs[0].job.id, timeout)
        outcomes = self.executor.embed_together(jobs, Deadline(timeout))
        if outcomes is None:
            return False
        for (decoded, taken), outcome in zip(group, outcomes):
            self.finisher.record(decoded, taken, outcome, take_next=False)
        return True

    # ---- Redis, lost and found -----------------------------------------------

    def _guard(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Redis call, waiting out a lost Redis with capped, jittered backoff.

        A job in hand is finished once Redis is back; an idle worker told to
        stop while Redis is away stops (it holds nothing). After a loss, our
        processing list is reconciled before the call is retried.
        """
        delay = 0.05
        while True:
            try:
                if self.redis_lost:
                    self._reconcile()
                return call(*args, **kwargs)
            except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
                # Before ConnectionError: AuthenticationError is one, but waiting cannot fix it.
                raise BootError(f"Redis refused us: {exc}") from exc
            except redis.RedisError as exc:
                if not waiting_helps(exc):
                    raise
                if not self.redis_lost:
                    log.warning("Redis unreachable; waiting for it", extra={"error": str(exc)})
                self.redis_lost = True
            if self.stopping and self.slot.state != SlotState.BUSY:
                raise Quit
            self.slot.beat()
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_CAP)

    def _connected(self) -> None:
        """Reconcile before the next call when our client opens any connection after its first."""
        # A new connection replaces one that was lost, maybe to a Redis that restarted
        # or failed over and lost our last writes; and maybe no call of ours failed
        # (cache and stream writes swallow errors) or the master moved (queue.FollowingPool).
        self.connections += 1
        if self.connections > 1 and not self.redis_lost:
            log.info("Redis connection replaced; reconciling our processing list")
            self.redis_lost = True

    def _reconcile(self) -> None:
        """Clear our processing list of what we do not hold, after Redis came back.

        A take whose reply was lost, or an ack that Redis lost in a restart,
        leaves a payload in our list that we are not running: one already
        answered is dropped, any other goes back to its queue.
        """
        for raw in self.reliable_queue.held(self.id):
            if raw in self.in_hand:
                continue
            job_id = jobs.job_id_of(raw, self.settings.limits.max_job_bytes)
            if job_id is not None and self.client.exists(self.reliable_queue.keys.result(job_id)):
                self.reliable_queue.forget(self.id, raw)
            else:
                self.reliable_queue.hand_back(self.id, raw, self.queue_name)
                log.warning(
                    "handed back a job found in our processing list after Redis returned", extra={"jobId": job_id}
                )
        self.redis_lost = False
        log.info("Redis reachable again")


def _groups(jobs: list[tuple[Decoded, float]]) -> list[list[tuple[Decoded, float]]]:
    """Jobs that can share one embeddings call grouped together (same model and options); each other job alone."""
    groups: dict[object, list[tuple[Decoded, float]]] = {}
    for item in jobs:
        decoded = item[0]
        task = decoded.tasks[0]
        request = task.request
        if decoded.job.type != "embeddings" or len(decoded.tasks) != 1 or not isinstance(request, EmbeddingsRequest):
            key: object = id(item)
        else:
            options = msgspec.json.encode(request.options) if request.options is not None else b""
            key = (task.model, request.truncate, msgspec.json.encode(request.keep_alive), options)
        groups.setdefault(key, []).append(item)
    return list(groups.values())
