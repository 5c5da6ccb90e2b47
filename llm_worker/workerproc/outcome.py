"""What running one job came to: the value the executor returns and the finisher records."""

from __future__ import annotations

from dataclasses import dataclass

from llm_worker.protocol.jobs import Answer, JobError


@dataclass(frozen=True)
class Outcome:
    """One job's answer, or the error that stands, and what it took to get there.

    ``attempts``: the job's attempts this run spent, one per provider call;
    0 when it made none (every candidate refused by an open breaker, or the
    cache answered). A call a rate limit stopped (the provider's 429 included)
    is none. A job a request filter refused spends one, as a run does.
    ``tried``: the models the job was routed to, in order. ``streamed``: the
    chunks a reader has already seen, which no retry can take back.
    """

    answer: Answer | None = None
    error: JobError | None = None
    attempts: int = 1
    tried: tuple[str, ...] = ()
    streamed: int = 0

    def __post_init__(self) -> None:
        if (self.answer is None) == (self.error is None):
            raise ValueError("an outcome has an answer or an error, not both nor neither")
