"""The Ollama provider: chat, generate, embeddings, and models (list, show, pull, load, unload) over Ollama's HTTP API.

Ollama's failures are mapped to error kinds from what it really answers:
404 ``model "x" not found, try pulling it first`` and ``model 'x' not found``
(model); 400 (validation, or model when the model cannot do the task); 503
``server busy`` (retried, then provider); 500 out of memory or a terminated
runner (memory); an ``{"error": ...}`` line inside a 200 stream; a stream that
ends without ``done``; refused connections (network); read timeouts (timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import msgspec

from llm_worker.config import LOAD_OPTIONS, Settings
from llm_worker.hookspecs import hookimpl
from llm_worker.jobs import ChatRequest, ErrorKind, GenerateRequest
from llm_worker.plugins.httpclient import JsonHttp
from llm_worker.providers import Completion, Deadline, Embeddings, Health, ModelInfo, OnChunk, ProviderError
from llm_worker.stats import model_label

_MEMORY_SIGNS = (
    "requires more system memory", "out of memory", "insufficient memory", "cuda error",
    "unable to allocate", "runner process has terminated", "runner has unexpectedly stopped",
    "failed to allocate",
)


def classify(status: int, message: str) -> ErrorKind:
    """Map an Ollama error answer to an error kind."""
    low = message.lower()
    if status == 404:
        return ErrorKind.MODEL
    if status == 400:
        return ErrorKind.MODEL if "does not support" in low else ErrorKind.VALIDATION
    if any(sign in low for sign in _MEMORY_SIGNS):
        return ErrorKind.MEMORY
    if status == 408:
        return ErrorKind.TIMEOUT
    return ErrorKind.PROVIDER


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


class OllamaProvider:
    """Ollama at OLLAMA_BASE_URL; serves every model, so it is the catch-all."""

    name = "ollama"

    def __init__(self, settings: Settings) -> None:
        o = settings.ollama
        self.url = o.base_url.rstrip("/")
        self.load_options = dict(settings.models.load_options)
        self.keep_alive = residency(settings)
        self._embedding: dict[str, bool] = {}  # model -> whether it embeds, from /api/show
        self.http = JsonHttp(
            self.url, max_connections=o.max_connections, connect_timeout=o.connect_timeout / 1000,
            read_timeout=o.timeout / 1000, max_retries=o.max_retries, retry_delay=o.retry_delay / 1000,
            classify=classify,
        )

    def serves(self, model: str) -> bool:
        return True

    # ---- jobs --------------------------------------------------------------

    def chat(self, model: str, request: ChatRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        body = _common(model, request, on_chunk, self.load_options, self.keep_alive)
        body["messages"] = request.messages
        if request.tools is not None:
            body["tools"] = request.tools
        return self._complete("/api/chat", body, deadline, on_chunk)

    def generate(self, model: str, request: GenerateRequest, deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        body = _common(model, request, on_chunk, self.load_options, self.keep_alive)
        body["prompt"] = request.prompt
        if request.system is not None:
            body["system"] = request.system
        if request.images is not None:
            body["images"] = request.images
        return self._complete("/api/generate", body, deadline, on_chunk)

    def embed(self, model: str, inputs: list[str], deadline: Deadline, options: dict[str, Any] | None = None) -> Embeddings:
        body: dict[str, Any] = {"model": model, "input": inputs, **(options or {}), "keep_alive": self.keep_alive}
        body.pop("options", None)
        if (pinned_options := pinned((options or {}).get("options"), self.load_options)) is not None:
            body["options"] = pinned_options
        answer = self.http.json("POST", "/api/embed", body, deadline, _Embed)
        if len(answer.embeddings) != len(inputs):
            raise ProviderError(f"/api/embed returned {len(answer.embeddings)} vectors for {len(inputs)} inputs", ErrorKind.PROVIDER)
        return Embeddings(model=answer.model or model, vectors=answer.embeddings, prompt_tokens=answer.prompt_eval_count)

    def _complete(self, path: str, body: dict[str, Any], deadline: Deadline, on_chunk: OnChunk | None) -> Completion:
        what = f"POST {path}"
        if on_chunk is None:
            line = self.http.json("POST", path, body, deadline, _Line)
            _raise_if_error(line, what)
            return _completion(line, _text(line), line.message)
        resp = self.http.request("POST", path, body, deadline)
        parts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for raw in self.http.lines(resp, deadline, what):
            try:
                line = _decode_line(raw)
            except msgspec.MsgspecError as exc:
                raise ProviderError(f"{what}: unreadable stream line: {exc}", ErrorKind.PROVIDER) from None
            _raise_if_error(line, what)
            piece = _text(line)
            if piece:
                parts.append(piece)
                on_chunk(piece)
            if line.message is not None and line.message.tool_calls:
                tool_calls.extend(line.message.tool_calls)
            if line.done:
                self.http.finish(resp)
                message = _Message(content="".join(parts), tool_calls=tool_calls or None) if path == "/api/chat" else None
                return _completion(line, "".join(parts), message)
        raise ProviderError(f"{what}: stream ended before done", ErrorKind.PROVIDER)

    # ---- models and health -------------------------------------------------

    def models(self) -> list[ModelInfo]:
        deadline = Deadline(self.http.connect_timeout + 10)
        loaded = {m.name: m for m in self.running(deadline)}
        out = []
        for tag in self.available(deadline):
            ps = loaded.get(tag.name)
            out.append(ModelInfo(name=tag.name, size=tag.size, details=tag.details, loaded=ps is not None,
                                 vram=ps.vram if ps else 0, expires_at=ps.expires_at if ps else None))
        return out

    def available(self, deadline: Deadline) -> list[ModelInfo]:
        """Models Ollama has on disk (/api/tags)."""
        tags = self.http.json("GET", "/api/tags", None, deadline, _Tags).models
        return [ModelInfo(name=t.name, size=t.size, details=t.details) for t in tags]

    def running(self, deadline: Deadline) -> list[ModelInfo]:
        """Models Ollama has in memory now (/api/ps): the truth, since Ollama also evicts on its own."""
        ps = self.http.json("GET", "/api/ps", None, deadline, _Tags).models
        return [ModelInfo(name=m.name, size=m.size, details=m.details, loaded=True, vram=m.size_vram,
                          expires_at=m.expires_at) for m in ps]

    def show(self, model: str, deadline: Deadline) -> dict[str, Any]:
        """Ollama's description of a model (/api/show): details, capabilities, parameters."""
        answer: dict[str, Any] = self.http.json("POST", "/api/show", {"model": model}, deadline, dict[str, Any])
        return answer

    def load(self, model: str, deadline: Deadline, keep_alive: int | str | None = None) -> float:
        """Load a model into memory with the host's load-time options; return the seconds it took.

        A chat or generate model is loaded by /api/generate with no prompt, an
        embedding model by /api/embed with no input (Ollama refuses the other).
        """
        started = time.monotonic()
        body: dict[str, Any] = {"model": model}
        if self.load_options:
            body["options"] = self.load_options
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if self._embeds(model, deadline):
            self.http.json("POST", "/api/embed", {**body, "input": []}, deadline, _Embed)
        else:
            _raise_if_error(self.http.json("POST", "/api/generate", {**body, "stream": False}, deadline, _Line), "load")
        return time.monotonic() - started

    def unload(self, model: str, deadline: Deadline) -> None:
        """Ask Ollama to unload a model now (keep_alive 0); it finishes the requests in flight first."""
        line = self.http.json("POST", "/api/generate", {"model": model, "keep_alive": 0, "stream": False}, deadline, _Line)
        _raise_if_error(line, "unload")

    def pull(self, model: str, deadline: Deadline, on_progress: Callable[[dict[str, Any]], None]) -> None:
        """Pull a model from the registry, calling ``on_progress`` with each of Ollama's progress lines."""
        what = f"pull {model}"
        resp = self.http.request("POST", "/api/pull", {"model": model, "stream": True}, deadline)
        for raw in self.http.lines(resp, deadline, what):
            try:
                progress = _decode_progress(raw)
            except msgspec.MsgspecError as exc:
                raise ProviderError(f"{what}: unreadable progress line: {exc}", ErrorKind.PROVIDER) from None
            if "error" in progress:
                raise ProviderError(f"{what}: {progress['error']}", classify(500, str(progress["error"])))
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
                known = any(sign in name.lower() for name in names for sign in ("embed", "bert"))
            self._embedding[model] = known
        return known

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
        try:
            version = self.http.json("GET", "/api/version", None, Deadline(timeout), dict[str, Any])
        except ProviderError as exc:
            return Health(ok=False, message="Ollama is not reachable", url=self.url, error_details=exc.message)
        return Health(ok=True, message="Ollama is running", url=self.url, version=str(version.get("version", "")))

    def close(self) -> None:
        self.http.close()


def pinned(options: Any, load_options: dict[str, int]) -> dict[str, Any] | None:
    """A job's options with the host's load-time options in place of its own.

    Ollama reloads a model whenever a request's load-time options (num_ctx,
    num_batch, num_gpu, ...) differ from those it was loaded with: two jobs
    that disagree would swap it in and out of memory turn by turn. So jobs
    never choose them; every request carries MODEL_LOAD_OPTIONS (or none,
    Ollama's defaults), the same as the model manager's preload.
    """
    own = msgspec.structs.asdict(options) if isinstance(options, msgspec.Struct) else dict(options or {})
    merged = {k: v for k, v in own.items() if k not in LOAD_OPTIONS and v is not None}
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


def _common(model: str, request: ChatRequest | GenerateRequest, on_chunk: OnChunk | None,
            load_options: dict[str, int], keep_alive: int | str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": on_chunk is not None, "keep_alive": keep_alive}
    options = pinned(request.options, load_options)
    if options is not None:
        body["options"] = options
    if request.format is not None:
        body["format"] = request.format
    if request.think is not None:
        body["think"] = request.think
    return body


def _text(line: _Line) -> str:
    if line.message is not None:
        return line.message.content
    return line.response or ""


def _raise_if_error(line: _Line, what: str) -> None:
    if line.error is not None:
        raise ProviderError(f"{what}: {line.error}", classify(500, line.error))


def _completion(line: _Line, text: str, message: _Message | None) -> Completion:
    msg = None
    if message is not None:
        msg = {"role": message.role, "content": text}
        if message.tool_calls:
            msg["tool_calls"] = message.tool_calls
        if message.thinking:
            msg["thinking"] = message.thinking
    return Completion(
        model=line.model, text=text, done_reason=line.done_reason, message=msg,
        prompt_tokens=line.prompt_eval_count, completion_tokens=line.eval_count,
        load_seconds=line.load_duration / 1e9 if line.load_duration else None,
    )


@hookimpl
def llm_worker_providers(settings: Settings) -> list[OllamaProvider]:
    return [OllamaProvider(settings)]
