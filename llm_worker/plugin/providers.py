"""The provider contract: what a provider object offers the workers.

A provider is returned by a plugin's ``llm_worker_providers()`` hook. It speaks
to one model server (Ollama, an OpenAI-compatible server, ...) and raises
``ProviderError`` with an ``ErrorKind`` for every failure, so that retries,
breakers and fallbacks treat every provider alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from msgspec import Struct

from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest, JobError

# A provider calls ``on_chunk(text)`` with each piece of the answer as it streams,
# and ``on_chunk("", thinking=piece)`` with each piece of a thinking model's reasoning.
OnChunk = Callable[..., None]


class ProviderError(JobError):
    """A provider call failed. ``status`` is the HTTP status when there was one.

    ``unreachable`` says no connection could be made at all: the request never
    reached the server. Workers then treat the provider as down (they pause and
    the job goes back to its queue without spending an attempt) rather than the
    job as failing.

    ``counted`` says whether the provider's circuit breaker counts the failure;
    None leaves it to the kind (timeouts, network and provider errors count).
    ``crashed`` says the server's model process died (Ollama's "llama-server
    process has terminated", an out-of-memory at load): freeing memory may
    help once, so the first such failure of a job is not counted; one that
    repeats after idle models were unloaded is a broken model, and counts.
    """

    def __init__(
        self,
        message: str,
        kind: ErrorKind,
        *,
        status: int | None = None,
        retryable: bool | None = None,
        unreachable: bool = False,
        counted: bool | None = None,
        crashed: bool = False,
    ) -> None:
        super().__init__(message, kind, retryable=retryable)
        self.status = status
        self.unreachable = unreachable
        self.counted = counted
        self.crashed = crashed


class Incomplete(ProviderError):
    """An answer that ended without its end: a stream cut short, a ``done: false`` reply, ``[DONE]`` alone.

    Never a success as it stands: the job is tried again while it has attempts
    left, and its last attempt answers ``partial`` with doneReason
    ``incomplete``. The server did answer, so the breaker does not count it.
    """

    def __init__(self, message: str, partial: Completion) -> None:
        super().__init__(message, ErrorKind.PROVIDER, counted=False)
        self.partial = partial


class RateLimited(ProviderError):
    """The provider refused for its rate limit (HTTP 429; Anthropic's 529 ``overloaded_error`` is not one).

    ``retry_after`` is how many seconds the provider asked us to wait
    (``Retry-After``, or its own reset headers), None when it did not say.
    The job is not failing and the provider is not broken: the job waits that
    long in the delayed set without spending an attempt, and the breaker does
    not count it.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, status: int | None = 429) -> None:
        super().__init__(message, ErrorKind.RATE_LIMIT, status=status, retryable=True, counted=False)
        self.retry_after = retry_after


class Deadline:
    """An absolute point on the monotonic clock that a call must finish by."""

    __slots__ = ("at",)

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def share(self, fraction: float) -> Deadline:
        """A deadline ``fraction`` of the time left from now: for a call that must leave time after it."""
        part = Deadline(0.0)
        part.at = time.monotonic() + max(0.0, self.left()) * fraction
        return part

    def check(self, what: str) -> float:
        """Return the seconds left, or raise a timeout error naming what ran out."""
        left = self.left()
        if left <= 0:
            raise ProviderError(f"{what}: job timeout reached", ErrorKind.TIMEOUT)
        return left


class Completion(Struct, kw_only=True):
    """The answer of a chat or generate call, whole (streamed chunks joined)."""

    model: str
    text: str
    done_reason: str | None = None
    message: dict[str, Any] | None = None  # chat: the assistant message as the provider gave it
    thinking: str | None = None  # a thinking model's reasoning, apart from the answer (streamed chunks joined)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    load_seconds: float | None = None  # time the provider spent loading the model, when it says


INCOMPLETE = "incomplete"  # the doneReason of an answer that was cut short (see Incomplete)


class Embeddings(Struct, kw_only=True):
    model: str
    vectors: list[list[float]]
    prompt_tokens: int | None = None


class ModelInfo(Struct, kw_only=True):
    name: str
    size: int = 0
    loaded: bool = False
    vram: int = 0  # bytes of GPU memory, when loaded
    expires_at: str | None = None
    details: dict[str, Any] = {}


class Health(Struct, kw_only=True):
    ok: bool
    message: str
    url: str
    version: str | None = None
    error_details: str | None = None


@runtime_checkable
class Provider(Protocol):
    """What workers call. Every method raises ProviderError on failure.

    One provider object speaks to one server. A plugin whose setting names
    several servers of the same models (OLLAMA_BASE_URL with one Ollama per
    GPU) returns one object per server, all with the same ``name``, each
    with its own ``endpoint`` (``endpoint_names``): the host keeps
    reachability, breakers, slots and loads per endpoint, and sends each
    call to the one best placed to serve it.
    """

    name: str

    def serves(self, model: str) -> bool:
        """Whether this provider answers for ``model`` (first provider that does wins)."""

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        """Run a chat; with ``on_chunk``, stream and call it with each piece of text."""

    def generate(
        self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None
    ) -> Completion:
        """Run a completion of a prompt, streaming as ``chat`` does."""

    def embed(
        self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None
    ) -> Embeddings:
        """Embed every input, in one call where the server allows."""

    def models(self) -> list[ModelInfo]:
        """Models the server has, with ``loaded`` set for those in memory."""

    def health(self, timeout: float) -> Health:
        """Probe the server once; never raises."""

    # Optional: ``endpoint: str``, this server's name among the provider's
    # servers, when it has several (``endpoint_names``; absent: ``name``), and
    # ``url: str``, where it is, for /status and the metrics.
    #
    # Optional: ``answer_cap(request) -> int``, the most tokens a chat or generate
    # call may answer with as this provider will send it (its ``max_tokens``):
    # the host's token budget (RATE_LIMIT_TPM) counts a call at that before it
    # goes, rather than at ``num_predict`` or a default of 256.
    #
    # Optional: ``max_concurrent: int``, the most calls the host makes to this
    # provider at once (0 or absent: no limit of its own), for a server that
    # serves one request at a time, or N, and interrupts or queues the rest.
    #
    # Optional: a provider that manages models in memory may also offer
    # ``unload_idle(keep: Collection[str], deadline: Deadline) -> list[str]``,
    # which the out-of-memory fallback calls to free memory before trying
    # again: unload every model but those in ``keep`` (the job's own, and those
    # other workers of the host are calling now); return what was unloaded.

    def close(self) -> None:
        """Release connections."""


ENDPOINT_SEPARATOR = "@"  # between a provider's name and an endpoint's number: "ollama@2"


def endpoint_names(provider: str, count: int) -> list[str]:
    """The names of a provider's ``count`` servers: its own name for one, ``<name>@1`` ... ``<name>@N`` for several.

    One server keeps the provider's name, so that a host with one looks as it
    always did (breaker ``ollama:llama3.2``). The numbers are the servers'
    places in the setting (OLLAMA_BASE_URL), from 1; a name never holds ':',
    which separates it from the model in a breaker's key.
    """
    if count == 1:
        return [provider]
    return [f"{provider}{ENDPOINT_SEPARATOR}{n}" for n in range(1, count + 1)]


def endpoint_of(provider: Provider) -> str:
    """The endpoint a provider object speaks to: its ``endpoint``, or its ``name`` when it has one server."""
    return getattr(provider, "endpoint", "") or provider.name
