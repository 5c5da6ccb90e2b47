"""Model loads belong to the host: workers ask for them here, the model manager makes them.

Ollama loads a model on the first request that names it, under that
request's context (server/sched.go, v0.33): when the request's client goes
away (a job's deadline closing the connection), the load is abandoned. A
70B model that takes minutes to load would then never finish loading for
jobs with short timeouts, and each abandoned load looked like a provider
failure to the breaker. So jobs never load. A worker whose model is not
resident posts a request on this board (shared memory) and waits; the model
manager loads each asked-for model once, under its own long deadline
(OLLAMA_MODEL_LOAD_TIMEOUT), and posts the outcome. A job's deadline may end
its own wait, never the load; waiting is never a provider failure.

One row per model label (the index of ``SharedState.model_index``). Writers:
workers write ``asked`` (any of them, a plain store of a time: the latest
wins, which is all the manager needs); the manager writes everything else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llm_worker.host.layout import ERROR_BYTES, MAX_MODELS, Board, LoadRow
from llm_worker.plugin.providers import Deadline, ProviderError
from llm_worker.protocol.jobs import ErrorKind, JobError

POLL = 0.02  # seconds between a waiting worker's looks at its row
UNSERVED = 5.0  # seconds after which a request no manager took up is given up: the call loads on demand
_KINDS = list(ErrorKind)


# Why a load started (``LoadRow.why``), as /status and the events say it.
PRELOAD, ASKED, DEMAND = 1, 2, 3
WHY = {PRELOAD: "preload", ASKED: "a job asked", DEMAND: "queued jobs"}  # DEMAND: parked jobs no host holds


class ModelLoading(JobError):
    """A job's deadline came while its model was still loading: retried later, never a provider failure."""

    kind = ErrorKind.TIMEOUT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.counted = False


@dataclass(frozen=True)
class InProgress:
    label: str
    seconds: float
    why: str


def waiting_error(row: LoadRow, model: str) -> ProviderError:
    """The failure of the last load of ``model``, as the job that waited for it sees it."""
    text = row.error.decode(errors="replace") or "the model could not be loaded"
    return ProviderError(
        f"loading {model}: {text}", _KINDS[row.error_kind], retryable=bool(row.retryable), crashed=bool(row.crashed)
    )


class LoadBoard:
    """The host's load requests and their outcomes, over ``Board`` in shared memory."""

    def __init__(self, board: Board) -> None:
        self.board = board

    # ---- the workers' side ---------------------------------------------------------

    def manages(self, provider: str) -> bool:
        """Whether the model manager loads this provider's models (then jobs wait for loads here)."""
        return bool(self.board.provider) and self.board.provider.decode() == provider

    def wait_resident(self, index: int, model: str, deadline: Deadline, beat: Callable[[], None]) -> float:
        """Return at once when the model is resident; else ask for it and wait. Return the seconds waited.

        Raises the load's own error when it fails (a model Ollama lacks is a
        model error; a crashed runner is transient), or ModelLoading when the
        job's deadline comes first; the load goes on for the jobs after it.
        """
        row = self.board.rows[index]
        if index <= 0 or row.resident:
            return 0.0
        began = time.monotonic()
        seen = row.done
        if row.failed and row.started == 0 and began - row.failed_at < 1.0:
            raise waiting_error(row, model)  # it failed just now: asking again would fail the same way
        row.asked = began
        while not row.resident:
            if row.done != seen and row.failed:
                raise waiting_error(row, model)
            left = deadline.left()
            if left <= POLL:
                since = f"for {time.monotonic() - row.started:.1f}s" if row.started else "not yet started"
                raise ModelLoading(
                    f"{model} is still loading ({since}; the host loads it once for every job): "
                    f"this job's time ran out first"
                )
            if not row.started and row.done == seen and time.monotonic() - began > UNSERVED:
                return time.monotonic() - began  # no manager at work (restarting?): Ollama loads it for the call
            beat()
            if row.done != seen and not row.failed and not row.resident:
                seen = row.done  # loaded, then let go before we looked (evicted): ask again
                row.asked = time.monotonic()
            time.sleep(min(POLL, left - POLL))
        return time.monotonic() - began

    # ---- the manager's side --------------------------------------------------------

    def serve(self, provider: str) -> None:
        self.board.provider = provider.encode()[:31]

    def forget_unfinished(self) -> None:
        """Let go of loads a manager that died (or was replaced on HUP) had begun: asked again, they are made anew."""
        for row in self.board.rows:
            row.started = 0.0

    def begin(self, index: int, why: int) -> None:
        row = self.board.rows[index]
        row.why = why
        row.started_wall = time.time()
        row.started = time.monotonic()

    def succeeded(self, index: int, seconds: float) -> None:
        row = self.board.rows[index]
        row.seconds = seconds
        row.failed = 0
        row.resident = 1
        row.started = 0.0
        row.done += 1

    def failed(self, index: int, error: ProviderError) -> None:
        row = self.board.rows[index]
        row.error = error.message.encode(errors="replace")[: ERROR_BYTES - 1]
        row.error_kind = _KINDS.index(error.kind)
        row.crashed = int(error.crashed)
        row.retryable = int(error.retryable)
        row.failed_at = time.monotonic()
        row.failed = 1
        row.started = 0.0
        row.done += 1

    def set_resident(self, index: int, resident: bool) -> None:
        self.board.rows[index].resident = int(resident)

    def in_progress(self, labels: list[str]) -> list[InProgress]:
        """Loads under way now, for /status and /metrics."""
        now = time.monotonic()
        out = []
        for index, label in enumerate(labels[:MAX_MODELS]):
            row = self.board.rows[index]
            if row.started:
                out.append(InProgress(label, max(0.0, now - row.started), WHY.get(row.why, "unknown")))
        return out
