"""The inference endpoints: /api/chat, /api/generate, /api/embed and /api/embeddings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llm_worker.simulator.content import count_words, embedding, reply_tokens
from llm_worker.simulator.engine import Engine, Run
from llm_worker.simulator.models import ModelInfo, rfc3339
from llm_worker.simulator.protocol import (
    NO_OPTIONS, ApiError, ChatRequest, EmbeddingsRequest, EmbedRequest, GenerateRequest, Options, Reply,
    StreamReply, json_reply, line,
)

Piece = Callable[[str, str], dict[str, Any]]  # (model, text) -> one response object, done false


def chat_piece(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": rfc3339(time.time()),
            "message": {"role": "assistant", "content": text}, "done": False}


def generate_piece(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": rfc3339(time.time()), "response": text, "done": False}


@dataclass
class Turn:
    """One reply to produce: who asked, what it says, and how to shape each piece."""

    model: str  # as the request spelled it; Ollama echoes it back
    prompt_count: int
    tokens: list[str]
    done_reason: str
    piece: Piece
    with_context: bool = False  # generate's final object carries "context"

    def final(self, text: str, started: int, load_ns: int, prompt_ns: int, eval_ns: int) -> dict[str, Any]:
        body = self.piece(self.model, text)
        body.update(done=True, done_reason=self.done_reason,
                    total_duration=time.perf_counter_ns() - started, load_duration=load_ns,
                    prompt_eval_count=self.prompt_count, prompt_eval_duration=max(1, prompt_ns),
                    eval_count=len(self.tokens), eval_duration=max(1, eval_ns))
        if self.with_context:
            body["context"] = list(range(1, self.prompt_count + len(self.tokens) + 1))
        return body


def chat(engine: Engine, req: ChatRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    options = req.options or NO_OPTIONS
    if not req.messages:
        return load_or_unload(engine, info, req.model, options, keep_alive, chat_piece)
    prompt = next((m.content or "" for m in reversed(req.messages) if m.role == "user"), "")
    tokens, reason = reply_tokens(prompt, engine.config.reply_tokens, options.num_predict)
    prompt_count = sum(count_words(m.content or "") for m in req.messages)
    turn = Turn(req.model, prompt_count, tokens, reason, chat_piece)
    return complete(engine, info, options, keep_alive, turn, req.stream)


def generate(engine: Engine, req: GenerateRequest) -> Reply | StreamReply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    options = req.options or NO_OPTIONS
    if not req.prompt:
        return load_or_unload(engine, info, req.model, options, keep_alive, generate_piece)
    tokens, reason = reply_tokens(req.prompt, engine.config.reply_tokens, options.num_predict)
    prompt_count = count_words(req.system) + count_words(req.prompt)
    turn = Turn(req.model, prompt_count, tokens, reason, generate_piece, with_context=True)
    return complete(engine, info, options, keep_alive, turn, req.stream)


def load_or_unload(engine: Engine, info: ModelInfo, model: str, options: Options, keep_alive: float,
                   piece: Piece) -> Reply:
    """Answer a request with nothing to say: keep_alive 0 unloads the model, anything else loads it."""
    if keep_alive == 0:
        engine.catalog.unload(info.name)
        reason = "unload"
    else:
        engine.begin(info, options, keep_alive).close()
        reason = "load"
    body = piece(model, "")
    body.update(done=True, done_reason=reason)
    return json_reply(body)


def complete(engine: Engine, info: ModelInfo, options: Options, keep_alive: float, turn: Turn,
             stream: bool) -> Reply | StreamReply:
    """Produce a turn whole or as a stream, after the base latency, holding a slot throughout."""
    started = time.perf_counter_ns()
    run = engine.begin(info, options, keep_alive)
    handed_over = False
    try:
        engine.pause(engine.config.latency_ms / 1000)
        prompt_ns = time.perf_counter_ns() - started - run.load_ns
        if stream:
            handed_over = True
            return StreamReply(_stream(engine, run, turn, started, prompt_ns), on_close=run.close)
        eval_started = time.perf_counter_ns()
        engine.pause(len(turn.tokens) * engine.config.token_ms / 1000)
        eval_ns = time.perf_counter_ns() - eval_started
        return json_reply(turn.final("".join(turn.tokens), started, run.load_ns, prompt_ns, eval_ns))
    finally:
        if not handed_over:
            run.close()


def _stream(engine: Engine, run: Run, turn: Turn, started: int, prompt_ns: int) -> Iterator[bytes]:
    token_seconds = engine.config.token_ms / 1000
    eval_started = time.perf_counter_ns()
    for token in turn.tokens:
        engine.pause(token_seconds)
        yield line(turn.piece(turn.model, token))
    eval_ns = time.perf_counter_ns() - eval_started
    yield line(turn.final("", started, run.load_ns, prompt_ns, eval_ns))


def embed(engine: Engine, req: EmbedRequest) -> Reply:
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    options = req.options or NO_OPTIONS
    inputs = ([req.input] if req.input else []) if isinstance(req.input, str) else list(req.input or ())
    dims = req.dimensions or engine.config.dims
    num_ctx = engine.load_key(options)[0]
    if not req.truncate and any(count_words(text) > num_ctx for text in inputs):
        raise ApiError(400, "input length exceeds the context length")
    if not inputs:
        if keep_alive == 0:
            engine.catalog.unload(info.name)
        else:
            engine.begin(info, options, keep_alive).close()
        return json_reply({"model": req.model, "embeddings": []})
    started = time.perf_counter_ns()
    run = engine.begin(info, options, keep_alive)
    try:
        engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms * len(inputs)) / 1000)
        vectors = [embedding(info.name, text, dims) for text in inputs]
    finally:
        run.close()
    return json_reply({
        "model": req.model, "embeddings": vectors, "total_duration": time.perf_counter_ns() - started,
        "load_duration": run.load_ns, "prompt_eval_count": sum(count_words(t) for t in inputs),
    })


def embeddings(engine: Engine, req: EmbeddingsRequest) -> Reply:
    """Answer the legacy single-text endpoint."""
    info = engine.require_model(req.model)
    keep_alive = engine.keep_alive(req.keep_alive)
    run = engine.begin(info, req.options or NO_OPTIONS, keep_alive)
    try:
        if req.prompt:
            engine.pause((engine.config.embed_call_ms + engine.config.embed_input_ms) / 1000)
    finally:
        run.close()
    vector = embedding(info.name, req.prompt, engine.config.dims) if req.prompt else []
    return json_reply({"embedding": vector})
