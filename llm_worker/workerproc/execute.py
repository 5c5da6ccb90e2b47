"""Run a validated job against the providers: breakers, fallbacks, filters; chat, generate, embeddings, batch.

Each model call goes to one endpoint of its provider (routing.py: where its
model is loaded with a free slot, else the least busy that can load it) and
through that endpoint's circuit breaker. When a call
fails, the fallback strategies (plugins) are asked what to try next, within
the job's one budget of attempts and its one deadline. What to do with a
failure that stands (retry later, dead-letter) is the finisher's decision:
the executor returns one Outcome per job and raises for none of them. A rate
limit (the provider's 429, or the host's budget: host/ratelimit.py) is no
failure: it ends the run at once, with no attempt spent and no fallback.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import msgspec

from llm_worker.host.backpressure import CallGate, ProviderDown, Reachability
from llm_worker.host.breaker import BreakerOpen, Breakers, breaker_record, counts
from llm_worker.host.loadboard import LoadBoard
from llm_worker.host.ratelimit import RateLimits, Ticket
from llm_worker.host.routing import Router
from llm_worker.host.stats import model_label
from llm_worker.plugin.attempts import Attempt, Plan
from llm_worker.plugin.manager import PluginManager
from llm_worker.plugin.providers import (
    INCOMPLETE,
    Completion,
    Deadline,
    Incomplete,
    OnChunk,
    Provider,
    ProviderError,
    RateLimited,
    endpoint_of,
)
from llm_worker.protocol.jobs import (
    Answer,
    ChatRequest,
    Decoded,
    EmbeddingsRequest,
    ErrorKind,
    GenerateRequest,
    JobError,
    Options,
    Result,
    Task,
    iso,
)
from llm_worker.queue.cache import ResponseCache
from llm_worker.settings.config import Settings
from llm_worker.workerproc.outcome import Outcome
from llm_worker.workerproc.stream import StreamSink

log = logging.getLogger("llm_worker.worker")
LEASE_GRACE = 5.0  # seconds a half-open probe's lease outlives its deadline


class Executor:
    """Routes each model call to the first provider that serves its model, and to one of its endpoints."""

    def __init__(
        self,
        providers: list[Provider],
        plugins: PluginManager,
        breakers: Breakers,
        settings: Settings,
        worker_id: str,
        cache: ResponseCache | None = None,
        gate: CallGate | None = None,
        reach: Reachability | None = None,
        loads: LoadBoard | None = None,
        limits: RateLimits | None = None,
    ) -> None:
        self.providers = providers
        self.limits = limits
        self.loads = loads
        self.gate = gate
        self.reach = reach
        self.cache = cache
        self.plugins = plugins
        self.breakers = breakers
        self.settings = settings
        self.worker_id = worker_id
        state = gate.state if gate is not None else None
        add = gate.add_labels if gate is not None else True
        self.router = Router(providers, breakers, reach, loads, state, add_labels=add)

    def provider_for(self, model: str, *, embedding: bool = False, avoid: Iterable[str] = ()) -> Provider:
        """The endpoint a call of ``model`` goes to now; ``avoid``: endpoints that failed this job (routing.py)."""
        return self.router.route(model, embedding=embedding, avoid=avoid)

    def endpoints_for(self, model: str) -> list[Provider]:
        """Every endpoint that could serve ``model`` (of the first provider that serves it)."""
        return self.router.endpoints_for(model)

    def run(self, decoded: Decoded, deadline: Deadline, sink: StreamSink | None) -> Outcome:
        """Run the job to its outcome: its answer, or the error that stands; a failure is never raised."""
        try:
            if decoded.job.type == "batch":
                return self._batch(decoded, deadline)
            return self.call(decoded, decoded.tasks[0], deadline, sink)
        except Exception as exc:  # a bug in us or a plugin: fail the job, keep the worker
            log.exception("job failed with an unexpected error", extra={"jobId": decoded.job.id})
            return Outcome(error=JobError(f"unexpected error: {exc!r}"), streamed=_published(sink))

    # ---- one call, its attempts and fallbacks --------------------------------------

    def call(self, job: Decoded, task: Task, deadline: Deadline, sink: StreamSink | None) -> Outcome:
        """One model call and its fallbacks, to their outcome."""
        tally = _Tally()
        try:
            answer = self._call(job, task, deadline, sink, tally)
        except JobError as exc:
            return Outcome(error=exc, attempts=tally.calls, tried=tuple(tally.tried), streamed=_published(sink))
        return Outcome(answer, attempts=tally.calls, tried=tuple(tally.tried), streamed=_published(sink))

    def _call(self, job: Decoded, task: Task, deadline: Deadline, sink: StreamSink | None, tally: _Tally) -> Answer:
        """The answer of one model call and its fallbacks, or raise the error that stands; ``tally`` keeps count."""
        requested, refused = task.model, []
        reduced = unloaded = planned = switched = False
        failed: set[str] = set()  # endpoints that failed this call: its retries and fallbacks go elsewhere first
        key = None
        while True:
            embedding = isinstance(task.request, EmbeddingsRequest)
            provider = self.provider_for(task.model, embedding=embedding, avoid=failed)
            if not switched:  # the same call moved to another endpoint is not another try
                tally.tried.append(task.model)
                key = self.cache.key_of(provider.name, task) if self.cache is not None and not planned else None
                if key is not None and (hit := self.cache.get(key)) is not None:  # type: ignore[union-attr]
                    self.plugins.filter_response(job, hit)
                    return hit
            switched = False
            try:
                answer = self._attempt(provider, task, deadline, sink, unloaded=unloaded, reduced=reduced)
            except BreakerOpen as exc:  # refused before any call: no attempt spent
                failed.add(endpoint_of(provider))
                if self._elsewhere(task.model, failed):
                    switched = True  # another endpoint can take the call now: no attempt, no fallback
                    continue
                error: JobError = exc
                refused.append(exc)
            except RateLimited:
                # Not a failure: the job waits as the provider (or the host's budget) asks, spending no
                # attempt, and for its own model: a fallback model is most often the same provider's quota.
                raise
            except JobError as exc:
                failed.add(endpoint_of(provider))
                error = exc
                tally.calls += 1
            else:
                tally.calls += 1
                answer.fallback_used = planned
                if key is not None:
                    self.cache.put(key, answer)  # type: ignore[union-attr]
                    answer.cache_lookup = True
                self.plugins.filter_response(job, answer)
                return answer
            streamed = _published(sink)
            spent = job.job.retry_count + tally.calls
            if isinstance(error, Incomplete) and (streamed or spent >= job.max_attempts or deadline.left() <= 0):
                # No attempt left to get it whole (or its text already streamed, which a reader
                # cannot take back): the part there is, said to be a part.
                log.warning(
                    "answer incomplete on the job's last attempt; answering what came",
                    extra={"jobId": job.job.id, "model": task.model, "error": error.message},
                )
                answer = _answer(task, error.partial, INCOMPLETE)
                answer.fallback_used = planned
                self.plugins.filter_response(job, answer)
                return answer
            attempt = Attempt(
                number=spent if tally.calls else spent + 1,
                budget=job.max_attempts,
                model=task.model,
                requested_model=requested,
                tried=list(tally.tried),
                left=deadline.left(),
                settings=self.settings,
                breaker_open=self._refused,
                reduced=reduced,
                unloaded=unloaded,
                streamed=streamed,
                task=task,
            )
            plan = None
            if (
                not streamed
                and error.kind is not ErrorKind.VALIDATION
                and spent < job.max_attempts
                and deadline.left() > 0
            ):
                plan = self.plugins.fallback(job, error, attempt)
            if plan is None:
                if refused and isinstance(error, BreakerOpen):
                    # Every candidate refused by an open breaker: an outage. Wait for the first.
                    raise min(refused, key=lambda e: e.retry_at)
                raise error
            log.info(
                f"fallback: {plan.reason}",
                extra={"jobId": job.job.id, "model": task.model, "next": plan.model or task.model},
            )
            task = self._apply(plan, task, provider, deadline)
            planned = True
            reduced = reduced or bool(plan.options)
            unloaded = unloaded or plan.unload_idle

    # ---- embeddings jobs gathered into one call ------------------------------------

    def embed_together(self, jobs: list[Decoded], deadline: Deadline) -> list[Outcome] | None:
        """Answer several embeddings jobs of one model and options with one provider call: one outcome each.

        Cached answers are served from the cache and left out of the call.
        When the shared call fails, no job is answered and None returned: the
        caller runs them one by one, so that one bad input fails only its own
        job. Each job gets its own vectors; the call's prompt tokens are
        shared out in proportion to the characters of each job's inputs.
        """
        try:
            answers = self._embed_together(jobs, deadline)
        except JobError as exc:
            log.info(
                "a gathered embeddings call failed; running its jobs one by one",
                extra={"jobs": len(jobs), "errorType": exc.kind.value, "error": exc.message},
            )
            return None
        except Exception:
            log.exception("a gathered embeddings call failed; running its jobs one by one")
            return None
        return [Outcome(answer, tried=(job.tasks[0].model,)) for job, answer in zip(jobs, answers)]

    def _embed_together(self, jobs: list[Decoded], deadline: Deadline) -> list[Answer]:
        tasks = [d.tasks[0] for d in jobs]
        provider = self.provider_for(tasks[0].model, embedding=True)
        answers: list[Answer | None] = [None] * len(jobs)
        keys: list[str | None] = [None] * len(jobs)
        if self.cache is not None:
            for i, task in enumerate(tasks):
                keys[i] = key = self.cache.key_of(provider.name, task)
                answers[i] = self.cache.get(key) if key is not None else None
        misses = [i for i, a in enumerate(answers) if a is None]
        if misses:
            inputs = [tasks[i].request.inputs() for i in misses]  # type: ignore[union-attr]
            first = tasks[misses[0]]
            joined = msgspec.structs.replace(
                first.request, input=[text for group in inputs for text in group], prompt=None
            )
            whole = self._attempt(provider, dataclasses.replace(first, request=joined), deadline, None)
            vectors = whole.response["embeddings"]
            shares = _shares(whole.prompt_tokens, [sum(map(len, group)) for group in inputs])
            at = 0
            for i, group, tokens in zip(misses, inputs, shares):
                answer = Answer({"embeddings": vectors[at : at + len(group)]}, whole.model, tokens, None)
                at += len(group)
                if keys[i] is not None:
                    self.cache.put(keys[i], answer)  # type: ignore[union-attr, arg-type]
                    answer.cache_lookup = True
                answers[i] = answer
        for job, answer in zip(jobs, answers):
            self.plugins.filter_response(job, answer)  # type: ignore[arg-type]
        return answers  # type: ignore[return-value]

    # ---- the provider call, behind the gate, reachability and breaker ---------------

    def _attempt(
        self,
        provider: Provider,
        task: Task,
        deadline: Deadline,
        sink: StreamSink | None,
        unloaded: bool = False,
        reduced: bool = False,
    ) -> Answer:
        """One call to one endpoint: its reachability, its breaker, its model's load there, its rate limits, then the
        host's call gate.

        ``unloaded``: the memory strategy already unloaded idle models for this
        job, so a crashed runner now is a broken model, counted by the breaker.
        ``reduced``: the timeout fallback already shortened the job; until it
        has, the call may use only part of the job's time (FALLBACK_TIMEOUT_RESERVE).
        """
        endpoint = endpoint_of(provider)
        if self.reach is not None and self.reach.is_down(endpoint):
            raise ProviderDown(endpoint, self.reach.error(endpoint))
        admission = self.breakers.admit(endpoint, task.model, deadline.left() + LEASE_GRACE)
        self._report_transitions()
        try:
            with self._routed(provider, task):
                self._await_model(provider, task.model, deadline)
                # The gate first: a call is counted against the budget when it can go, not while it waits for
                # a slot (it could then be sent in a later minute, beside that minute's own calls).
                with self._gate(provider, task, deadline), self._budget(provider, task, deadline) as ticket:
                    call_deadline = self._call_deadline(task, deadline, sink, reduced)
                    answer = self._run_task(provider, task, call_deadline, sink)
                    ticket.used = answer.tokens
        except JobError as exc:
            if unloaded and getattr(exc, "crashed", False):
                exc.counted = True  # type: ignore[attr-defined]
            self.breakers.record(admission, exc)
            self._report_transitions()
            if admission.probe and counts(exc):
                # The half-open breaker's probe failed: the outage goes on. The
                # job was the host's test of the provider, so it spends no attempt
                # (else the job at the head of the queue would die probing); the
                # finisher bounds how often one job may probe for free.
                raise BreakerOpen(
                    admission.key,
                    self.breakers.open_until(admission.key),
                    f"{exc.message} (the circuit breaker's probe)",
                    probe_failed=True,
                ) from exc
            if isinstance(exc, ProviderError) and exc.unreachable and self.reach is not None:
                # Nothing listens: the endpoint is down, not this job failing. The job
                # goes to another endpoint, or waits without spending an attempt while
                # the workers pause (when no endpoint of its provider answers).
                if self.reach.mark_down(endpoint, exc.message):
                    others = len(self.router.endpoints_for(task.model)) > 1
                    log.warning(
                        f"provider {endpoint} is unreachable; "
                        + ("its calls go to the other endpoints" if others else "workers pause")
                        + " until it answers",
                        extra={"error": exc.message},
                    )
                raise ProviderDown(endpoint, exc.message) from exc
            raise
        self.breakers.record(admission, None)
        self._report_transitions()
        return answer

    def _routed(self, provider: Provider, task: Task) -> Any:
        """The worker marked as bound for this endpoint and model until the call is over (routing counts it)."""
        endpoint = self.router.index(provider)
        if self.gate is None or endpoint < 0:
            return nullcontext()
        return self.gate.routed(task.model, endpoint)

    def _elsewhere(self, model: str, failed: set[str]) -> bool:
        """Whether an endpoint that has not failed this call could take it now."""
        return any(
            endpoint_of(p) not in failed and self.router.usable(p, model) for p in self.router.endpoints_for(model)
        )

    def _await_model(self, provider: Provider, model: str, deadline: Deadline) -> None:
        """Wait until the endpoint has the model loaded, when the model manager loads this provider's models."""
        endpoint = self.router.index(provider)
        if self.loads is None or self.gate is None or endpoint < 0 or not self.loads.manages(provider.name):
            return
        index = self.gate.state.model_index(model_label(model), add=self.gate.add_labels)
        waited = self.loads.wait_resident(endpoint, index, model, deadline, self.gate.slot.beat)
        if waited > 0.5:
            log.info(
                f"waited {waited:.1f}s for {model} to load", extra={"model": model, "waitSeconds": round(waited, 2)}
            )

    def _budget(self, provider: Provider, task: Task, deadline: Deadline) -> Any:
        """The host's rate limits for this call: its provider's budget and 429 holds (host/ratelimit.py)."""
        if self.limits is None:
            return nullcontext(Ticket(None))
        beat = self.gate.slot.beat if self.gate is not None else None
        return self.limits.call(provider.name, task, deadline, beat, getattr(provider, "answer_cap", None))

    def _gate(self, provider: Provider, task: Task, deadline: Deadline) -> Any:
        """The host's call gate for this call: its cap, the model's slots and the endpoint's cap."""
        if self.gate is None:
            return nullcontext()
        slots = getattr(provider, "model_slots", None)
        model_slots = slots(task.model, isinstance(task.request, EmbeddingsRequest)) if slots is not None else 0
        return self.gate.call(
            task.model,
            deadline,
            model_slots=model_slots,
            provider=self.router.index(provider),
            provider_cap=getattr(provider, "max_concurrent", 0) or 0,
        )

    def _call_deadline(self, task: Task, deadline: Deadline, sink: StreamSink | None, reduced: bool) -> Deadline:
        """The job's deadline, less the share kept back for the timeout fallback while it may still run.

        Without it a call would time out when the job's own time does (with
        the defaults, OLLAMA_TIMEOUT equals WORKER_TIMEOUT) and a shorter
        answer could never be asked for. Not for embeddings (nothing to
        shorten), nor a stream (once text is out, the job is tried again whole).
        """
        reserve = self.settings.fallback.timeout_reserve
        if reduced or reserve <= 0 or sink is not None or isinstance(task.request, EmbeddingsRequest):
            return deadline
        return deadline.share(1.0 - reserve)

    def _apply(self, plan: Plan, task: Task, provider: Provider, deadline: Deadline) -> Task:
        if plan.unload_idle:
            unload = getattr(provider, "unload_idle", None)
            if unload is not None:
                # Spare what other workers are calling: unloading it would only move the shortage there.
                keep = {task.model, *(self.gate.models_in_use() if self.gate is not None else ())}
                unloaded = unload(keep=keep, deadline=deadline)
                log.warning("unloaded idle models to free memory", extra={"models": unloaded, "keep": sorted(keep)})
        request = task.request
        if plan.options and not isinstance(request, EmbeddingsRequest):
            current = msgspec.structs.asdict(request.options) if request.options is not None else {}
            options = msgspec.convert({k: v for k, v in {**current, **plan.options}.items() if v is not None}, Options)
            request = msgspec.structs.replace(request, options=options)
        return dataclasses.replace(task, model=plan.model or task.model, request=request)

    def _refused(self, model: str) -> bool:
        """Whether every endpoint that could serve ``model`` refuses it now (down, or its breaker open)."""
        try:
            endpoints = self.router.endpoints_for(model)
        except JobError:
            return True
        return not any(self.router.usable(p, model) for p in endpoints)

    def _report_transitions(self) -> None:
        """Log and record each breaker transition this process made: once, from here."""
        for t in self.breakers.transitions:
            (log.warning if t.to == "opened" else log.info)(f"circuit breaker {t.to}: {t.key}: {t.reason}")
            self.plugins.record(breaker_record(t, self.worker_id))
        self.breakers.transitions.clear()

    # ---- the provider call itself --------------------------------------------------

    def _run_task(self, provider: Provider, task: Task, deadline: Deadline, on_chunk: OnChunk | None) -> Answer:
        request = task.request
        if isinstance(request, EmbeddingsRequest):
            options: dict[str, Any] = {}
            if request.truncate is not None:
                options["truncate"] = request.truncate
            if request.keep_alive is not None:
                options["keep_alive"] = request.keep_alive
            if request.options is not None:
                options["options"] = request.options
            vectors = provider.embed(task.model, request.inputs(), deadline, options)
            return Answer({"embeddings": vectors.vectors}, vectors.model or task.model, vectors.prompt_tokens, None)
        if isinstance(request, ChatRequest):
            done = provider.chat(task.model, request, deadline, on_chunk)
        else:
            assert isinstance(request, GenerateRequest)
            done = provider.generate(task.model, request, deadline, on_chunk)
        return _answer(task, done, done.done_reason)

    def _batch(self, decoded: Decoded, deadline: Deadline) -> Outcome:
        """Run a batch's requests in order; each gets its own result.

        One failed request fails only its own entry. When every request failed
        in a way worth retrying (the provider is down), the whole batch is
        retried instead of answering with nothing but failures. The batch's
        attempts are its last request's, which the finisher counts.
        """
        job = decoded.job
        results: list[Result] = []
        errors: list[JobError] = []
        tried: list[str] = []
        attempts = 1
        prompt = completion = 0
        fallback = False
        for index, task in enumerate(decoded.tasks):
            started = time.monotonic()
            sub_id = f"{job.id}:{index}"
            called = self.call(decoded, task, deadline, None)
            attempts = called.attempts
            tried += called.tried
            answer = called.answer
            if answer is None:
                exc = called.error
                assert exc is not None  # an outcome has one or the other
                errors.append(exc)
                results.append(
                    Result(
                        job_id=sub_id,
                        success=False,
                        error=exc.message,
                        error_type=exc.kind.value,
                        model=task.model,
                        requested_model=task.model,
                        correlation_id=job.correlation_id,
                        processing_time=_ms(time.monotonic() - started),
                        completed_at=iso(),
                    )
                )
                continue
            prompt += answer.prompt_tokens or 0
            completion += answer.completion_tokens or 0
            fallback = fallback or answer.fallback_used
            results.append(
                Result(
                    job_id=sub_id,
                    success=True,
                    response=answer.response,
                    model=answer.model,
                    requested_model=task.model,
                    tokens_used=answer.tokens,
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    correlation_id=job.correlation_id,
                    fallback_used=answer.fallback_used,
                    processing_time=_ms(time.monotonic() - started),
                    completed_at=iso(),
                )
            )
        if errors and len(errors) == len(results) and all(e.retryable for e in errors):
            return Outcome(error=errors[0], attempts=attempts, tried=tuple(tried))
        answer = Answer({"results": results}, decoded.model, prompt, completion, fallback_used=fallback)
        return Outcome(answer, attempts=attempts, tried=tuple(tried))


def _answer(task: Task, done: Completion, done_reason: str | None) -> Answer:
    """A chat or generate answer as results carry it; a thinking model's reasoning beside the text."""
    if isinstance(task.request, ChatRequest):
        message = dict(done.message or {"role": "assistant", "content": done.text})
        if done.thinking and "thinking" not in message:
            message["thinking"] = done.thinking
        response: dict[str, Any] = {"message": message, "doneReason": done_reason}
    else:
        response = {"response": done.text, "doneReason": done_reason}
        if done.thinking:
            response["thinking"] = done.thinking
    return Answer(response, done.model or task.model, done.prompt_tokens, done.completion_tokens)


@dataclass
class _Tally:
    """What one call and its fallbacks did so far: counted as they go, for its Outcome however it ends."""

    tried: list[str] = field(default_factory=list)  # the models routed to, in order
    calls: int = 0  # provider calls made: each spends one of the job's attempts


def _published(sink: StreamSink | None) -> int:
    return sink.published if sink is not None else 0


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def _shares(total: int | None, weights: list[int]) -> list[int | None]:
    """Split ``total`` in proportion to ``weights``, in whole numbers that add up to it."""
    if total is None:
        return [None] * len(weights)
    whole = sum(weights)
    if whole == 0:
        weights, whole = [1] * len(weights), len(weights)
    shares = [total * w // whole for w in weights]
    for i in sorted(range(len(weights)), key=lambda i: -(total * weights[i] % whole))[: total - sum(shares)]:
        shares[i] += 1
    return shares
