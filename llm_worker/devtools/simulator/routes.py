"""Which handler answers each method and path, and what body it reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from llm_worker.devtools.simulator import admin, anthropic, inference, openai, openrouter
from llm_worker.devtools.simulator.anthropic import ANTHROPIC
from llm_worker.devtools.simulator.config import FaultList
from llm_worker.devtools.simulator.engine import Engine
from llm_worker.devtools.simulator.openai import OPENAI
from llm_worker.devtools.simulator.openrouter import OPENROUTER, OPENROUTER_PUBLIC
from llm_worker.devtools.simulator.protocol import (
    OLLAMA,
    ChatRequest,
    Dialect,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    Reply,
    StreamReply,
)


class Route(NamedTuple):
    name: str  # what faults' `endpoints` and the per-endpoint stats call it; "_sim" for control
    handler: Callable[[Engine, Any], Reply | StreamReply]
    body: type | None  # the struct the JSON body is decoded into; None: the body is ignored
    dialect: Dialect = OLLAMA  # how its errors and streams are shaped, and whether it checks a key


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/"): Route("root", admin.root, None),
    ("GET", "/api/version"): Route("version", admin.version, None),
    ("GET", "/api/tags"): Route("tags", admin.tags, None),
    ("GET", "/api/ps"): Route("ps", admin.ps, None),
    ("POST", "/api/show"): Route("show", admin.show, ModelRequest),
    ("POST", "/api/pull"): Route("pull", admin.pull, ModelRequest),
    ("DELETE", "/api/delete"): Route("delete", admin.delete, ModelRequest),
    ("POST", "/api/chat"): Route("chat", inference.chat, ChatRequest),
    ("POST", "/api/generate"): Route("generate", inference.generate, GenerateRequest),
    ("POST", "/api/embed"): Route("embed", inference.embed, EmbedRequest),
    ("POST", "/api/embeddings"): Route("embeddings", inference.embeddings, EmbeddingsRequest),
    # OpenAI's API, which Ollama serves beside its own.
    ("GET", "/v1/models"): Route("openai_models", openai.models, None, OPENAI),
    ("POST", "/v1/chat/completions"): Route(
        "openai_chat", openai.chat_completions, openai.ChatCompletionRequest, OPENAI
    ),
    ("POST", "/v1/embeddings"): Route("openai_embeddings", openai.embeddings, openai.EmbeddingsRequest, OPENAI),
    # Anthropic's Messages API (its /v1/models: BY_HEADER below).
    ("POST", "/v1/messages"): Route("anthropic_messages", anthropic.messages, anthropic.MessagesRequest, ANTHROPIC),
    # OpenRouter's API, under /api/v1 beside Ollama's /api.
    ("GET", "/api/v1/models"): Route("openrouter_models", openrouter.models, None, OPENROUTER_PUBLIC),
    ("POST", "/api/v1/chat/completions"): Route(
        "openrouter_chat", openrouter.chat_completions, openrouter.OpenRouterRequest, OPENROUTER
    ),
    ("GET", "/_sim/stats"): Route("_sim", admin.sim_stats, None),
    ("GET", "/_sim/faults"): Route("_sim", admin.sim_faults, None),
    ("POST", "/_sim/faults"): Route("_sim", admin.sim_set_faults, FaultList),
    ("DELETE", "/_sim/faults"): Route("_sim", admin.sim_clear_faults, None),
    ("POST", "/_sim/reset"): Route("_sim", admin.sim_reset, None),
}
# Ollama answers HEAD wherever it answers GET (its CLI probes `HEAD /`).
ROUTES.update({("HEAD", path): route for (method, path), route in list(ROUTES.items()) if method == "GET"})

# Paths two APIs share: a request carrying one of the headers goes to the other API's route.
_ANTHROPIC_MODELS = Route("anthropic_models", anthropic.models, None, ANTHROPIC)
BY_HEADER: dict[tuple[str, str], tuple[tuple[str, ...], Route]] = {
    (method, "/v1/models"): (("anthropic-version", "x-api-key"), _ANTHROPIC_MODELS) for method in ("GET", "HEAD")
}
