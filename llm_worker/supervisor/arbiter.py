"""The arbiter: fork the pools, watch them, respawn, recover, drain. Single-threaded.

``run()`` is the table of contents: wait for a signal or the next chore,
dispatch signals, reap, murder, manage, housekeep. Signal handlers only queue
(see signals.py); all work happens here, in the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping

import redis

from llm_worker import exitcodes
from llm_worker.host.backoff import compute_backoff
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import MAX_POOLS, Phase, SlotState
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.procs import worker_id
from llm_worker.host.shm import SharedState
from llm_worker.host.stats import model_label
from llm_worker.plugin.manager import Found
from llm_worker.plugin.providers import endpoint_names
from llm_worker.protocol.jobs import iso
from llm_worker.queue.connection import connect
from llm_worker.queue.parking import unpark_all
from llm_worker.queue.reliable import ReliableQueue, WorkerInfo
from llm_worker.settings.config import SettingError, Settings
from llm_worker.settings.urls import redis_location, split_urls
from llm_worker.supervisor.children import RESPAWN_CAP, Child, Children, Exit, Handback
from llm_worker.supervisor.housekeeping import Housekeeping, warn_if_jobs_can_be_lost
from llm_worker.supervisor.recovery import Gone, Recovery
from llm_worker.supervisor.sdnotify import Notifier
from llm_worker.supervisor.services import Launch, Services, Spawn
from llm_worker.supervisor.signals import SignalQueue
from llm_worker.supervisor.startup import refusal
from llm_worker.supervisor.systemd import SystemdLink

log = logging.getLogger("llm_worker.supervisor")

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for a hung worker
QUIT_GRACE = 1.0
REDIS_TIMEOUT = 1.0  # the supervisor never waits on Redis longer than this


class Arbiter:
    def __init__(
        self, settings: Settings, reload: Callable[[], Settings], spawns: Mapping[str, Spawn], plugins: list[Found]
    ) -> None:
        """``spawns``: how to fork each service child, by kind (``{"http": spawn_http, ...}``)."""
        self.settings = settings
        self.plugins = plugins
        self.reload_settings = reload
        self.services = Services(spawns)
        self.generation = 0
        self.targets = dict(settings.pools)
        total = sum(self.targets.values())
        self.state = SharedState(max(64, 2 * total))
        self._register_labels(settings)
        if any(p.name == "ollama" for p in plugins):
            # Before any worker runs: jobs wait for the model manager's loads, never load through their
            # own calls (loadboard.py); the manager clears this if it finds no Ollama provider after all.
            LoadBoard(self.state.loads).serve("ollama")
            # And the Ollama servers are numbered in OLLAMA_BASE_URL's order, shown from the start.
            urls = split_urls(settings.ollama.base_url)
            table = EndpointTable(self.state.providers, self.state.lock)
            for name, url in zip(endpoint_names("ollama", len(urls)), urls):
                table.register(name, "ollama", url)
        self.signals = SignalQueue()
        self.children = Children()
        self.exit_code = exitcodes.OK
        self.boot_failures = 0
        self.crash_streak: dict[str, int] = {}
        self.respawn_at: dict[str, float] = {}
        self.drain_deadline = 0.0
        self.worker_since: dict[int, str] = {}
        self.hostname = os.uname().nodename
        self.systemd = SystemdLink(Notifier.from_env(), self.state, lambda: self.settings.http.port != 0)

    def _register_labels(self, settings: Settings) -> None:
        """Put pools and model labels in the shared tables before anyone reads them."""
        for pool in settings.pools:
            self.state.pool_index(pool, keep=settings.pools)
        models = settings.models
        for model in [*models.allowed, models.default_chat, models.default_embedding]:
            self.state.model_index(model_label(model), add=True)

    @property
    def pool_names(self) -> list[str]:
        return self.state.pool_names()

    @property
    def phase(self) -> Phase:
        return Phase(self.state.header.phase)

    @phase.setter
    def phase(self, value: Phase) -> None:
        self.state.header.phase = value

    # ---- the table of contents ------------------------------------------------

    def run(self) -> int:
        if not self.start():
            return self.exit_code
        try:
            while not self.finished():
                for signum in self.signals.wait(self.sleep_time()):
                    self.dispatch(signum)
                self.reap_workers()
                self.murder_workers()
                self.manage_workers()
                self.manage_services()
                self.housekeeping.tick()
                self.state.header.loop_beat = time.monotonic()
                self.systemd.turn(old_workers_left=any(c.generation < self.generation for c in self.children.workers()))
        except Exception:
            self.halt()
        self.shut_down()
        return self.exit_code

    def start(self) -> bool:
        """Check Redis, recover what an earlier run left, fork the pools; False: refused, nothing forked."""
        header = self.state.header
        header.supervisor_pid = os.getpid()
        header.loop_beat = time.monotonic()
        self.phase = Phase.STARTING
        self.signals.install()
        self._connect()
        try:
            why = refusal(self.rq, self.settings.worker.id, self.hostname, self.settings.worker.heartbeat_timeout)
            if why is None:
                warn_if_jobs_can_be_lost(self.rq.redis)
                self.recovery.previous_incarnation(self.hostname)
                self._unpark_without_affinity()
        except redis.RedisError as exc:
            why = None
            log.error("Redis unreachable at start; workers will wait for it", extra={"error": str(exc)})
        if why is not None:
            log.critical(f"refusing to start: {why}")
            self.exit_code = exitcodes.USAGE
            return False
        log.info(
            "supervisor starting",
            extra={
                "pools": self.targets,
                "redis": redis_location(self.settings.redis),
                "ollama": self.settings.ollama.base_url,
            },
        )
        self.manage_workers()
        self.phase = Phase.RUNNING
        self.manage_services()
        return True

    def _unpark_without_affinity(self) -> None:
        """With MODEL_AFFINITY off, jobs an earlier run parked go back to their queues: nothing here would pick them."""
        if self.settings.models.affinity:
            return
        for queue in self.targets:
            moved = unpark_all(self.rq.redis, self.rq.keys, queue)
            if moved:
                log.warning(
                    f"MODEL_AFFINITY is off: moved {moved} parked job(s) back to {queue}",
                    extra={"queue": queue, "jobs": moved},
                )

    def _connect(self) -> None:
        self.rq = ReliableQueue(connect(self.settings, timeout=REDIS_TIMEOUT), self.settings)
        self.recovery = Recovery(self.rq, self.settings.worker.id, self.state)
        self.housekeeping = Housekeeping(self.rq, self.settings, self.state, self.recovery, self.live_workers)

    def sleep_time(self) -> float:
        return min(0.25, max(0.0, self.housekeeping.next_due() - time.monotonic()))

    def finished(self) -> bool:
        return self.phase in (Phase.DRAINING, Phase.STOPPING) and not self.children.workers()

    # ---- signals ----------------------------------------------------------------

    def dispatch(self, signum: int) -> None:
        handler = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGQUIT: self.handle_quit,
            signal.SIGHUP: self.handle_hup,
            signal.SIGTTIN: self.handle_ttin,
            signal.SIGTTOU: self.handle_ttou,
        }.get(signum)
        if handler is not None:
            handler()

    def handle_term(self) -> None:
        if self.phase in (Phase.DRAINING, Phase.STOPPING):
            return
        log.warning(
            "draining: jobs in hand finish, no new ones are taken",
            extra={"gracefulTimeoutMs": self.settings.worker.graceful_timeout},
        )
        self.phase = Phase.DRAINING
        self.systemd.stopping()
        grace = self.settings.worker.graceful_timeout / 1000
        self.drain_deadline = time.monotonic() + grace
        for child in self.children.workers():
            self.children.stop(child, signal.SIGTERM, grace=grace, handback=Handback.UNCOUNTED, reason="drain")

    def handle_int(self) -> None:
        if self.phase == Phase.DRAINING:  # a second Ctrl-C: stop at once
            self.handle_quit()
        else:
            self.handle_term()

    def handle_quit(self) -> None:
        if self.phase == Phase.STOPPING:
            return
        log.warning("stopping now: jobs in hand go back to their queues")
        self.quit_workers()

    def quit_workers(self) -> None:
        """Stop every worker at once; what each held goes back to its queue, uncounted, as it is reaped."""
        self.phase = Phase.STOPPING
        self.systemd.stopping()
        for child in self.children.workers():
            self.children.stop(child, signal.SIGQUIT, grace=QUIT_GRACE, handback=Handback.UNCOUNTED, reason="quit")

    def handle_hup(self) -> None:
        if self.phase != Phase.RUNNING:
            return
        self.systemd.reload_started()
        try:
            settings = self.reload_settings()
        except SettingError as exc:
            log.error(f"reload refused, keeping the running settings: {exc}")
            self.systemd.reload_refused()
            return
        fixed = [
            ("WORKER_ID", settings.worker.id, self.settings.worker.id),
            ("REDIS_KEY_PREFIX", settings.redis.key_prefix, self.settings.redis.key_prefix),
        ]
        for name, new, old in fixed:
            if new != old:
                log.error(f"reload refused: {name} cannot change while running ({old!r} -> {new!r}); restart instead")
                self.systemd.reload_refused()
                return
        if not self.state.pools_fit(settings.pools):
            # Rows of pools gone are reused once no worker serves them: old workers still draining hold theirs.
            log.error(
                f"reload refused, keeping the running settings: its {len(settings.pools)} pools do not fit the "
                f"host's table of {MAX_POOLS} beside the pools whose workers are still stopping; send HUP again "
                "once they have stopped",
                extra={"pools": settings.pools, "tablePools": self.pool_names},
            )
            self.systemd.reload_refused()
            return
        log.warning("reloading: replacing workers one at a time", extra={"pools": settings.pools})
        old_redis = self.settings.redis
        self.settings = settings
        self.generation += 1
        self.targets = dict(settings.pools)
        self._register_labels(settings)
        if settings.redis != old_redis:  # another Redis, its credentials, or its sentinels
            self._connect()
        self.services.reset()
        for child in self.services.running():  # they restart with the new settings
            self.children.stop(child, signal.SIGTERM, grace=KILL_GRACE, handback=Handback.UNCOUNTED, reason="reload")

    def handle_ttin(self) -> None:
        chat = self.settings.queue.chat
        if sum(self.targets.values()) + 1 > len(self.state) // 2:
            log.warning("TTIN ignored: no room for another worker slot")
            return
        if not self.state.pools_fit([*self.targets, chat]):
            log.warning("TTIN ignored: no room for the chat pool in the host's pool table")
            return
        self.targets[chat] = self.targets.get(chat, 0) + 1
        self.state.pool_index(chat, keep=self.targets)
        log.info("one more chat worker", extra={"pool": chat, "workers": self.targets[chat]})

    def handle_ttou(self) -> None:
        chat = self.settings.queue.chat
        if self.targets.get(chat, 0) > 0:
            self.targets[chat] -= 1
            log.info("one chat worker fewer", extra={"pool": chat, "workers": self.targets[chat]})

    # ---- children -------------------------------------------------------------------

    def reap_workers(self) -> None:
        exits = self.children.reap()
        if exits:
            # A signal sent to the whole process group (Ctrl-C, `timeout`, `kill -- -PGID`) reaches the
            # children as it reaches us, and a child may be gone before the loop has read it: act on
            # what is queued first, so that their exits are judged in the phase that signal asked for.
            for signum in self.signals.wait(0):
                self.dispatch(signum)
        for ex in exits:
            if ex.child.kind in self.services:
                self._service_exited(ex)
            else:
                self._worker_exited(ex)

    def _worker_exited(self, ex: Exit) -> None:
        child = ex.child
        slot = self.state.slots[child.slot]
        dead = worker_id(self.settings.worker.id, child.pid)
        if child.term_sent:
            crashed = child.handback is Handback.CRASH
        else:
            crashed = ex.code not in (exitcodes.OK, exitcodes.WORKER_QUIT, exitcodes.WORKER_BOOT_ERROR)
        self.recovery.worker_gone(Gone(dead, child.pool, crashed=crashed))
        boot_error = slot.boot_error.decode(errors="replace")
        no_progress = slot.state == SlotState.BOOTING or (slot.state == SlotState.IDLE and slot.jobs_done == 0)
        self.state.retire(slot)
        if crashed:
            self.state.header.worker_exits[slot.pool] += 1
        slot.release()
        self.worker_since.pop(child.pid, None)
        if ex.code == exitcodes.WORKER_BOOT_ERROR:
            self._boot_failed(dead, boot_error)
            return
        lived = time.monotonic() - child.spawned
        if child.term_sent and not crashed:
            # Stopped on purpose (drain, reload, scaled down, quit): not a death, so no `deadWorker`.
            log.info(
                f"worker stopped: {ex.describe()}",
                extra={
                    "worker": dead,
                    "queue": child.pool,
                    "childPid": child.pid,
                    "reason": child.reason,
                    "exit": ex.describe(),
                },
            )
            return
        # Only deaths that show no progress build up the backoff: dying while
        # booting, or idle before a single job. A worker that died holding a
        # job is replaced at once, so its job runs again within a second; a
        # job that kills every worker is bounded by JOB_MAX_CRASHES instead.
        streak = self.crash_streak.get(child.pool, 0) + 1 if no_progress else 0
        self.crash_streak[child.pool] = streak
        delay = 0.0 if streak <= 1 else compute_backoff(streak - 1, 0.25, cap=RESPAWN_CAP)
        self.respawn_at[child.pool] = time.monotonic() + delay
        log.error(
            "worker died",
            extra={
                "deadWorker": dead,
                "queue": child.pool,
                "childPid": child.pid,
                "exit": ex.describe(),
                "reason": child.reason or "unexpected",
                "livedSeconds": round(lived, 1),
                "respawnInSeconds": delay,
            },
        )

    def _boot_failed(self, dead: str, why: str) -> None:
        self.boot_failures += 1
        limit = self.settings.worker.max_restarts
        if self.boot_failures >= limit:
            log.critical(
                f"workers cannot boot ({self.boot_failures} times in a row): "
                f"{why or 'see the worker log above'}; stopping"
            )
            self.exit_code = exitcodes.WORKER_BOOT_ERROR
            self.handle_quit()
            return
        delay = compute_backoff(self.boot_failures, 0.5, cap=RESPAWN_CAP)
        for pool in self.targets:
            self.respawn_at[pool] = max(self.respawn_at.get(pool, 0.0), time.monotonic() + delay)
        log.error(f"worker failed to boot: {why}", extra={"deadWorker": dead, "retryInSeconds": delay})

    def _service_exited(self, ex: Exit) -> None:
        if ex.child.kind == "http":
            self.state.header.http_bound = 0
        service, delay = self.services.exited(ex)
        if ex.code == exitcodes.USAGE and not ex.child.term_sent:
            # A setting the service's own checks passed but the provider refused (the
            # model manager's preload): respawning would refuse again. Stop, saying so.
            log.critical(f"the {service.kind} process stopped on a bad setting (its message is above); stopping")
            self.exit_code = exitcodes.USAGE
            self.handle_quit()
            return
        if delay is None or self.phase in (Phase.DRAINING, Phase.STOPPING):
            # Asked to stop, or stopped by a signal sent to the whole group while we drain: expected.
            log.info(
                f"{service.kind} process stopped: {ex.describe()}",
                extra={"kind": service.kind, "childPid": ex.child.pid, "exit": ex.describe()},
            )
        else:
            log.error(
                f"{service.kind} process died; starting another",
                extra={
                    "kind": service.kind,
                    "childPid": ex.child.pid,
                    "exit": ex.describe(),
                    "respawnInSeconds": delay,
                },
            )

    def manage_services(self) -> None:
        """Keep one of each service child while running; spawn_* returning None means not with these settings."""
        if self.phase != Phase.RUNNING:
            return
        for service in self.services.due(time.monotonic()):
            launch = Launch(
                self.settings,
                self.state,
                self.plugins,
                lambda child, body: self.children.fork(child, lambda: self.in_child(body)),
            )
            child = service.spawn(launch)
            self.services.spawned(service, child)
            if child is not None:
                log.info(
                    f"booting {service.kind} process with pid {child.pid}",
                    extra={"kind": service.kind, "childPid": child.pid},
                )

    def murder_workers(self) -> None:
        """Stop workers that hang: a job past its timeout and grace, or a stale heartbeat."""
        now = time.monotonic()
        grace = self.settings.worker.timeout_grace / 1000
        stale = self.settings.worker.heartbeat_timeout / 1000
        for child in self.children.workers():
            if child.term_sent and child.handback is Handback.CRASH:
                continue
            slot = self.state.slots[child.slot]
            if slot.state == SlotState.BUSY and slot.job_deadline and now > slot.job_deadline + grace:
                reason = f"job {slot.job_id.decode(errors='replace')} ran past its timeout"
            elif slot.state != SlotState.BUSY and now - slot.heartbeat > stale:
                reason = "heartbeat stale"
            else:
                continue
            log.error(f"killing worker: {reason}", extra={"deadWorker": worker_id(self.settings.worker.id, child.pid)})
            self.children.stop(
                child, signal.SIGTERM, grace=KILL_GRACE, handback=Handback.CRASH, reason=reason, wake=False
            )
        self.children.kill_overdue()

    def manage_workers(self) -> None:
        """Bring every pool to its target: spawn, retire extras, roll a reload."""
        self.state.header.workers_wanted = sum(self.targets.values())
        for pool in self.pool_names:
            self.state.header.pool_wanted[self.state.pool_index(pool)] = self.targets.get(pool, 0)
        if self.phase not in (Phase.STARTING, Phase.RUNNING):
            return
        for pool in self.pool_names:
            target = self.targets.get(pool, 0)
            live = [c for c in self.children.workers(pool) if not c.term_sent]
            old = [c for c in live if c.generation < self.generation]
            new = [c for c in live if c.generation == self.generation]
            booted = all(self.state.slots[c.slot].up() for c in new)
            if any(self.state.slots[c.slot].up() for c in new):
                self.boot_failures = 0
            if old and booted:
                # Rolling reload: one new worker up before one old worker goes.
                if len(new) < target and self.state.free_slot() is not None and len(live) <= target:
                    self.spawn_worker(pool)
                else:
                    self.children.stop(
                        old[0],
                        signal.SIGTERM,
                        grace=self.settings.worker.graceful_timeout / 1000,
                        handback=Handback.UNCOUNTED,
                        reason="reload",
                    )
            elif not old and len(new) < target and time.monotonic() >= self.respawn_at.get(pool, 0.0):
                for _ in range(target - len(new)):
                    if self.spawn_worker(pool) is None:
                        break
            elif not old and len(new) > target:
                for child in sorted(new, key=lambda c: c.spawned)[target:]:
                    self.children.stop(
                        child,
                        signal.SIGTERM,
                        grace=self.settings.worker.graceful_timeout / 1000,
                        handback=Handback.UNCOUNTED,
                        reason="scaled down",
                    )

    def spawn_worker(self, pool: str) -> Child | None:
        from llm_worker.workerproc import WorkerSpec, run_worker

        index = self.state.free_slot()
        if index is None:
            log.error("no free worker slot", extra={"pool": pool})
            return None
        spec = WorkerSpec(self.settings, pool, index, os.getpid(), self.state, self.plugins)
        child = Child(pid=0, kind="worker", slot=index, pool=pool, generation=self.generation)
        slot = self.state.slots[index]
        slot.claim(-1, self.state.pool_index(pool))
        self.children.fork(child, lambda: self.in_child(lambda: run_worker(spec)))
        slot.pid = child.pid
        self.worker_since[child.pid] = iso()
        log.info(
            f"booting worker with pid {child.pid}",
            extra={
                "kind": "worker",
                "queue": pool,
                "childPid": child.pid,
                "worker": worker_id(self.settings.worker.id, child.pid),
            },
        )
        return child

    def in_child(self, body: Callable[[], object]) -> None:
        self.signals.reset_in_child()
        self.systemd.notifier.forget_in_child()
        body()

    def live_workers(self) -> dict[str, WorkerInfo]:
        host = self.settings.worker.id
        return {
            worker_id(host, c.pid): WorkerInfo(
                queue=c.pool, host=host, hostname=self.hostname, pid=c.pid, since=self.worker_since.get(c.pid, "")
            )
            for c in self.children.workers()
        }

    # ---- the end --------------------------------------------------------------------

    def halt(self) -> None:
        """The last resort, as gunicorn's arbiter has: the loop raised, so stop as QUIT does, and say so.

        Called inside the ``except``: the traceback goes with the critical line.
        Workers must not outlive their supervisor's bug holding jobs, so each is
        stopped at once and reaped here, which hands what it held back to its queue.
        """
        log.critical("the supervisor loop failed; stopping now: jobs in hand go back to their queues", exc_info=True)
        self.exit_code = exitcodes.SUPERVISOR_ERROR
        try:
            self.quit_workers()
            deadline = time.monotonic() + QUIT_GRACE + KILL_GRACE
            while self.children.workers() and time.monotonic() < deadline:
                self.signals.wait(0.05)
                self.reap_workers()
                self.children.kill_overdue()
        except Exception:
            log.critical(
                "stopping after that failure failed too: jobs still held are recovered once their heartbeats expire",
                exc_info=True,
            )

    def shut_down(self) -> None:
        """Every worker is gone: hand back what Redis could not take yet, stop HTTP."""
        self.recovery.retry_pending()
        if self.recovery.pending:
            log.error(
                "Redis unreachable: jobs of stopped workers stay in their processing lists; "
                "any supervisor recovers them once their heartbeats expire",
                extra={"workers": sorted(self.recovery.pending)},
            )
        for child in self.children:
            self.children.stop(child, signal.SIGTERM, grace=KILL_GRACE, handback=Handback.UNCOUNTED, reason="shutdown")
        deadline = time.monotonic() + KILL_GRACE + 1
        while len(self.children) and time.monotonic() < deadline:
            self.signals.wait(0.05)
            self.children.reap()
            self.children.kill_overdue()
        log.info("supervisor stopped", extra={"exitCode": self.exit_code})
