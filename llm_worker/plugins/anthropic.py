"""Anthropic's Messages API as a provider, written as a third party would: it imports ``llm_worker.plugin`` alone.

On when ANTHROPIC_API_KEY is set. It serves the job models named with
ANTHROPIC_MODEL_PREFIX (``anthropic:claude-sonnet-4-5`` asks for
``claude-sonnet-4-5``) and those named ``claude-...`` as they are, which no
Ollama model is. Its settings are its own section (``llm_worker_settings``),
read from the environment and checked before the service forks.

Requests are ``POST /v1/messages`` with ``x-api-key`` and ``anthropic-version``
(https://docs.anthropic.com/en/api/messages). Jobs carry Ollama's shapes,
translated by anthropic_shapes.py: system messages (and a generate job's ``system``) become the
top-level ``system``; images, tool calls and tool answers become content
blocks; ``num_predict`` is ``max_tokens``, which Anthropic requires
(ANTHROPIC_MAX_TOKENS when the job sets none); ``temperature``, ``top_p``,
``top_k`` and ``stop`` (``stop_sequences``) pass, the other options have no
counterpart and are dropped, as is ``format``. ``think`` asks for extended
thinking with a budget per level, on top of the answer's ``max_tokens``
(https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking:
at least 1024, less than ``max_tokens``; no ``temperature`` or ``top_k``
then, and ``top_p`` only from 0.95).

Answers: text blocks are the text, thinking blocks the completion's
``thinking``, ``tool_use`` blocks tool calls as Ollama writes them;
``stop_reason`` becomes Ollama's done reasons (``end_turn``, ``stop_sequence``
and ``tool_use`` are ``stop``, ``max_tokens`` is ``length``, others pass);
``usage`` gives the token counts (cached input tokens counted as input).
Streams are Server-Sent Events (https://docs.anthropic.com/en/docs/build-with-claude/streaming):
``message_start``, per block ``content_block_start``, ``..._delta``
(``text_delta``, ``thinking_delta``, ``input_json_delta``) and ``..._stop``,
``message_delta`` with the stop reason and usage, ``message_stop``; ``ping``
and unknown events are passed over, an ``error`` event is an error. A stream
that ends without ``message_stop`` is ``Incomplete``.

Errors by Anthropic's error ``type``, then its status (https://docs.anthropic.com/en/api/errors):
``invalid_request_error`` (400) and ``request_too_large`` (413) validation;
``authentication_error`` (401), ``billing_error`` (402) and
``permission_error`` (403) provider errors never retried; ``not_found_error``
(404) a model error; ``rate_limit_error`` (429) ``RateLimited`` after
``retry-after`` (seconds, or an HTTP-date; else the latest reset of an
exhausted ``anthropic-ratelimit-*`` limit), except a spend limit, which no
wait lifts; ``api_error`` (500) and ``overloaded_error`` (529: Anthropic
overloaded for everyone, not our rate limit) provider errors, retried and
counted by the breaker. Messages name the status, the type, Anthropic's text
and its ``request-id``; never the key, never prompt or answer text.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec

from llm_worker.plugin import (
    INCOMPLETE,
    ChatRequest,
    Completion,
    Deadline,
    Embeddings,
    ErrorKind,
    GenerateRequest,
    Health,
    Incomplete,
    JsonHttp,
    ModelInfo,
    OnChunk,
    ProviderError,
    Response,
    ServerSentEvent,
    Settings,
    env,
    hookimpl,
    load_section,
)
from llm_worker.plugins import anthropic_shapes as shapes

MESSAGES = "/v1/messages"
MODELS = "/v1/models"
CLAUDE = "claude-"  # Anthropic's own model names: served as they are
CONNECT_TIMEOUT = 10.0  # seconds; ANTHROPIC_TIMEOUT when shorter
CONNECT_RETRIES = 2  # a connect that failed never reached the API: tried again, RETRY_DELAY apart, doubling
RETRY_DELAY = 0.5
MAX_CONNECTIONS = 10  # per process: its worker thread and the HTTP process's probes
# Ollama's done reasons for Anthropic's stop reasons; others (refusal, pause_turn) pass as they are.
DONE_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
}
URL = r"^https?://[^\s/]+(/\S*)?$"
TOKEN = r"^[!-~]*$"  # what an HTTP header can carry: printable ASCII, no spaces
PREFIX = r"^([A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63})?$"


class AnthropicSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    api_key: Annotated[
        str,
        env(
            "ANTHROPIC_API_KEY",
            "Anthropic API key, sent as `x-api-key`. Empty: the Anthropic provider is off.",
            secret=True,
            pattern=TOKEN,
        ),
    ] = ""
    base_url: Annotated[
        str, env("ANTHROPIC_BASE_URL", "Anthropic's API, without `/v1` (the SDKs' base URL).", pattern=URL)
    ] = "https://api.anthropic.com"
    version: Annotated[
        str, env("ANTHROPIC_VERSION", "Sent as `anthropic-version`.", pattern=r"^\d{4}-\d{2}-\d{2}$")
    ] = "2023-06-01"
    model_prefix: Annotated[
        str,
        env(
            "ANTHROPIC_MODEL_PREFIX",
            "Job models starting with this go to Anthropic, without it (`anthropic:claude-sonnet-4-5` asks for "
            "`claude-sonnet-4-5`); models named `claude-...` go as they are. Empty: every model does.",
            pattern=PREFIX,
        ),
    ] = "anthropic:"
    max_tokens: Annotated[
        int,
        env(
            "ANTHROPIC_MAX_TOKENS",
            "`max_tokens` of a job that sets no `num_predict`: Anthropic requires one. Thinking's budget comes on top.",
            ge=1,
            le=1_000_000,
        ),
    ] = 4096
    timeout: Annotated[
        int,
        env(
            "ANTHROPIC_TIMEOUT",
            "Longest wait for the API's next byte, in milliseconds (a job's own timeout bounds the whole call).",
            ge=100,
            le=86_400_000,
        ),
    ] = 600_000


# ---- answers as the API writes them ------------------------------------------------


class _Block(msgspec.Struct):
    type: str = ""  # message_delta's delta has none
    text: str | None = None
    thinking: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    partial_json: str | None = None  # input_json_delta
    stop_reason: str | None = None  # message_delta's delta


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def prompt(self) -> int | None:
        parts = (self.input_tokens, self.cache_creation_input_tokens, self.cache_read_input_tokens)
        return None if self.input_tokens is None else sum(part or 0 for part in parts)


class _Message(msgspec.Struct):
    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage | None = None


class _Event(msgspec.Struct):
    """An answer, an error, or one stream event: what each carries is optional."""

    type: str = ""
    message: _Message | None = None  # message_start
    index: int = 0
    content_block: _Block | None = None  # content_block_start
    delta: _Block | None = None  # content_block_delta, message_delta
    usage: _Usage | None = None  # message_delta
    error: shapes.ErrorBody | None = None  # error answers and events
    request_id: str | None = None


class _Model(msgspec.Struct):
    id: str
    display_name: str | None = None
    created_at: str | None = None


class _Models(msgspec.Struct):
    data: list[_Model] = []
    has_more: bool = False
    last_id: str | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


class _Http(JsonHttp):
    """The JSON transport, reading Anthropic's error shape and headers."""

    def error_of(self, resp: Response, what: str) -> ProviderError:
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException):
            data = b""
        try:
            error = _decode_event(data).error
        except msgspec.MsgspecError:
            error = shapes.ErrorBody(message=data[:200].decode(errors="replace").strip() or f"HTTP {resp.status}")
        return shapes.error_for(resp.status, error, what, resp.headers, resp.getheader("request-id"))


class AnthropicProvider:
    """Anthropic's Messages API, for prefixed and ``claude-`` models."""

    name = "anthropic"

    def __init__(self, s: AnthropicSettings) -> None:
        self.url = s.base_url.rstrip("/")
        self.prefix = s.model_prefix
        self.max_tokens = s.max_tokens
        timeout = s.timeout / 1000
        self.http = _Http(
            self.url,
            max_connections=MAX_CONNECTIONS,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            read_timeout=timeout,
            max_retries=CONNECT_RETRIES,
            retry_delay=RETRY_DELAY,
            classify=lambda status, message: shapes.KINDS_BY_STATUS.get(status, ErrorKind.PROVIDER),
            headers={"x-api-key": s.api_key, "anthropic-version": s.version},
            retry_statuses=frozenset(),  # 429 waits as it is told, 529 and 5xx are the job's retries to make
        )

    def remote_name(self, model: str) -> str | None:
        """The name Anthropic knows a job's model by; None when this provider does not serve it."""
        if model.startswith(self.prefix) and model[len(self.prefix) :]:
            return model[len(self.prefix) :]
        return model if model.startswith(CLAUDE) else None

    def serves(self, model: str) -> bool:
        return self.remote_name(model) is not None

    # ---- jobs --------------------------------------------------------------

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        system, messages = shapes.messages(request.messages)
        body = shapes.request_body(
            self._remote(model), request, system, messages, on_chunk is not None, self.max_tokens
        )
        if request.tools:
            body["tools"] = [shapes.tool(tool) for tool in request.tools]
        return self._complete(body, deadline, on_chunk, chat=True)

    def generate(
        self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None
    ) -> Completion:
        messages = [{"role": "user", "content": shapes.user_content(request.prompt, request.images)}]
        system = request.system or ""
        body = shapes.request_body(
            self._remote(model), request, system, messages, on_chunk is not None, self.max_tokens
        )
        return self._complete(body, deadline, on_chunk, chat=False)

    def answer_cap(self, request: ChatRequest | GenerateRequest) -> int:
        """The tokens a call may answer with (its ``max_tokens``), for the host's token budget (RATE_LIMIT_TPM)."""
        return shapes.max_tokens(request, self.max_tokens)

    def embed(
        self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None
    ) -> Embeddings:
        raise ProviderError(
            f"model {model!r} cannot embed: Anthropic has no embeddings API (use an embedding model of Ollama)",
            ErrorKind.MODEL,
            retryable=False,
            counted=False,
        )

    def _remote(self, model: str) -> str:
        remote = self.remote_name(model)
        if remote is None:
            raise ProviderError(f"model {model!r} is not one the anthropic provider serves", ErrorKind.MODEL)
        return remote

    def _complete(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk | None, chat: bool) -> Completion:
        if on_chunk is not None:
            return self._stream(body, deadline, on_chunk, chat)
        answer = self.http.json("POST", MESSAGES, body, deadline, _Message)
        got = _Answer(answer.model or body["model"])
        for index, block in enumerate(answer.content):
            got.start(index, block)
        got.stop_reason, got.usage = answer.stop_reason, answer.usage
        return got.completion(chat)

    def _stream(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk, chat: bool) -> Completion:
        """Stream an answer to ``on_chunk``; whole only once ``message_stop`` came, else Incomplete."""
        what = f"POST {MESSAGES}"
        resp = self.http.request("POST", MESSAGES, body, deadline)
        got = _Answer(body["model"])
        events = self.http.events(resp, deadline, what)
        try:
            for event in _read(events, got, what, chat):
                if event.type == "message_stop":
                    self.http.finish(resp)
                    return got.completion(chat)
                piece, thought = got.take(event)
                if thought:
                    on_chunk("", thinking=thought)
                if piece:
                    on_chunk(piece)
        finally:
            events.close()  # now: a half-read connection is dropped, not reused
        raise Incomplete(f"{what}: the stream ended before message_stop", got.partial(chat))

    # ---- models and health -------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Anthropic's models, page by page, under the job names that reach them; none is "loaded"."""
        found: list[ModelInfo] = []
        after = ""
        deadline = Deadline(self.http.connect_timeout + 30)
        while True:
            page = self.http.json("GET", f"{MODELS}?limit=1000{after}", None, deadline, _Models)
            for m in page.data:
                details = {k: v for k, v in (("display_name", m.display_name), ("created_at", m.created_at)) if v}
                found.append(ModelInfo(name=self.prefix + m.id, details=details))
            if not page.has_more or not page.last_id:
                return found
            after = f"&after_id={page.last_id}"

    def health(self, timeout: float) -> Health:
        try:
            self.http.json("GET", f"{MODELS}?limit=1", None, Deadline(timeout), _Models)
        except ProviderError as exc:
            return Health(
                ok=False, message="the Anthropic API is not available", url=self.url, error_details=exc.message
            )
        return Health(ok=True, message="the Anthropic API answers", url=self.url)

    def close(self) -> None:
        self.http.close()


def _read(events: Iterator[ServerSentEvent], got: _Answer, what: str, chat: bool) -> Iterator[_Event]:
    """The stream's events, decoded; a cut after the first is Incomplete, an ``error`` event its error."""
    while True:
        try:
            raw = next(events, None)
        except ProviderError as exc:
            if exc.kind is ErrorKind.TIMEOUT or not got.events:
                raise  # out of time (or stalled), or nothing came: not an answer cut short
            raise Incomplete(exc.message, got.partial(chat)) from None
        if raw is None:
            return
        try:
            event = _decode_event(raw.data)
        except msgspec.MsgspecError as exc:
            raise ProviderError(f"{what}: unreadable stream event: {exc}", ErrorKind.PROVIDER) from None
        if event.type == "error":
            raise shapes.error_for(None, event.error, what)
        got.events += 1
        yield event


class _Answer:
    """An answer being put together: text, thinking and tool calls by block, stop reason, usage."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.blocks: dict[int, _Block] = {}
        self.inputs: dict[int, list[str]] = {}  # tool_use input, streamed in pieces of JSON
        self.parts: list[str] = []
        self.thoughts: list[str] = []
        self.stop_reason: str | None = None
        self.usage: _Usage | None = None
        self.events = 0

    def start(self, index: int, block: _Block) -> None:
        self.blocks[index] = block
        if block.type == "text" and block.text:
            self.parts.append(block.text)
        elif block.type == "thinking" and block.thinking:
            self.thoughts.append(block.thinking)

    def take(self, event: _Event) -> tuple[str, str]:
        """Take one stream event in; return the text and the thinking it carried."""
        if event.type == "message_start" and event.message is not None:
            self.model = event.message.model or self.model
            self.usage = event.message.usage
        elif event.type == "content_block_start" and event.content_block is not None:
            self.start(event.index, event.content_block)
            block = event.content_block
            return (block.text or "", "") if block.type == "text" else ("", block.thinking or "")
        elif event.type == "content_block_delta" and event.delta is not None:
            delta = event.delta
            if delta.type == "text_delta" and delta.text:
                self.parts.append(delta.text)
                return delta.text, ""
            if delta.type == "thinking_delta" and delta.thinking:
                self.thoughts.append(delta.thinking)
                return "", delta.thinking
            if delta.type == "input_json_delta" and delta.partial_json:
                self.inputs.setdefault(event.index, []).append(delta.partial_json)
        elif event.type == "message_delta":
            if event.delta is not None and event.delta.stop_reason:
                self.stop_reason = event.delta.stop_reason
            if event.usage is not None:  # cumulative: the last says it all, of what it says
                said = {k: v for k, v in msgspec.structs.asdict(event.usage).items() if v is not None}
                self.usage = msgspec.structs.replace(self.usage or _Usage(), **said)
        return "", ""

    def calls(self) -> list[dict[str, Any]]:
        """The tool calls, as Ollama writes them: ``{"id", "function": {"name", "arguments": {...}}}``."""
        out = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if block.type != "tool_use":
                continue
            arguments = block.input if block.input else {}
            if index in self.inputs:
                text = "".join(self.inputs[index])
                try:
                    arguments = msgspec.json.decode(text) if text.strip() else {}
                except msgspec.DecodeError:
                    arguments = text  # kept as sent, as the OpenAI provider keeps arguments that are not JSON
            out.append({"id": block.id, "function": {"name": block.name or "", "arguments": arguments}})
        return out

    def completion(self, chat: bool) -> Completion:
        text, thinking, calls = "".join(self.parts), "".join(self.thoughts) or None, self.calls()
        message = None
        if chat:
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            if thinking:
                message["thinking"] = thinking  # where Ollama's /api/chat puts it
        reason = DONE_REASONS.get(self.stop_reason or "", self.stop_reason)
        usage = self.usage or _Usage()
        return Completion(
            model=self.model,
            text=text,
            done_reason=reason,
            message=message,
            thinking=thinking,
            prompt_tokens=usage.prompt(),
            completion_tokens=usage.output_tokens,
        )

    def partial(self, chat: bool) -> Completion:
        """What arrived of an answer cut short, marked incomplete."""
        return msgspec.structs.replace(self.completion(chat), done_reason=INCOMPLETE)


# ---- the plugin ----------------------------------------------------------------------


@hookimpl
def llm_worker_settings() -> list[type]:
    return [AnthropicSettings]


@hookimpl
def llm_worker_providers(settings: Settings) -> list[AnthropicProvider]:
    own = load_section(AnthropicSettings)  # from the environment, as checked at start
    return [AnthropicProvider(own)] if own.api_key else []
