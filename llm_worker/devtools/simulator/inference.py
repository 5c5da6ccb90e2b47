"""The inference endpoints: /api/chat, /api/generate, /api/embed and /api/embeddings.

Each checks what Ollama checks, in its order (server/routes.go ChatHandler,
GenerateHandler, EmbedHandler, EmbeddingsHandler, v0.33): the body (400), the
model (404), an unload request (no messages or prompt, keep_alive 0: answered
at once, the model unloaded once idle), thinking (400 "x" does not support
thinking), the capability (400 "x" does not support chat/generate for an
embedding model), the options (500 option "x" must be of type ...), then the
scheduler (503 when its queue is full), a slot, and the work.

Thinking: a model that can think (models.py) thinks unless the request says
``think: false``; ``think`` true means level "medium" (api.ThinkValue.String),
and gpt-oss takes "max" as "high" (harmony). Its reasoning comes first, in
``message.thinking`` (chat) or ``thinking`` (generate): one piece per token
when streamed, joined when not; ``eval_count`` counts it too.

An abort fault ends the answer after ``after_chunks`` pieces (at most all of
them) with no done line, as Ollama does when llm/llama_server.go Completion returns without a
final response (its repeated-token guard returns ``ctx.Err()``, nil; or
llama-server's stream ends with no stop event): a stream just ends; a whole
answer is 200 with ``done: false``, the text so far and no metrics (routes.go
keeps the last piece), and with no piece at all Go's zero value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llm_worker.devtools.simulator.content import count_words, embedding, think_then_reply
from llm_worker.devtools.simulator.engine import Engine, Run
from llm_worker.devtools.simulator.models import ModelInfo, rfc3339
from llm_worker.devtools.simulator.protocol import (
    ApiError,
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    Options,
    Reply,
    StreamReply,
    json_reply,
    line,
)

ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time, as a zero-value response shows it
Piece = Callable[[str, str, str], dict[str, Any]]  # (model, content, thinking) -> one response object, done false


def chat_piece(model: str, text: str, thinking: str = "") -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    if thinking:  # api.Message: `json:"thinking,omitempty"`
        message["thinking"] = thinking
    return {"model": model, "created_at": rfc3339(time.time()), "message": message, "done": False}


def generate_piece(model: str, text: str, thinking: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "created_at": rfc3339(time.time()), "response": text}
    if thinking:
        body["thinking"] = thinking
    body["done"] = False
    return body


ZERO_PIECES: dict[Piece, dict[str, Any]] = {
    chat_piece: {"model": "", "created_at": ZERO_TIME, "message": {"role": "", "content": ""}, "done": False},
    generate_piece: {"model": "", "created_at": ZERO_TIME, "response": "", "done": False},
}


@dataclass
class Turn:
    """One reply to produce: who asked, what it thinks and says, and how to shape each piece."""

    model: str  # as the request spelled it; Ollama echoes it back
    prompt_count: int
    tokens: list[str]
    done_reason: str
    piece: Piece
    thoughts: list[str] = field(default_factory=list)
    with_context: bool = False  # generate's final object carries "context"

    def pieces(self) -> list[tuple[str, str]]:
        """Return the (content, thinking) of each piece a stream sends: the thoughts, then the reply."""
        return [("", t) for t in self.thoughts] + [(t, "") for t in self.tokens]

    def final(
        self, text: str, thinking: str, started: int, load_ns: int, prompt_ns: int, eval_ns: int
    ) -> dict[str, Any]:
        body = self.piece(self.model, text, thinking)
        evaluated = len(self.thoughts) + len(self.tokens)
        body.update(
            done=True,
            done_reason=self.done_reason,
            total_duration=time.perf_counter_ns() - started,
            load_duration=load_ns,
            prompt_eval_count=self.prompt_count,
            prompt_eval_duration=max(1, prompt_ns),
            eval_count=evaluated,
            eval_duration=max(1, eval_ns),
        )
        if self.with_context:
            body["context"] = list(range(1, self.prompt_count + evaluated + 1))
        return body

    def unfinished(self, pieces: list[tuple[str, str]]) -> dict[str, Any]:
        """Return the whole answer routes.go sends when no final piece came: the last piece, text joined."""
        if not pieces:
            return dict(ZERO_PIECES[self.piece])
        return self.piece(self.model, "".join(c for c, _ in pieces), "".join(t for _, t in pieces))


def think_level(info: ModelInfo, model: str, think: bool | str | None) -> str | None:
    """Return the level a model thinks at, None if it does not; refuse thinking to one that cannot."""
    if not info.thinking:
        if think not in (None, False):  # true or any level (api.ThinkValue.Bool)
            raise ApiError(400, f'"{model}" does not support thinking')
        return None
    if think is False:
        return None
    level = "medium" if think in (None, True) else str(think)  # think defaults to true on models that can
    return "high" if level == "max" and info.family == "gptoss" else level


def require_completion(info: ModelInfo, model: str, verb: str) -> None:
    """Refuse chat or generate to an embedding model (scheduleRunner's capability check)."""
    if info.embedding:
        raise ApiError(400, f'"{model}" does not support {verb}')


def chat(engine: Engine, req: ChatRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    if not req.messages and keep_alive == 0:
        return unloaded(engine, info, req.model, chat_piece)
    level = think_level(info, req.model, req.think)
    require_completion(info, req.model, "chat")
    options = engine.options(req.options)
    if not req.messages:
        return loaded(engine, info, req.model, options, keep_alive, chat_piece)
    prompt = next((m.content or "" for m in reversed(req.messages) if m.role == "user"), "")
    thoughts, tokens, reason = think_then_reply(prompt, engine.config.reply_tokens, options.num_predict, level)
    prompt_count = sum(count_words(m.content or "") for m in req.messages)
    turn = Turn(req.model, prompt_count, tokens, reason, chat_piece, thoughts)
    return complete(engine, info, options, keep_alive, turn, req.stream)


def generate(engine: Engine, req: GenerateRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    if not req.prompt and keep_alive == 0:
        return unloaded(engine, info, req.model, generate_piece)
    level = think_level(info, req.model, req.think)
    require_completion(info, req.model, "generate")
    options = engine.options(req.options)
    if not req.prompt:
        return loaded(engine, info, req.model, options, keep_alive, generate_piece)
    thoughts, tokens, reason = think_then_reply(req.prompt, engine.config.reply_tokens, options.num_predict, level)
    prompt_count = count_words(req.system) + count_words(req.prompt)
    turn = Turn(req.model, prompt_count, tokens, reason, generate_piece, thoughts, with_context=True)
    return complete(engine, info, options, keep_alive, turn, req.stream)


def unloaded(engine: Engine, info: ModelInfo, model: str, piece: Piece) -> Reply:
    """Answer an unload request: the model goes now, or once its requests finish (sched.go expireRunner)."""
    engine.scheduler.expire(info.name)
    return _done(piece, model, "unload")


def loaded(
    engine: Engine, info: ModelInfo, model: str, options: Options, keep_alive: float | None, piece: Piece
) -> Reply:
    """Answer a request with nothing to say: load the model, taking no slot."""
    engine.load(info, options, keep_alive)
    return _done(piece, model, "load")


def _done(piece: Piece, model: str, reason: str) -> Reply:
    body = piece(model, "", "")
    body.update(done=True, done_reason=reason)
    return json_reply(body)


def complete(
    engine: Engine, info: ModelInfo, options: Options, keep_alive: float | None, turn: Turn, stream: bool
) -> Reply | StreamReply:
    """Produce a turn whole or as a stream, after the base latency, holding a slot throughout."""
    started = time.perf_counter_ns()
    run = engine.begin(info, options, keep_alive)
    handed_over = False
    try:
        engine.pause(engine.config.latency_ms / 1000)
        prompt_ns = time.perf_counter_ns() - started - run.load_ns
        abort = engine.context().abort
        cut = None if abort is None else abort.after_chunks
        if stream:
            handed_over = True
            return StreamReply(_stream(engine, run, turn, started, prompt_ns, cut), on_close=run.close)
        return json_reply(_whole(engine, run, turn, started, prompt_ns, cut))
    finally:
        if not handed_over:
            run.close()


def _whole(engine: Engine, run: Run, turn: Turn, started: int, prompt_ns: int, cut: int | None) -> dict[str, Any]:
    pieces = turn.pieces()
    if cut is not None:  # past the last piece, it still lands before the final one
        pieces = pieces[:cut]
        engine.pause(len(pieces) * engine.config.token_ms / 1000)
        return turn.unfinished(pieces)
    eval_started = time.perf_counter_ns()
    engine.pause(len(pieces) * engine.config.token_ms / 1000)
    eval_ns = time.perf_counter_ns() - eval_started
    return turn.final("".join(turn.tokens), "".join(turn.thoughts), started, run.load_ns, prompt_ns, eval_ns)


def _stream(engine: Engine, run: Run, turn: Turn, started: int, prompt_ns: int, cut: int | None) -> Iterator[bytes]:
    token_seconds = engine.config.token_ms / 1000
    eval_started = time.perf_counter_ns()
    for sent, (content, thinking) in enumerate(turn.pieces()):
        if sent == cut:
            return  # the runner stopped short: the stream ends with no done line
        engine.pause(token_seconds)
        yield line(turn.piece(turn.model, content, thinking))
    if cut is not None:
        return
    eval_ns = time.perf_counter_ns() - eval_started
    yield line(turn.final("", "", started, run.load_ns, prompt_ns, eval_ns))


def embed(engine: Engine, req: EmbedRequest) -> Reply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    inputs = ([req.input] if req.input else []) if isinstance(req.input, str) else list(req.input or ())
    options = engine.options(req.options)
    started = time.perf_counter_ns()
    if not inputs:  # an empty request loads the model (and a keep_alive of 0 unloads it after)
        engine.load(info, options, keep_alive)
        return json_reply({"model": req.model, "embeddings": []})
    run = engine.begin(info, options, keep_alive)
    try:
        num_ctx = engine.load_key(options)[0]
        if not req.truncate and any(count_words(text) > num_ctx for text in inputs):
            raise ApiError(400, "the input length exceeds the context length")
        engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms * len(inputs)) / 1000)
        dims = req.dimensions or engine.config.dims
        vectors = [embedding(info.name, text, dims) for text in inputs]
    finally:
        run.close()
    return json_reply(
        {
            "model": req.model,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": run.load_ns,
            "prompt_eval_count": sum(count_words(t) for t in inputs),
        }
    )


def embeddings(engine: Engine, req: EmbeddingsRequest) -> Reply:
    """Answer the legacy single-text endpoint."""
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    options = engine.options(req.options)
    if not req.prompt:  # "an empty request loads the model"
        engine.load(info, options, keep_alive)
        return json_reply({"embedding": []})
    run = engine.begin(info, options, keep_alive)
    try:
        engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms) / 1000)
    finally:
        run.close()
    return json_reply({"embedding": embedding(info.name, req.prompt, engine.config.dims)})
