"""The OpenAI-compatible provider: chat, generate, embeddings and model listing over an OpenAI-style /v1.

One API shape is spoken by OpenAI, vLLM, llama.cpp's server, llama-cpp-python,
LiteLLM and Ollama's own /v1. The provider is on when OPENAI_BASE_URL is set
(one provider object per server it names, each its own endpoint),
and serves the job models named with OPENAI_MODEL_PREFIX
(``openai:gpt-4o-mini`` asks for ``gpt-4o-mini``) and those OPENAI_MODEL_MAP
renames; Ollama keeps the rest. OPENAI_MAX_CONCURRENT is offered to the host
as ``max_concurrent``: the most calls all its workers make to the server at
once (1 for llama-cpp-python, which stops a running stream for every newer
request).

Jobs carry Ollama's shapes, translated here: options to OpenAI's sampling
parameters (``num_predict`` is ``max_tokens``; options OpenAI lacks are
dropped, since it refuses unknown ones), ``format`` to ``response_format``,
``think`` levels to ``reasoning_effort``, images to image parts, tool calls
both ways (results carry them as Ollama does, arguments parsed). Reasoning
that comes back as ``reasoning_content`` (llama.cpp, vLLM, DeepSeek) or
``reasoning`` (Ollama, OpenRouter) is the completion's ``thinking``.

Streams are Server-Sent Events, read line by line within the job's deadline.
An answer is whole only when a ``finish_reason`` came and then ``data:
[DONE]``: ``[DONE]`` without a finish reason is how llama-cpp-python ends a
stream it interrupted, and http.client may read a cut connection as the end
of the body, so either is ``Incomplete`` with what had arrived. Token counts
are the server's usage (asked for with ``stream_options.include_usage``);
servers that ignore that option (llama-cpp-python) get the chunks counted.
A stream that ends before its first event is asked again unstreamed:
llama-cpp-python meets some errors (a prompt over the context) only once its
stream has begun, and then sends 200 and nothing, the error only to its log;
unstreamed, it answers them as errors.

Failures map to error kinds by ``classify``: 400 and 422 (and any "maximum
context length" answer) validation; 401 and 403 provider, never retried (a
wrong key stays wrong); 404 model; 408 timeout; 429 rate limit, raised at once
as ``RateLimited`` with the wait its headers ask (``retry-after-ms``,
``Retry-After``, else ``x-ratelimit-reset-*``: plugin/ratelimit.py), so the
job waits in the delayed set without spending an attempt; 503 provider,
retried within the call first; other statuses provider. An ``error`` event inside a
stream is a provider error. An answer of the wrong shape for the model (one
embedding per token: a model without pooling) is a model error. Refused
connections are network errors; no byte within OPENAI_TIMEOUT, or by the
job's deadline, a timeout.
"""

from __future__ import annotations

from typing import Any

import msgspec

from llm_worker.plugin.openai_shapes import ToolCalls, ollama_tool_call, openai_content, openai_messages
from llm_worker.plugin.providers import (
    INCOMPLETE,
    Completion,
    Deadline,
    Embeddings,
    Health,
    Incomplete,
    ModelInfo,
    OnChunk,
    ProviderError,
    endpoint_names,
)
from llm_worker.plugin.spec import hookimpl
from llm_worker.plugin.transport import JsonHttp, Response
from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest, Options
from llm_worker.settings.config import Settings
from llm_worker.settings.urls import split_urls

CHAT_PATH = "/chat/completions"
CONNECT_TIMEOUT = 10.0  # seconds; OPENAI_TIMEOUT when shorter
MAX_CONNECTIONS = 10  # per process: its worker thread and the HTTP process's probes
RETRY_STATUSES = frozenset({503})  # busy: retried within the call (a 429 is RateLimited: the job waits)
NOT_RETRYABLE = frozenset({401, 403})  # refused for the key: retrying cannot help
SAMPLING = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
# Ollama's think levels as OpenAI's reasoning_effort: "max" is beyond OpenAI's scale, whose top is "high".
# true and false are not sent: a reasoning model reasons by default, and there is no portable "off"
# (OpenAI's o-series refuse "none", which Ollama's /v1 and newer models take).
REASONING_EFFORT = {"low": "low", "medium": "medium", "high": "high", "max": "high"}

_BY_STATUS = {
    400: ErrorKind.VALIDATION,
    422: ErrorKind.VALIDATION,
    401: ErrorKind.PROVIDER,
    403: ErrorKind.PROVIDER,
    404: ErrorKind.MODEL,
    408: ErrorKind.TIMEOUT,
    429: ErrorKind.RATE_LIMIT,
}
_CONTEXT_SIGNS = ("maximum context length", "context_length_exceeded", "context length exceeded")


def classify(status: int, message: str) -> ErrorKind:
    """Map an error answer of an OpenAI-compatible API to an error kind."""
    low = message.lower()
    if any(sign in low for sign in _CONTEXT_SIGNS):
        return ErrorKind.VALIDATION  # the prompt is too long for the model: the job must change
    return _BY_STATUS.get(status, ErrorKind.PROVIDER)


class _Http(JsonHttp):
    """The JSON transport, with refusals of the key marked as not worth a retry."""

    def error_of(self, resp: Response, what: str) -> ProviderError:
        error = super().error_of(resp, what)
        if error.status in NOT_RETRYABLE:
            return ProviderError(error.message, error.kind, status=error.status, retryable=False)
        return error


# ---- answers as the API writes them ----------------------------------------------


class _Message(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # llama.cpp's server, vLLM, DeepSeek
    reasoning: Any = None  # Ollama's /v1, OpenRouter, newer vLLM: text (an object elsewhere is not read)

    def thinking(self) -> str:
        if self.reasoning_content:
            return self.reasoning_content
        return self.reasoning if isinstance(self.reasoning, str) else ""


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None  # whole answers
    delta: _Message | None = None  # stream chunks
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Answer(msgspec.Struct):
    """A chat completion, or one chunk of its stream."""

    model: str = ""
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | str | None = None


class _Vector(msgspec.Struct):
    index: int = 0
    embedding: list[float | list[float]] = []  # lists: one vector per token, from a model without pooling


class _Embeddings(msgspec.Struct):
    model: str = ""
    data: list[_Vector] = []
    usage: _Usage | None = None


class _Model(msgspec.Struct):
    id: str
    created: int | None = None
    owned_by: str | None = None


class _Models(msgspec.Struct):
    data: list[_Model] = []


_decode_event = msgspec.json.Decoder(_Answer).decode
_encode = msgspec.json.Encoder().encode


class OpenAIProvider:
    """One OpenAI-compatible API of OPENAI_BASE_URL, for prefixed and mapped models."""

    name = "openai"

    def __init__(self, settings: Settings, url: str | None = None, endpoint: str = "openai") -> None:
        """``url``: which of OPENAI_BASE_URL's servers (default: the first); ``endpoint``: its name among them."""
        o = settings.openai
        self.url = url if url is not None else split_urls(o.base_url)[0]
        self.endpoint = endpoint
        self.prefix = o.model_prefix
        self.model_map = dict(o.model_map)
        self.max_concurrent = o.max_concurrent  # read by the host's gate: calls in flight to this server, 0 no limit
        headers = {}
        if o.api_key:
            headers["Authorization"] = f"Bearer {o.api_key}"
        if o.organization:
            headers["OpenAI-Organization"] = o.organization
        timeout = o.timeout / 1000
        self.http = _Http(
            self.url,
            max_connections=MAX_CONNECTIONS,
            connect_timeout=min(CONNECT_TIMEOUT, timeout),
            read_timeout=timeout,
            max_retries=o.max_retries,
            retry_delay=o.retry_delay / 1000,
            classify=classify,
            headers=headers,
            retry_statuses=RETRY_STATUSES,
        )

    def remote_name(self, model: str) -> str | None:
        """The name the API knows a job's model by; None when this provider does not serve it."""
        if model in self.model_map:
            return self.model_map[model]
        if not model.startswith(self.prefix):
            return None
        bare = model[len(self.prefix) :]
        return self.model_map.get(bare, bare) or None

    def serves(self, model: str) -> bool:
        return self.remote_name(model) is not None

    # ---- jobs --------------------------------------------------------------

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        body = self._body(model, request, on_chunk)
        body["messages"] = openai_messages(request.messages)
        if request.tools is not None:
            body["tools"] = request.tools
        return self._complete(body, deadline, on_chunk, chat=True)

    def generate(
        self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None
    ) -> Completion:
        body = self._body(model, request, on_chunk)
        system = [{"role": "system", "content": request.system}] if request.system else []
        body["messages"] = [*system, {"role": "user", "content": openai_content(request.prompt, request.images)}]
        return self._complete(body, deadline, on_chunk, chat=False)

    def embed(
        self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None
    ) -> Embeddings:
        # Ollama's embedding options (truncate, keep_alive, load options) have no counterpart here.
        remote = self._remote(model)
        answer = self.http.json("POST", "/embeddings", {"model": remote, "input": inputs}, deadline, _Embeddings)
        if len(answer.data) != len(inputs):
            raise ProviderError(
                f"POST /embeddings returned {len(answer.data)} vectors for {len(inputs)} inputs", ErrorKind.PROVIDER
            )
        return Embeddings(
            model=answer.model or remote,
            vectors=_pooled(answer, remote),
            prompt_tokens=answer.usage.prompt_tokens if answer.usage else None,
        )

    def _remote(self, model: str) -> str:
        remote = self.remote_name(model)
        if remote is None:
            raise ProviderError(f"model {model!r} is not one the openai provider serves", ErrorKind.MODEL)
        return remote

    def _body(self, model: str, request: ChatRequest | GenerateRequest, on_chunk: OnChunk | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._remote(model), "stream": on_chunk is not None}
        if on_chunk is not None:
            body["stream_options"] = {"include_usage": True}
        if request.options is not None:
            body.update(_sampling(request.options))
        if isinstance(request.think, str):
            body["reasoning_effort"] = REASONING_EFFORT[request.think]
        if request.format == "json":
            body["response_format"] = {"type": "json_object"}
        elif request.format is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": request.format},
            }
        return body

    def _complete(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk | None, chat: bool) -> Completion:
        what = f"POST {CHAT_PATH}"
        if on_chunk is not None:
            return self._stream(body, deadline, on_chunk, chat)
        answer = self.http.json("POST", CHAT_PATH, body, deadline, _Answer)
        _raise_if_error(answer, what)
        if not answer.choices or answer.choices[0].message is None:
            raise ProviderError(f"{what}: an answer without a message", ErrorKind.PROVIDER)
        choice = answer.choices[0]
        message = choice.message
        return _completion(
            answer.model or body["model"],
            message.content or "",
            message.tool_calls,
            choice.finish_reason,
            answer.usage,
            chat,
            message.thinking() or None,
        )

    def _stream(self, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk, chat: bool) -> Completion:
        """Stream an answer to ``on_chunk``; whole only with a finish_reason and then [DONE], else Incomplete.

        A stream that ends before its first event is asked again, unstreamed, to learn why (see below).
        """
        what = f"POST {CHAT_PATH}"
        resp = self.http.request("POST", CHAT_PATH, body, deadline)
        got = _Streamed(body["model"])
        lines = self.http.lines(resp, deadline, what)
        try:
            while True:
                try:
                    raw = next(lines, None)
                except ProviderError as exc:
                    if exc.kind is ErrorKind.TIMEOUT:
                        raise  # the job's time ran out (or the server stalled): a timeout, whatever had arrived
                    if not got.events:
                        break
                    raise Incomplete(exc.message, got.partial(chat)) from None  # cut: the server did answer, in part
                if raw is None:
                    if not got.events:
                        break
                    # Without [DONE] a cut cannot be told from an end: http.client may read either as EOF.
                    missing = "finish_reason" if got.finish_reason is None else "[DONE]"
                    raise Incomplete(f"{what}: stream ended before {missing}", got.partial(chat))
                if not raw.startswith(b"data:"):
                    continue  # SSE comments (keep-alives), event names, ids
                data = raw[5:].strip()
                if data == b"[DONE]":
                    self.http.finish(resp)
                    if got.finish_reason is None:
                        # llama-cpp-python (interrupt_requests, its default) ends the stream it is running this
                        # way whenever another request arrives: [DONE] after the last piece, no finish_reason.
                        raise Incomplete(
                            f"{what}: [DONE] came without a finish_reason: the server stopped the"
                            " answer (llama-cpp-python does, for a newer request)",
                            got.partial(chat),
                        )
                    return got.completion(chat)
                try:
                    chunk = _decode_event(data)
                except msgspec.MsgspecError as exc:
                    raise ProviderError(f"{what}: unreadable stream event: {exc}", ErrorKind.PROVIDER) from None
                _raise_if_error(chunk, what)
                piece, thought = got.add(chunk)
                if thought:
                    on_chunk("", thinking=thought)
                if piece:
                    on_chunk(piece)
        finally:
            lines.close()  # now, not when the traceback lets go: a half-read connection is dropped
        # Not one event: the server failed before its answer began, and said why only in its own log
        # (llama-cpp-python answers a prompt over the context so: 200, then an empty stream). Asked again
        # unstreamed, it answers with its error (a 400 context_length_exceeded), or with the answer.
        done = self._complete(
            {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}, deadline, None, chat
        )
        if done.thinking:
            on_chunk("", thinking=done.thinking)
        if done.text:
            on_chunk(done.text)
        return done

    # ---- models and health -------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """The API's models; none is "loaded", since a remote API does not say."""
        listing = self.http.json("GET", "/models", None, Deadline(self.http.connect_timeout + 10), _Models)
        return [
            ModelInfo(
                name=m.id,
                details={
                    key: value for key, value in (("owned_by", m.owned_by), ("created", m.created)) if value is not None
                },
            )
            for m in listing.data
        ]

    def health(self, timeout: float) -> Health:
        try:
            listing = self.http.json("GET", "/models", None, Deadline(timeout), _Models)
        except ProviderError as exc:
            return Health(
                ok=False, message="the OpenAI-compatible API is not available", url=self.url, error_details=exc.message
            )
        return Health(
            ok=True, message=f"the OpenAI-compatible API answers, with {len(listing.data)} models", url=self.url
        )

    def close(self) -> None:
        self.http.close()


class _Streamed:
    """What a stream has said so far: text, reasoning, tool calls by index, finish reason, usage."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.parts: list[str] = []
        self.thoughts: list[str] = []
        self.calls = ToolCalls()
        self.finish_reason: str | None = None
        self.usage: _Usage | None = None
        self.events = 0  # data events read, [DONE] aside
        self.generated = 0  # chunks that carried text, reasoning or a piece of a tool call

    def add(self, chunk: _Answer) -> tuple[str, str]:
        """Take one chunk in; return its text and its reasoning."""
        self.events += 1
        self.model = chunk.model or self.model
        if chunk.usage is not None:
            self.usage = chunk.usage
        piece = thought = ""
        calls = False
        for choice in chunk.choices:
            self.finish_reason = choice.finish_reason or self.finish_reason
            if choice.delta is not None:
                piece += choice.delta.content or ""
                thought += choice.delta.thinking()
                for call in choice.delta.tool_calls or ():
                    self.calls.add(call)
                    calls = True
        if piece:
            self.parts.append(piece)
        if thought:
            self.thoughts.append(thought)
        if piece or thought or calls:
            self.generated += 1
        return piece, thought

    def completion(self, chat: bool) -> Completion:
        calls = self.calls.joined()
        usage = self.usage
        if usage is None or usage.completion_tokens is None:
            # The server sent no usage (llama-cpp-python ignores stream_options): servers send about one token
            # per chunk, so the chunks that carried something are the completion's tokens, an estimate.
            usage = _Usage(prompt_tokens=usage.prompt_tokens if usage else None, completion_tokens=self.generated)
        return _completion(
            self.model, "".join(self.parts), calls, self.finish_reason, usage, chat, "".join(self.thoughts) or None
        )

    def partial(self, chat: bool) -> Completion:
        """What arrived of an answer cut short, marked incomplete."""
        return msgspec.structs.replace(self.completion(chat), done_reason=INCOMPLETE)


# ---- shapes, both ways -------------------------------------------------------------


def _sampling(options: Options) -> dict[str, Any]:
    """OpenAI's parameters for Ollama's options; those it lacks (top_k, num_ctx, ...) are dropped."""
    out: dict[str, Any] = {}
    if options.num_predict is not None and options.num_predict > 0:  # -1 and -2 mean "no limit"
        out["max_tokens"] = options.num_predict
    for name in SAMPLING:
        value = getattr(options, name)
        if value is not None:
            out[name] = value
    return out


def _raise_if_error(answer: _Answer, what: str) -> None:
    if answer.error is not None:
        error = answer.error
        message = str(error.get("message") or error) if isinstance(error, dict) else error
        raise ProviderError(f"{what}: {message}", classify(500, message))


def _pooled(answer: _Embeddings, remote: str) -> list[list[float]]:
    """The answer's vectors in input order; refused when an input got a list of vectors (one per token).

    llama.cpp answers so for a model served without a pooling type; no retry
    or other server changes that, so it is the model's error, not counted
    against the server.
    """
    vectors: list[list[float]] = []
    for vector in sorted(answer.data, key=lambda v: v.index):
        if any(isinstance(value, list) for value in vector.embedding):
            raise ProviderError(
                f"POST /embeddings: the server answered {len(vector.embedding)} vectors for input {vector.index}"
                f" (one per token), not one: model {remote!r} has no pooling; serve it with a pooling type"
                " (llama-server --pooling mean; llama-cpp-python kv_overrides <arch>.pooling_type=int:1)"
                " or use an embedding model",
                ErrorKind.MODEL,
                retryable=False,
                counted=False,
            )
        vectors.append(vector.embedding)  # type: ignore[arg-type]  # floats only, as just checked
    return vectors


def _completion(
    model: str,
    text: str,
    tool_calls: list[dict[str, Any]] | None,
    finish_reason: str | None,
    usage: _Usage | None,
    chat: bool,
    thinking: str | None = None,
) -> Completion:
    message = None
    if chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = [ollama_tool_call(call) for call in tool_calls]
        if thinking:
            message["thinking"] = thinking  # where Ollama's /api/chat puts it
    return Completion(
        model=model,
        text=text,
        done_reason=finish_reason,
        message=message,
        thinking=thinking,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
    )


@hookimpl
def llm_worker_providers(settings: Settings) -> list[OpenAIProvider]:
    """One provider per server of OPENAI_BASE_URL (none when it is empty), each its own endpoint."""
    urls = split_urls(settings.openai.base_url)
    return [OpenAIProvider(settings, url, name) for url, name in zip(urls, endpoint_names("openai", len(urls)))]
