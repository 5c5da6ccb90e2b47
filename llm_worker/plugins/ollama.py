"""The Ollama provider: chat, generate, embeddings, and models (list, show, pull, load, unload) over Ollama's HTTP API.

What Ollama's error answers mean is one table, ``TABLE`` in ollama_errors.py,
each row citing the Ollama source it comes from: messages are matched before
statuses, so /api/embed's 400 for a crashed runner is a crash (memory, retried
once the memory strategy has unloaded idle models), a model Ollama lacks, cannot
run or cannot do the task with is a model error (the model fallback, no
retries), an option of the wrong type in the host's settings is
``LoadOptionsRefused``, and a 403 (Ollama's Host check) pauses the host with
the setting to change. Refused connections are network errors, read timeouts
timeouts (the HTTP client's). A 429 (cloud and remote models: ollama.com's rate
limit) is ``RateLimited``, with the Retry-After it came with.

An answer without its end is never a success: a stream that stops before its
``done: true`` line, or a whole answer with ``done: false`` (Ollama ends a
generation that way when llama-server's stream stops with no stop event, or it
aborts a token loop: llm/llama_server.go Completion, v0.33), raises
``Incomplete`` with what came so far.

A thinking model's reasoning (``message.thinking`` of /api/chat, ``thinking``
of /api/generate) is kept apart from the answer: ``Completion.thinking``, the
chat message's ``thinking``, and ``on_chunk("", thinking=piece)`` while
streaming. ``think`` is sent as the job gives it (true/false or a level).

Options: a request carries the host's load-time options, EMBEDDING_LOAD_OPTIONS
to an embedding model and MODEL_LOAD_OPTIONS to the others (which kind a model
is, /api/show says once; it is remembered), never a job's own. A job's options
that Ollama's api.Options (api/types.go, v0.33) no longer has are dropped here
(tfs_z gone in v0.5.2, penalize_newline in v0.5.5, mirostat, mirostat_tau and
mirostat_eta in v0.7.0): Ollama would only ignore them with a warning in its log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Generator, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

from llm_worker.host.stats import model_label
from llm_worker.plugin.providers import (
    Completion,
    Deadline,
    Embeddings,
    Health,
    Incomplete,
    ModelInfo,
    OnChunk,
    ProviderError,
    RateLimited,
    endpoint_names,
)
from llm_worker.plugin.spec import hookimpl
from llm_worker.plugin.transport import JsonHttp
from llm_worker.plugins.ollama_errors import LoadOptionsRefused, OllamaError, classify, error_for
from llm_worker.protocol.jobs import ChatRequest, ErrorKind, GenerateRequest
from llm_worker.settings.config import Settings
from llm_worker.settings.sections import LOAD_OPTIONS
from llm_worker.settings.urls import split_urls

__all__ = ["LoadOptionsRefused", "OllamaError", "OllamaProvider", "classify", "pinned", "residency"]

# The options Ollama's api.Options has (api/types.go, v0.33.0-rc2): its api.Runner (the load-time
# options, LOAD_OPTIONS) and the options a request may change. Ollama ignores any other key.
SAMPLING_OPTIONS = frozenset(
    {
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "repeat_last_n",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "stop",
    }
)
OLLAMA_OPTIONS = SAMPLING_OPTIONS | LOAD_OPTIONS
SHOW_SECONDS = 10.0  # the most of a job's time that asking /api/show which kind its model is may take
EMBEDDING_SIGNS = ("embed", "bert")  # in a model's name or family: an embedding model, when Ollama does not say


class _Message(msgspec.Struct):
    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Line(msgspec.Struct):
    """One object of a chat or generate answer (a stream line, or the whole answer)."""

    model: str = ""
    message: _Message | None = None
    response: str | None = None
    thinking: str | None = None
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    load_duration: int | None = None
    error: str | None = None


class _Embed(msgspec.Struct):
    model: str = ""
    embeddings: list[list[float]] = []
    prompt_eval_count: int | None = None


class _Tag(msgspec.Struct):
    name: str
    size: int = 0
    details: dict[str, Any] = {}
    size_vram: int = 0
    expires_at: str | None = None


class _Tags(msgspec.Struct):
    models: list[_Tag] = []


_decode_line = msgspec.json.Decoder(_Line).decode
_decode_progress = msgspec.json.Decoder(dict[str, Any]).decode


class _Answer:
    """A chat or generate answer as it arrives: text, reasoning and tool calls so far, and the last line."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.text: list[str] = []
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.last: _Line | None = None

    def add(self, line: _Line, on_chunk: OnChunk | None) -> None:
        """Take one line; stream its reasoning, then its text (Ollama may send both in one line)."""
        self.last = line
        thinking = (line.message.thinking if line.message is not None else line.thinking) or ""
        text = (line.message.content if line.message is not None else line.response) or ""
        if thinking:
            self.thinking.append(thinking)
            if on_chunk is not None:
                on_chunk("", thinking=thinking)
        if text:
            self.text.append(text)
            if on_chunk is not None:
                on_chunk(text)
        if line.message is not None and line.message.tool_calls:
            self.tool_calls.extend(line.message.tool_calls)

    def completion(self) -> Completion:
        """The answer so far: whole once the done line came, the partial of an Incomplete before."""
        line = self.last or _Line()
        text, thinking = "".join(self.text), "".join(self.thinking) or None
        message: dict[str, Any] | None = None
        if self.chat:
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if self.tool_calls:
                message["tool_calls"] = self.tool_calls
        return Completion(
            model=line.model or self.model,
            text=text,
            thinking=thinking,
            done_reason=line.done_reason if line.done else None,
            message=message,
            prompt_tokens=line.prompt_eval_count,
            completion_tokens=line.eval_count,
            load_seconds=line.load_duration / 1e9 if line.load_duration else None,
        )


class OllamaProvider:
    """One Ollama of OLLAMA_BASE_URL; serves every model, so it is the catch-all."""

    name = "ollama"

    def __init__(self, settings: Settings, url: str | None = None, endpoint: str = "ollama") -> None:
        """``url``: which of OLLAMA_BASE_URL's servers (default: the first); ``endpoint``: its name among them."""
        o = settings.ollama
        self.url = url if url is not None else split_urls(o.base_url)[0]
        self.endpoint = endpoint
        self.host = urlsplit(self.url).hostname or ""
        self.load_options = dict(settings.models.load_options)
        self.embedding_load_options = dict(settings.models.embedding_load_options)
        self.keep_alive = residency(settings)
        self.num_parallel = o.num_parallel
        self._embedding: dict[str, bool] = {}  # model -> whether it embeds, from /api/show
        self.http = JsonHttp(
            self.url,
            max_connections=o.max_connections,
            connect_timeout=o.connect_timeout / 1000,
            read_timeout=o.timeout / 1000,
            max_retries=o.max_retries,
            retry_delay=o.retry_delay / 1000,
            classify=classify,
        )

    def serves(self, model: str) -> bool:
        return True

    def slots_of(self, loaded: ModelInfo) -> int:
        """``model_slots`` of a model /api/ps lists, asking nothing: its kind as known, else as its names say."""
        embedding = self._embedding.get(loaded.name)
        if embedding is None:
            details = loaded.details or {}
            names = [loaded.name, str(details.get("family", "")), *map(str, details.get("families") or ())]
            embedding = any(sign in name.lower() for name in names for sign in EMBEDDING_SIGNS)
        return self.model_slots(loaded.name, embedding)

    def model_slots(self, model: str, embedding: bool) -> int:
        """Requests Ollama serves at once for ``model``, for the host's call gate.

        OLLAMA_NUM_PARALLEL per loaded model; 1 for a model without the
        completion capability, an embedding model (server/sched.go load,
        v0.33). Ollama also forces 1 for a few architectures (mllama,
        qwen3vl, ...); for those, OLLAMA_NUM_PARALLEL=1 here keeps in step.
        """
        return 1 if embedding or self._embedding.get(model) else self.num_parallel

    # ---- jobs --------------------------------------------------------------

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        embedding = self._is_embedding(model, deadline, guess=False)
        body = _common(model, request, on_chunk, self._load_options(embedding), self.keep_alive)
        body["messages"] = request.messages
        if request.tools is not None:
            body["tools"] = request.tools
        return self._complete("/api/chat", model, body, deadline, on_chunk, embedding)

    def generate(
        self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None
    ) -> Completion:
        embedding = self._is_embedding(model, deadline, guess=False)
        body = _common(model, request, on_chunk, self._load_options(embedding), self.keep_alive)
        body["prompt"] = request.prompt
        if request.system is not None:
            body["system"] = request.system
        if request.images is not None:
            body["images"] = request.images
        return self._complete("/api/generate", model, body, deadline, on_chunk, embedding)

    def embed(
        self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None
    ) -> Embeddings:
        embedding = self._is_embedding(model, deadline, guess=True)
        body: dict[str, Any] = {"model": model, "input": inputs, **(options or {}), "keep_alive": self.keep_alive}
        body.pop("options", None)
        if (pinned_options := pinned((options or {}).get("options"), self._load_options(embedding))) is not None:
            body["options"] = pinned_options
        with self._answers("/api/embed", embedding):
            answer = self.http.json("POST", "/api/embed", body, deadline, _Embed)
        if len(answer.embeddings) != len(inputs):
            raise ProviderError(
                f"/api/embed returned {len(answer.embeddings)} vectors for {len(inputs)} inputs", ErrorKind.PROVIDER
            )
        return Embeddings(
            model=answer.model or model, vectors=answer.embeddings, prompt_tokens=answer.prompt_eval_count
        )

    def _complete(
        self, path: str, model: str, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk | None, embedding: bool
    ) -> Completion:
        what = f"POST {path}"
        answer = _Answer(model, chat=path == "/api/chat")
        if on_chunk is None:
            with self._answers(path, embedding):
                line = self.http.json("POST", path, body, deadline, _Line)
            self._raise_if_error(line, what, path, embedding)
            answer.add(line, None)
            if not line.done:
                # Ollama's non-streamed reply is its last line with the text joined: done is false when
                # the generation ended without a stop event (server/routes.go writeChatResponse and
                # GenerateHandler, after llm/llama_server.go Completion returned nil with no final line).
                raise Incomplete(f"{what}: the answer came with done: false", answer.completion())
            return answer.completion()
        with self._answers(path, embedding):
            resp = self.http.request("POST", path, body, deadline)
        # A generator: closed below however the loop ends, so a half-read connection is dropped at once.
        lines = cast(Generator[bytes, None, None], self.http.lines(resp, deadline, what))
        try:
            while True:
                try:
                    raw = next(lines, None)
                except ProviderError as exc:
                    # Cut mid-answer: what came is kept for the partial. A stalled stream stays a
                    # timeout, and a connection that broke before any line stays the provider's failure.
                    if exc.kind is ErrorKind.TIMEOUT or answer.last is None:
                        raise
                    raise Incomplete(exc.message, answer.completion()) from exc
                if raw is None:
                    # The stream closed with no done line: Ollama ends it so when llama-server's stream
                    # stops without a stop event or it aborts a repeating token (llm/llama_server.go
                    # Completion returns nil; server/routes.go streamResponse closes the stream).
                    raise Incomplete(f"{what}: stream ended before done", answer.completion())
                try:
                    line = _decode_line(raw)
                except msgspec.MsgspecError as exc:
                    raise ProviderError(f"{what}: unreadable stream line: {exc}", ErrorKind.PROVIDER) from None
                self._raise_if_error(line, what, path, embedding)
                answer.add(line, on_chunk)
                if line.done:
                    self.http.finish(resp)
                    return answer.completion()
        finally:
            lines.close()

    # ---- models and health -------------------------------------------------

    def models(self) -> list[ModelInfo]:
        deadline = Deadline(self.http.connect_timeout + 10)
        loaded = {m.name: m for m in self.running(deadline)}
        out = []
        for tag in self.available(deadline):
            ps = loaded.get(tag.name)
            out.append(
                ModelInfo(
                    name=tag.name,
                    size=tag.size,
                    details=tag.details,
                    loaded=ps is not None,
                    vram=ps.vram if ps else 0,
                    expires_at=ps.expires_at if ps else None,
                )
            )
        return out

    def available(self, deadline: Deadline) -> list[ModelInfo]:
        """Models Ollama has on disk (/api/tags)."""
        with self._answers("/api/tags", False):
            tags = self.http.json("GET", "/api/tags", None, deadline, _Tags).models
        return [ModelInfo(name=t.name, size=t.size, details=t.details) for t in tags]

    def running(self, deadline: Deadline) -> list[ModelInfo]:
        """Models Ollama has in memory now (/api/ps): the truth, since Ollama also evicts on its own."""
        with self._answers("/api/ps", False):
            ps = self.http.json("GET", "/api/ps", None, deadline, _Tags).models
        return [
            ModelInfo(
                name=m.name, size=m.size, details=m.details, loaded=True, vram=m.size_vram, expires_at=m.expires_at
            )
            for m in ps
        ]

    def show(self, model: str, deadline: Deadline) -> dict[str, Any]:
        """Ollama's description of a model (/api/show): details, capabilities, parameters."""
        with self._answers("/api/show", False):
            answer: dict[str, Any] = self.http.json("POST", "/api/show", {"model": model}, deadline, dict[str, Any])
        return answer

    def load(self, model: str, deadline: Deadline, keep_alive: int | str | None = None) -> float:
        """Load a model into memory with the host's load-time options; return the seconds it took.

        A chat or generate model is loaded by /api/generate with no prompt and
        MODEL_LOAD_OPTIONS, an embedding model by /api/embed with no input and
        EMBEDDING_LOAD_OPTIONS (Ollama refuses the other). Options Ollama
        refuses raise ``LoadOptionsRefused``.
        """
        started = time.monotonic()
        embedding = self._embeds(model, deadline)
        body: dict[str, Any] = {"model": model}
        if options := self._load_options(embedding):
            body["options"] = options
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if embedding:
            with self._answers("/api/embed", True):
                self.http.json("POST", "/api/embed", {**body, "input": []}, deadline, _Embed)
        else:
            with self._answers("/api/generate", False):
                line = self.http.json("POST", "/api/generate", {**body, "stream": False}, deadline, _Line)
            self._raise_if_error(line, "load", "/api/generate", False)
        return time.monotonic() - started

    def unload(self, model: str, deadline: Deadline) -> None:
        """Ask Ollama to unload a model now (keep_alive 0); it finishes the requests in flight first."""
        with self._answers("/api/generate", False):
            body = {"model": model, "keep_alive": 0, "stream": False}
            line = self.http.json("POST", "/api/generate", body, deadline, _Line)
        self._raise_if_error(line, "unload", "/api/generate", False)

    def pull(self, model: str, deadline: Deadline, on_progress: Callable[[dict[str, Any]], None]) -> None:
        """Pull a model from the registry, calling ``on_progress`` with each of Ollama's progress lines."""
        what = f"pull {model}"
        with self._answers("/api/pull", False):
            resp = self.http.request("POST", "/api/pull", {"model": model, "stream": True}, deadline)
        for raw in self.http.lines(resp, deadline, what):
            try:
                progress = _decode_progress(raw)
            except msgspec.MsgspecError as exc:
                raise ProviderError(f"{what}: unreadable progress line: {exc}", ErrorKind.PROVIDER) from None
            if "error" in progress:
                raise error_for(what, None, str(progress["error"]), "/api/pull", host=self.host)
            on_progress(progress)
            if progress.get("status") == "success":
                self.http.finish(resp)
                return
        raise ProviderError(f"{what}: the progress stream ended before success", ErrorKind.PROVIDER)

    def _embeds(self, model: str, deadline: Deadline) -> bool:
        """Whether a model makes embeddings: its capabilities when Ollama lists them, else its family or name."""
        known = self._embedding.get(model)
        if known is None:
            info = self.show(model, deadline)
            capabilities = info.get("capabilities")
            if isinstance(capabilities, list):
                known = "embedding" in capabilities
            else:
                details = info.get("details") or {}
                names = [model, str(details.get("family", "")), *map(str, details.get("families") or ())]
                known = any(sign in name.lower() for name in names for sign in EMBEDDING_SIGNS)
            self._embedding[model] = known
        return known

    def _is_embedding(self, model: str, deadline: Deadline, *, guess: bool) -> bool:
        """Whether a job's request to ``model`` goes to an embedding model, for its load-time options.

        Asked of /api/show once per model, and only when the two settings
        differ. If /api/show fails the call goes ahead with ``guess`` (what
        the endpoint suggests), not remembered: a model Ollama lacks fails with
        the call's own answer, and a passing failure is not the job's.
        """
        if self.load_options == self.embedding_load_options:
            return self._embedding.get(model, guess)
        try:
            return self._embeds(model, Deadline(min(SHOW_SECONDS, deadline.left())))
        except ProviderError:
            return guess

    def _load_options(self, embedding: bool) -> dict[str, Any]:
        return self.embedding_load_options if embedding else self.load_options

    @contextmanager
    def _answers(self, path: str, embedding: bool) -> Iterator[None]:
        """Turn Ollama's error answers (status 400 and up) into what TABLE says they are."""
        try:
            yield
        except (OllamaError, RateLimited):
            # A 429 stays a rate limit, with its Retry-After (the HTTP client's): Ollama answers one for a
            # cloud model (server/cloud_proxy.go proxyCloudRequestWithPath passes ollama.com's status and
            # headers through) or a remote one (server/routes.go GenerateHandler/ChatHandler answer the
            # remote's api.StatusError with its status), v0.33.0-rc2. Its own queue being full is 503.
            raise
        except ProviderError as exc:
            if exc.status is None or exc.status < 400:
                raise
            what, _, text = exc.message.partition(": ")
            if text == f"HTTP {exc.status}":  # the HTTP client's words for an empty body
                text = ""
            raise error_for(what, exc.status, text, path, embedding=embedding, host=self.host) from None

    def _raise_if_error(self, line: _Line, what: str, path: str, embedding: bool) -> None:
        """Raise the error line of a 200 answer: Ollama's error once a stream has begun (no status then)."""
        if line.error is not None:
            raise error_for(what, None, line.error, path, embedding=embedding, host=self.host)

    def unload_idle(self, keep: Collection[str], deadline: Deadline) -> list[str]:
        """Ask Ollama to unload every loaded model but those in ``keep`` (keep_alive 0); return their names.

        Ollama unloads a model once its requests in flight are done, so a model
        another host's client is using finishes its work first.
        """
        wanted = {model_label(name) for name in keep}
        unloaded = []
        for model in self.running(deadline):
            if model_label(model.name) not in wanted:
                self.unload(model.name, deadline)
                unloaded.append(model.name)
        return unloaded

    def health(self, timeout: float) -> Health:
        """Probe /api/version. Not ok when Ollama cannot be reached or refuses us; a refusal says what to set."""
        try:
            with self._answers("/api/version", False):
                # One try: a refused connect is the answer, not a reason to ask again (retries
                # with OLLAMA_RETRY_DELAY made a stopped Ollama look up for three more seconds).
                version = self.http.json("GET", "/api/version", None, Deadline(timeout), dict[str, Any], retries=0)
        except ProviderError as exc:
            advice = exc.advice if isinstance(exc, OllamaError) and exc.unreachable else ""
            return Health(
                ok=False, message=advice or "Ollama is not reachable", url=self.url, error_details=exc.message
            )
        return Health(ok=True, message="Ollama is running", url=self.url, version=str(version.get("version", "")))

    def close(self) -> None:
        self.http.close()


def pinned(options: Any, load_options: dict[str, Any]) -> dict[str, Any] | None:
    """A job's options with the host's load-time options in place of its own, and only those Ollama has.

    Ollama reloads a model whenever a request's load-time options (num_ctx,
    num_batch, num_gpu, ...) differ from those it was loaded with: two jobs
    that disagree would swap it in and out of memory turn by turn. So jobs
    never choose them; every request carries the host's (MODEL_LOAD_OPTIONS,
    or EMBEDDING_LOAD_OPTIONS for an embedding model; none: Ollama's
    defaults), the same as the model manager's preload. A job's option that
    Ollama's api.Options no longer has (mirostat, tfs_z, ...) is dropped.
    """
    own = msgspec.structs.asdict(options) if isinstance(options, msgspec.Struct) else dict(options or {})
    merged = {k: v for k, v in own.items() if k in SAMPLING_OPTIONS and v is not None}
    merged.update(load_options)
    return merged or None


def residency(settings: Settings) -> int | str:
    """The keep_alive every job request carries: how long Ollama keeps a model after it.

    The model manager decides when a model goes (MODEL_UNLOAD_TIMEOUT), so a
    job's own keepAlive is not sent: "0" in one job would unload a model that
    the next one needs. Ollama's expiry is set a little past the manager's, a
    safety net that frees the memory if llm-worker is stopped; forever when
    the manager never unloads idle models.
    """
    m = settings.models
    if m.unload_timeout == 0:
        return -1
    margin = max(60.0, 2 * m.manage_interval / 1000)
    return f"{int(m.unload_timeout / 1000 + margin)}s"


def _common(
    model: str,
    request: ChatRequest | GenerateRequest,
    on_chunk: OnChunk | None,
    load_options: dict[str, Any],
    keep_alive: int | str,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": on_chunk is not None, "keep_alive": keep_alive}
    options = pinned(request.options, load_options)
    if options is not None:
        body["options"] = options
    if request.format is not None:
        body["format"] = request.format
    if request.think is not None:
        body["think"] = request.think  # as given: true/false, or a level (api.ThinkValue)
    return body


@hookimpl
def llm_worker_providers(settings: Settings) -> list[OllamaProvider]:
    """One provider per server of OLLAMA_BASE_URL (one per GPU, say), each its own endpoint."""
    urls = split_urls(settings.ollama.base_url)
    return [OllamaProvider(settings, url, name) for url, name in zip(urls, endpoint_names("ollama", len(urls)))]
