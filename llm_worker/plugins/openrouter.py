"""OpenRouter as a provider, written as a third party would: it imports ``llm_worker.plugin`` alone.

On when OPENROUTER_API_KEY is set (sent as ``Authorization: Bearer``). It
serves the job models named with OPENROUTER_MODEL_PREFIX
(``openrouter:anthropic/claude-sonnet-4.5`` asks for
``anthropic/claude-sonnet-4.5``), and sends OpenRouter's optional
attribution headers, ``HTTP-Referer`` (OPENROUTER_REFERER) and ``X-Title``
with its newer twin ``X-OpenRouter-Title`` (OPENROUTER_TITLE)
(https://openrouter.ai/docs/app-attribution). Its settings
are its own section (``llm_worker_settings``), checked before the service forks.

OpenRouter speaks OpenAI's chat completions (https://openrouter.ai/docs/api-reference/overview):
messages translate as for any OpenAI-compatible API (``openai_messages``);
options to its parameters, ``top_k``, ``min_p`` and ``repeat_penalty``
(``repetition_penalty``) included; ``format`` to ``response_format``;
``think`` to ``reasoning`` (a level is its ``effort``, true ``enabled``;
https://openrouter.ai/docs/use-cases/reasoning-tokens), whose text comes back
as ``reasoning`` and is the completion's ``thinking``. Usage comes with every
answer (https://openrouter.ai/docs/use-cases/usage-accounting).

Streams are Server-Sent Events (https://openrouter.ai/docs/api-reference/streaming):
comments (``: OPENROUTER PROCESSING``) keep the connection alive while the
model has not begun, and are passed over (each restarts the wait for the next
byte); an answer is whole only when a ``finish_reason`` came and then
``data: [DONE]``, else ``Incomplete``. An error once the answer has begun
comes as a 200 chunk with ``error`` and ``finish_reason: "error"``.

Errors have OpenRouter's shape, ``{"error": {"code", "message", "metadata"}}``,
read by their code (https://openrouter.ai/docs/api-reference/errors): 400
validation (a model id it does not know: a model error); 401 (a bad key) and
402 (out of credits) provider errors never retried; 403 a moderation refusal
of the input (validation), else a refused key; 404 a model error; 408 a
timeout; 429 ``RateLimited`` after ``Retry-After``; 502 (the model is down)
and 503 (no provider available) provider errors, retried and counted. A
message names the code, OpenRouter's text and the upstream provider, never
the input that moderation flagged, the upstream's raw answer or the key.
"""

from __future__ import annotations

import http.client
import time
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
    RateLimited,
    Response,
    Settings,
    ToolCalls,
    env,
    hookimpl,
    load_section,
    openai_content,
    openai_messages,
    retry_after_seconds,
)

CHAT = "/chat/completions"
MODELS = "/models"
CONNECT_TIMEOUT = 10.0  # seconds; OPENROUTER_TIMEOUT when shorter
CONNECT_RETRIES = 2  # a connect that failed never reached the API: tried again, RETRY_DELAY apart, doubling
RETRY_DELAY = 0.5
MAX_CONNECTIONS = 10  # per process: its worker thread and the HTTP process's probes
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "stop", "seed", "presence_penalty", "frequency_penalty")
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}  # Ollama's think levels
_KINDS = {
    400: ErrorKind.VALIDATION,
    401: ErrorKind.PROVIDER,
    402: ErrorKind.PROVIDER,
    403: ErrorKind.PROVIDER,
    404: ErrorKind.MODEL,
    408: ErrorKind.TIMEOUT,
}
_REFUSED = frozenset({401, 402, 403})  # a bad key, no credits: trying again cannot help
_MODERATION = ("reasons", "flagged_input")  # metadata of a 403 that refused the input, not the key
_UNKNOWN_MODEL = "not a valid model id"
URL = r"^https?://[^\s/]+(/\S*)?$"
TOKEN = r"^[!-~]*$"  # what an HTTP header can carry: printable ASCII, no spaces
HEADER_TEXT = r"^[ -~]*$"  # printable ASCII, spaces too
PREFIX = r"^([A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63})?$"


class OpenRouterSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    api_key: Annotated[
        str,
        env(
            "OPENROUTER_API_KEY",
            "OpenRouter API key, sent as a Bearer token. Empty: the provider is off.",
            secret=True,
            pattern=TOKEN,
        ),
    ] = ""
    base_url: Annotated[str, env("OPENROUTER_BASE_URL", "OpenRouter's API, with its version path.", pattern=URL)] = (
        "https://openrouter.ai/api/v1"
    )
    model_prefix: Annotated[
        str,
        env(
            "OPENROUTER_MODEL_PREFIX",
            "Job models starting with this go to OpenRouter, without it (`openrouter:openai/gpt-4o-mini` asks "
            "for `openai/gpt-4o-mini`). Empty: every model does.",
            pattern=PREFIX,
        ),
    ] = "openrouter:"
    referer: Annotated[
        str,
        env(
            "OPENROUTER_REFERER",
            "Sent as `HTTP-Referer`: your app's URL in OpenRouter's rankings. Empty: none.",
            pattern=HEADER_TEXT,
        ),
    ] = ""
    title: Annotated[
        str,
        env(
            "OPENROUTER_TITLE",
            "Sent as `X-Title` (and `X-OpenRouter-Title`): your app's name in OpenRouter's rankings. Empty: none.",
            pattern=HEADER_TEXT,
        ),
    ] = ""
    timeout: Annotated[
        int,
        env(
            "OPENROUTER_TIMEOUT",
            "Longest wait for the API's next byte, keep-alive comments included, in milliseconds (a job's own "
            "timeout bounds the whole call).",
            ge=100,
            le=86_400_000,
        ),
    ] = 300_000


# ---- answers as the API writes them ------------------------------------------------


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning: Any = None  # text (reasoning_details, its structured twin, is not read)


class _Choice(msgspec.Struct):
    message: _Message | None = None  # whole answers
    delta: _Message | None = None  # stream chunks
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Error(msgspec.Struct):
    code: int | str | None = None  # the HTTP status; mid-stream sometimes a name ("server_error")
    message: str = ""
    metadata: dict[str, Any] | None = None


class _Answer(msgspec.Struct):
    """A chat completion, one chunk of its stream, or an error."""

    model: str = ""
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


class _Model(msgspec.Struct):
    id: str
    name: str | None = None
    context_length: int | None = None
    pricing: dict[str, Any] | None = None


class _Models(msgspec.Struct):
    data: list[_Model] = []


_decode = msgspec.json.Decoder(_Answer).decode


def error_for(status: int | None, error: _Error | None, what: str, headers: Any = None) -> ProviderError:
    """The error an OpenRouter error is: an answer's (its status and headers) or a stream chunk's."""
    error = error or _Error()
    code = error.code if isinstance(error.code, int) else status
    metadata = error.metadata or {}
    upstream = metadata.get("provider_name")
    said = f"{code} " if code is not None else (f"{error.code} " if error.code else "")
    message = f"{what}: {said}{error.message or 'no message'}" + (f" (provider {upstream})" if upstream else "")
    if code == 429:
        said = retry_after_seconds(headers.get("retry-after"), time.time()) if headers else None
        return RateLimited(message, retry_after=said)
    if code == 403 and any(key in metadata for key in _MODERATION):
        return ProviderError(message, ErrorKind.VALIDATION, status=status)  # the input was flagged: it must change
    kind = _KINDS.get(code or 0, ErrorKind.PROVIDER)
    if kind is ErrorKind.VALIDATION and _UNKNOWN_MODEL in error.message.lower():
        kind = ErrorKind.MODEL
    return ProviderError(message, kind, status=status, retryable=False if code in _REFUSED else None)


class _Http(JsonHttp):
    """The JSON transport, reading OpenRouter's error shape and Retry-After."""

    def error_of(self, resp: Response, what: str) -> ProviderError:
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException):
            data = b""
        try:
            error = _decode(data).error
        except msgspec.MsgspecError:
            error = _Error(message=data[:200].decode(errors="replace").strip() or f"HTTP {resp.status}")
        return error_for(resp.status, error, what, resp.headers)


class OpenRouterProvider:
    """OpenRouter's OpenAI-compatible API, for prefixed models."""

    name = "openrouter"

    def __init__(self, s: OpenRouterSettings) -> None:
        self.url = s.base_url.rstrip("/")
        self.prefix = s.model_prefix
        headers = {"Authorization": f"Bearer {s.api_key}"}
        if s.referer:
            headers["HTTP-Referer"] = s.referer
        if s.title:  # X-OpenRouter-Title is its name now; X-Title, the older, is still read
            headers["X-OpenRouter-Title"] = headers["X-Title"] = s.title
        timeout = s.timeout / 1000
        self.http = _Http(
            self.url,
            max_connections=MAX_CONNECTIONS,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            read_timeout=timeout,
            max_retries=CONNECT_RETRIES,
            retry_delay=RETRY_DELAY,
            classify=lambda status, message: _KINDS.get(status, ErrorKind.PROVIDER),
            headers=headers,
            retry_statuses=frozenset(),  # 429 waits as it is told; 502 and 503 are the job's retries to make
        )

    def remote_name(self, model: str) -> str | None:
        """The name OpenRouter knows a job's model by; None when this provider does not serve it."""
        return model[len(self.prefix) :] if model.startswith(self.prefix) and model[len(self.prefix) :] else None

    def serves(self, model: str) -> bool:
        return self.remote_name(model) is not None

    # ---- jobs --------------------------------------------------------------

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        body = self._body(model, request, on_chunk is not None)
        body["messages"] = openai_messages(request.messages)
        if request.tools:
            body["tools"] = request.tools
        return self._complete(body, deadline, on_chunk, chat=True)

    def generate(
        self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None
    ) -> Completion:
        body = self._body(model, request, on_chunk is not None)
        system = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = [*system, {"role": "user", "content": openai_content(request.prompt, request.images)}]
        return self._complete(body, deadline, on_chunk, chat=False)

    def embed(
        self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None
    ) -> Embeddings:
        raise ProviderError(
            f"model {model!r} cannot embed: the openrouter provider serves chat and generate only",
            ErrorKind.MODEL,
            retryable=False,
            counted=False,
        )

    def _body(self, model: str, request: ChatRequest | GenerateRequest, stream: bool) -> dict[str, Any]:
        remote = self.remote_name(model)
        if remote is None:
            raise ProviderError(f"model {model!r} is not one the openrouter provider serves", ErrorKind.MODEL)
        body: dict[str, Any] = {"model": remote, "stream": stream}
        options = request.options
        if options is not None:
            if options.num_predict is not None and options.num_predict > 0:  # -1 and -2 mean "no limit"
                body["max_tokens"] = options.num_predict
            body.update({name: getattr(options, name) for name in SAMPLING if getattr(options, name) is not None})
            if options.repeat_penalty is not None:
                body["repetition_penalty"] = options.repeat_penalty
        if isinstance(request.think, str):
            body["reasoning"] = {"effort": EFFORTS[request.think]}
        elif request.think is True:
            body["reasoning"] = {"enabled": True}
        if request.format == "json":
            body["response_format"] = {"type": "json_object"}
        elif request.format is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": request.format},
            }
        return body

    def _complete(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk | None, chat: bool) -> Completion:
        what = f"POST {CHAT}"
        if on_chunk is not None:
            return self._stream(body, deadline, on_chunk, chat)
        answer = self.http.json("POST", CHAT, body, deadline, _Answer)
        if answer.error is not None:  # an error once the model had begun: 200, and the error in the body
            raise error_for(None, answer.error, what)
        if not answer.choices or answer.choices[0].message is None:
            raise ProviderError(f"{what}: an answer without a message", ErrorKind.PROVIDER)
        got = _Streamed(answer.model or body["model"])
        got.add(answer, whole=True)
        return got.completion(chat)

    def _stream(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk, chat: bool) -> Completion:
        """Stream an answer to ``on_chunk``; whole only with a finish_reason and then [DONE], else Incomplete."""
        what = f"POST {CHAT}"
        resp = self.http.request("POST", CHAT, body, deadline)
        got = _Streamed(body["model"])
        events = self.http.events(resp, deadline, what)
        try:
            while True:
                try:
                    event = next(events, None)
                except ProviderError as exc:
                    if exc.kind is ErrorKind.TIMEOUT or not got.chunks:
                        raise  # out of time (or stalled), or nothing came: not an answer cut short
                    raise Incomplete(exc.message, got.partial(chat)) from None
                if event is None:
                    raise Incomplete(f"{what}: the stream ended before [DONE]", got.partial(chat))
                if event.data == b"[DONE]":
                    self.http.finish(resp)
                    if got.finish_reason is None:
                        raise Incomplete(f"{what}: [DONE] came without a finish_reason", got.partial(chat))
                    return got.completion(chat)
                try:
                    chunk = _decode(event.data)
                except msgspec.MsgspecError as exc:
                    raise ProviderError(f"{what}: unreadable stream event: {exc}", ErrorKind.PROVIDER) from None
                if chunk.error is not None:  # finish_reason "error": the upstream failed mid-answer
                    raise error_for(None, chunk.error, what)
                piece, thought = got.add(chunk)
                if thought:
                    on_chunk("", thinking=thought)
                if piece:
                    on_chunk(piece)
        finally:
            events.close()  # now: a half-read connection is dropped, not reused

    # ---- models and health -------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """OpenRouter's models, under the job names that reach them; none is "loaded"."""
        listing = self.http.json("GET", MODELS, None, Deadline(self.http.connect_timeout + 30), _Models)
        return [
            ModelInfo(
                name=self.prefix + m.id,
                details={
                    k: v
                    for k, v in (("name", m.name), ("context_length", m.context_length), ("pricing", m.pricing))
                    if v is not None
                },
            )
            for m in listing.data
        ]

    def health(self, timeout: float) -> Health:
        try:
            listing = self.http.json("GET", MODELS, None, Deadline(timeout), _Models)
        except ProviderError as exc:
            return Health(ok=False, message="OpenRouter is not available", url=self.url, error_details=exc.message)
        return Health(ok=True, message=f"OpenRouter answers, with {len(listing.data)} models", url=self.url)

    def close(self) -> None:
        self.http.close()


class _Streamed:
    """What an answer has said so far: text, reasoning, tool calls, finish reason, usage."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.parts: list[str] = []
        self.thoughts: list[str] = []
        self.calls = ToolCalls()
        self.finish_reason: str | None = None
        self.usage: _Usage | None = None
        self.chunks = 0

    def add(self, answer: _Answer, whole: bool = False) -> tuple[str, str]:
        """Take a chunk (or a whole answer) in; return its text and its reasoning."""
        self.chunks += 1
        self.model = answer.model or self.model
        self.usage = answer.usage or self.usage
        piece = thought = ""
        for choice in answer.choices:
            self.finish_reason = choice.finish_reason or self.finish_reason
            said = choice.message if whole else choice.delta
            if said is None:
                continue
            piece += said.content or ""
            thought += said.reasoning if isinstance(said.reasoning, str) else ""
            for call in said.tool_calls or ():
                self.calls.add(call)  # a whole answer's calls have no index: each is the next one
        if piece:
            self.parts.append(piece)
        if thought:
            self.thoughts.append(thought)
        return piece, thought

    def completion(self, chat: bool) -> Completion:
        text, thinking, calls = "".join(self.parts), "".join(self.thoughts) or None, self.calls.ollama()
        message = None
        if chat:
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            if thinking:
                message["thinking"] = thinking  # where Ollama's /api/chat puts it
        usage = self.usage or _Usage()
        return Completion(
            model=self.model,
            text=text,
            done_reason=self.finish_reason,
            message=message,
            thinking=thinking,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )

    def partial(self, chat: bool) -> Completion:
        """What arrived of an answer cut short, marked incomplete."""
        return msgspec.structs.replace(self.completion(chat), done_reason=INCOMPLETE)


@hookimpl
def llm_worker_settings() -> list[type]:
    return [OpenRouterSettings]


@hookimpl
def llm_worker_providers(settings: Settings) -> list[OpenRouterProvider]:
    own = load_section(OpenRouterSettings)  # from the environment, as checked at start
    return [OpenRouterProvider(own)] if own.api_key else []
