"""Rate limits on the host: each provider's budget per minute, shared by every process, and the provider's own 429s.

Two things keep a host's calls under a provider's rate limit:

- **Budgets** (RATE_LIMIT_RPM, RATE_LIMIT_TPM): calls and tokens per minute per
  provider, counted in shared memory in one-second buckets (``layout.RateRow``)
  under the state's lock, so the host's workers together stay under them. A
  window of RATE_BUCKETS (61) buckets is summed, one more than the minute: a
  minute that starts inside a second spans 61 of them, so no 60-second span,
  however it falls, holds more than the budget. (A token bucket of the
  minute's capacity lets up to twice the budget through in one minute.) The
  budgets are the host's: hosts sharing one account split it between them.
  Tokens are counted when a call
  goes, at ``estimate_tokens``, and settled with what the provider reports it
  used when it ends. A call estimated at more than the whole TPM goes once
  the window is empty, rather than never.
- **Holds**: a provider that answers 429 with a wait (Retry-After, or its reset
  headers) holds back every call of the host to that model until then
  (``RateRow.hold_until``, per model label), not only the job that got it;
  for at most RATE_LIMIT_MAX_WAIT or a minute, whichever is longer.

A call that does not fit now waits on the host (no attempt spent, nothing the
breaker counts) while the wait leaves the job at least half of the time it had
(``WAIT_SHARE``); otherwise it raises ``OverBudget``, a ``RateLimited`` with
``retry_after`` the time until it would fit, and the job waits in the delayed
set as it does for the provider's own 429.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llm_worker.host.layout import MAX_PROVIDERS, RATE_BUCKETS, RATE_WINDOW, RateRow, RateTable
from llm_worker.host.stats import model_label
from llm_worker.plugin.providers import Deadline, RateLimited
from llm_worker.protocol.jobs import EmbeddingsRequest, Task
from llm_worker.settings.config import SettingError

if TYPE_CHECKING:
    from llm_worker.host.shm import SharedState
    from llm_worker.settings.config import Settings

log = logging.getLogger("llm_worker.worker")
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text (its tokenizer page); no tokenizer is shipped
DEFAULT_COMPLETION = 256  # tokens estimated for an answer when the job sets no num_predict (as the timeout fallback)
WAIT_SHARE = 0.5  # a call waits on the host while the wait leaves the job this share of its time
POLL = 0.5  # longest sleep between looks while waiting, so that the heartbeat stays fresh


class OverBudget(RateLimited):
    """A call the host kept back for a rate limit (its budget, or a provider's hold): no request was made."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, status=None)


@dataclass
class Ticket:
    """One admitted call: where its tokens were counted, and what the provider says it used (``used``)."""

    row: RateRow | None
    second: int = 0
    tokens: int = 0  # counted when it went
    used: int | None = None  # prompt and completion tokens, as the provider reports them: set by the caller


def estimate_tokens(task: Task, answer_cap: Callable[[Any], int] | None = None) -> int:
    """The tokens a call is counted at before it goes: its prompt's characters / 4, plus its answer's cap.

    The answer's cap is what the provider will ask for when it says
    (``answer_cap(request)``: Anthropic's ``max_tokens``, thinking's budget
    included), else ``num_predict`` when the job set one (positive), else
    DEFAULT_COMPLETION; embeddings have none. OpenAI counts a request against
    its TPM in the same way, from characters and max_tokens, before it runs.
    """
    request = task.request
    if isinstance(request, EmbeddingsRequest):
        return math.ceil(sum(map(len, request.inputs())) / CHARS_PER_TOKEN)
    prompt = math.ceil(request.prompt_chars() / CHARS_PER_TOKEN)
    if answer_cap is not None:
        return prompt + answer_cap(request)
    predict = request.options.num_predict if request.options is not None else None
    return prompt + (predict if predict is not None and predict > 0 else DEFAULT_COMPLETION)


def unknown_budgets(settings: Settings, names: list[str]) -> SettingError | None:
    """The error of a budget (RATE_LIMIT_RPM, RATE_LIMIT_TPM) for a provider this host does not have, or None.

    A typo (``opnai=500``) would limit nothing while the operator believes the
    host is under its limit: start-up refuses it, naming the providers there are.
    """
    known = ", ".join(sorted(set(names))) or "none"
    for variable, budgets in (("RATE_LIMIT_RPM", settings.ratelimit.rpm), ("RATE_LIMIT_TPM", settings.ratelimit.tpm)):
        strangers = sorted(set(budgets) - set(names))
        if strangers:
            shown = ",".join(f"{name}={value}" for name, value in budgets.items())
            return SettingError(variable, shown, f"budgets of this host's providers ({known}), not of {strangers[0]!r}")
    return None


class RateLimits:
    """The host's rate limits as one process uses them: admit calls, settle their tokens, note the provider's 429s."""

    def __init__(
        self,
        state: SharedState,
        settings: Settings,
        *,
        add_labels: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.state = state
        self.table: RateTable = state.ratelimits
        self.rpm = dict(settings.ratelimit.rpm)
        self.tpm = dict(settings.ratelimit.tpm)
        # A hold past RATE_LIMIT_MAX_WAIT only fails jobs faster: past it (or a minute), the provider is asked
        # again, so that a wrong header (a proxy's Retry-After of a day) cannot keep a model from the host.
        self.longest_hold = max(settings.ratelimit.max_wait / 1000, float(RATE_WINDOW))
        self.add_labels = add_labels
        self.clock = clock
        self.sleep = sleep
        self._rows: dict[str, RateRow | None] = {}
        self._seen: set[tuple[str, int]] = set()  # (provider, model label) whose bit this process has set

    # ---- around a provider call ---------------------------------------------------------

    @contextmanager
    def call(
        self,
        provider: str,
        task: Task,
        deadline: Deadline,
        beat: Callable[[], None] | None = None,
        answer_cap: Callable[[Any], int] | None = None,
    ) -> Iterator[Ticket]:
        """Admit one call of ``task`` to ``provider`` (waiting, or raising OverBudget), then settle it.

        The caller sets ``ticket.used`` from the answer. A provider's 429 that
        comes out of the call holds the model's calls back (``refused``); its
        tokens are given back, since the provider ran nothing.
        """
        ticket = self.admit(provider, task.model, estimate_tokens(task, answer_cap), deadline, beat)
        try:
            yield ticket
        except RateLimited as exc:
            if not isinstance(exc, OverBudget):
                self.refused(provider, task.model, exc.retry_after)
                ticket.used = 0
            self.settle(ticket)
            raise
        except BaseException:
            self.settle(ticket)
            raise
        self.settle(ticket)

    def admit(
        self, provider: str, model: str, tokens: int, deadline: Deadline, beat: Callable[[], None] | None = None
    ) -> Ticket:
        """Count one call and its estimated ``tokens``; wait for room while it leaves the job half its time.

        Raises OverBudget, with the seconds until it would fit, when the wait
        would be longer. A provider without a budget and without a hold costs
        no lock.
        """
        row = self._row(provider)
        if row is None:  # more providers than rows: none is counted
            return Ticket(None)
        index = self._label(provider, row, model)
        rpm, tpm = self.rpm.get(provider, 0), self.tpm.get(provider, 0)
        started = self.clock()
        if not rpm and not tpm and row.hold_until[index] <= started:
            return Ticket(row)
        longest = max(0.0, deadline.left()) * WAIT_SHARE
        counted = min(tokens, tpm) if tpm else tokens
        waited = False
        while True:
            with self.state.lock.held():
                now = self.clock()
                wait, why = self._room(row, index, rpm, tpm, counted if tpm else 0, now)
                if wait <= 0:
                    if waited:
                        row.waits += 1
                        row.wait_seconds += now - started
                    return self._take(row, now, counted) if rpm or tpm else Ticket(row)
                if now - started + wait > longest:
                    row.limited[index] += 1
                    raise OverBudget(f"{why}: room in {wait:.1f}s", wait)
            waited = True
            if beat is not None:
                beat()
            self.sleep(min(wait, POLL))

    def settle(self, ticket: Ticket) -> None:
        """Count what the call used in place of its estimate (nothing to do when the provider did not say)."""
        row = ticket.row
        if row is None or ticket.used is None or ticket.used == ticket.tokens or not ticket.second:
            return
        bucket = ticket.second % RATE_BUCKETS
        with self.state.lock.held():
            if row.bucket_second[bucket] == ticket.second:  # else it has left the window: nothing to correct
                row.bucket_tokens[bucket] = max(0, row.bucket_tokens[bucket] + ticket.used - ticket.tokens)

    def refused(self, provider: str, model: str, retry_after: float | None) -> None:
        """The provider answered 429: count it, and hold the model's calls back as long as it asked (capped)."""
        row = self._row(provider)
        if row is None:
            return
        index = self._label(provider, row, model)
        with self.state.lock.held():
            row.refusals += 1
            row.limited[index] += 1
            # No hold on "other" (index 0): it lumps unrelated models together, and one's 429 would hold them all.
            if retry_after is not None and retry_after > 0 and index > 0:
                hold = self.clock() + min(retry_after, self.longest_hold)
                row.hold_until[index] = max(row.hold_until[index], hold)

    # ---- the window, under the lock ------------------------------------------------------

    def _room(self, row: RateRow, index: int, rpm: int, tpm: int, tokens: int, now: float) -> tuple[float, str]:
        """Seconds until a call of ``tokens`` fits (0: now), and what holds it back."""
        waits = [(row.hold_until[index] - now, "the provider answered 429 and asked to wait")]
        if rpm or tpm:
            buckets = window(row, int(now))
            calls = sum(b[1] for b in buckets)
            used = sum(b[2] for b in buckets)
            if rpm and calls + 1 > rpm:
                waits.append((_freed(buckets, calls + 1 - rpm, 1, now), f"{calls} calls in the last minute, RPM {rpm}"))
            if tpm and used + tokens > tpm:
                waits.append(
                    (_freed(buckets, used + tokens - tpm, 2, now), f"{used} + {tokens} tokens in a minute, TPM {tpm}")
                )
        wait, why = max(waits)
        name = row.name.decode(errors="replace")
        return wait, f"rate limit of {name} ({why})"

    def _take(self, row: RateRow, now: float, tokens: int) -> Ticket:
        second = int(now)
        bucket = second % RATE_BUCKETS
        if row.bucket_second[bucket] != second:
            row.bucket_second[bucket] = second
            row.bucket_calls[bucket] = 0
            row.bucket_tokens[bucket] = 0
        row.bucket_calls[bucket] += 1
        row.bucket_tokens[bucket] += tokens
        return Ticket(row, second, tokens)

    # ---- rows and labels -----------------------------------------------------------------

    def _row(self, provider: str) -> RateRow | None:
        if provider in self._rows:
            return self._rows[provider]
        row = find_row(self.table, provider)
        if row is None:
            with self.state.lock.held():
                row = find_row(self.table, provider)
                if row is None and self.table.count < MAX_PROVIDERS:
                    row = self.table.rows[self.table.count]
                    row.name = provider.encode()[:31]
                    self.table.count += 1
        self._rows[provider] = row
        return row

    def _label(self, provider: str, row: RateRow, model: str) -> int:
        """The model's label index; the first call of it through this provider sets its bit (metrics at zero)."""
        index = self.state.model_index(model_label(model), add=self.add_labels)
        if (provider, index) not in self._seen:
            with self.state.lock.held():
                row.models |= 1 << index
            self._seen.add((provider, index))
        return index


def find_row(table: RateTable, provider: str) -> RateRow | None:
    name = provider.encode()[:31]
    return next((row for row in table.rows[: table.count] if row.name == name), None)


def window(row: RateRow, second: int) -> list[tuple[int, int, int]]:
    """The buckets of the last minute as (second, calls, tokens), oldest first."""
    oldest = second - RATE_BUCKETS
    return sorted(
        (row.bucket_second[i], row.bucket_calls[i], row.bucket_tokens[i])
        for i in range(RATE_BUCKETS)
        if row.bucket_second[i] > oldest and (row.bucket_calls[i] or row.bucket_tokens[i])
    )


def _freed(buckets: list[tuple[int, int, int]], excess: int, field: int, now: float) -> float:
    """Seconds until the oldest buckets leave the window with ``excess`` of their calls (1) or tokens (2)."""
    freed = 0
    for bucket in buckets:
        freed += bucket[field]
        if freed >= excess:
            return bucket[0] + RATE_BUCKETS - now
    return float(RATE_BUCKETS)


def snapshot(state: SharedState, settings: Settings) -> list[dict[str, Any]]:
    """Each provider's budget and what rate limits did, for /status (read without the lock)."""
    r = settings.ratelimit
    table = state.ratelimits
    labels = state.model_labels()
    now = time.monotonic()
    names = [row.name.decode(errors="replace") for row in table.rows[: table.count]]
    out = []
    for name in [*names, *(p for p in {**r.rpm, **r.tpm} if p not in names)]:
        row = find_row(table, name)
        buckets = window(row, int(now)) if row is not None else []
        calls, tokens = sum(b[1] for b in buckets), sum(b[2] for b in buckets)
        rpm, tpm = r.rpm.get(name), r.tpm.get(name)
        held = {}
        if row is not None:
            held = {
                labels[i]: round(row.hold_until[i] - now, 1)
                for i in range(min(len(labels), len(row.hold_until)))
                if row.hold_until[i] > now
            }
        out.append(
            {
                "provider": name,
                "rpm": rpm,
                "tpm": tpm,
                "callsLastMinute": calls,
                "tokensLastMinute": tokens,
                "callsLeft": max(0, rpm - calls) if rpm else None,
                "tokensLeft": max(0, tpm - tokens) if tpm else None,
                "heldSeconds": held,
                "rateLimited": sum(row.limited) if row is not None else 0,
                "providerRefusals": row.refusals if row is not None else 0,
                "waits": row.waits if row is not None else 0,
                "waitSeconds": round(row.wait_seconds, 3) if row is not None else 0.0,
            }
        )
    return out
