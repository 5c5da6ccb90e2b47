"""Which Ollama the simulator imitates: the words and statuses that changed between its versions.

``SimulatorConfig.ollama_version`` (``--ollama-version``, default 0.33.0) picks
them. Each change is dated by the first tag of github.com/ollama/ollama that has it:

- v0.30.0 (2026-06-01) runs models in llama.cpp's ``llama-server`` instead of
  Ollama's own runner (llm/server.go gave way to llm/llama_server.go). "llama
  runner process has terminated: ..." became "llama-server process has
  terminated: ...", "llama runner process no longer running: 2 ..." (a bare exit
  code) became "llama-server process no longer running: exit status 2 ...", and a
  load refused for memory, "model requires more system memory (X GiB) than is
  available (Y GiB)" (llm/server.go, up to v0.25.0-rc0), became "llama-server
  reported out-of-memory during startup: ..." with the runner's own line.
- v0.13.3 (2025-12-11): /api/embed answers an error of the embedding call itself
  with 400 (server/routes.go EmbedHandler), not 500 as before.
- v0.12.0 (2025-09-18): /api/chat looks the model up itself and says "model 'x'
  not found"; /api/generate has since v0.5.2 (2024-12-13). Before, both said the
  scheduler's ``model "x" not found, try pulling it first``, which /api/embed
  and /api/embeddings still say in v0.33 (handleScheduleError).
"""

from __future__ import annotations

import re
from typing import Literal

# llm/status.go (v0.33) outOfMemorySubstrings, after which the scheduler expires every loaded
# model: one list of Ollama's texts, kept with the client's table of what each answer means.
from llm_worker.plugins.ollama_errors import OUT_OF_MEMORY

Wording = Literal["old", "new"]
_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")

LLAMA_SERVER = (0, 30, 0)
EMBED_ERRORS_400 = (0, 13, 3)
GENERATE_SAYS_NOT_FOUND = (0, 5, 2)
CHAT_SAYS_NOT_FOUND = (0, 12, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """Return (major, minor, patch) of "0.33", "0.33.0" or "v0.33.0-rc2"; raise ValueError otherwise."""
    match = _VERSION.fullmatch(text.strip().split("-", 1)[0])
    if match is None:
        raise ValueError(f"ollama_version {text!r} is not MAJOR.MINOR[.PATCH]")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def is_out_of_memory(message: str) -> bool:
    """Return whether Ollama counts this error as out of memory (llm/status.go IsOutOfMemoryMessage)."""
    low = message.lower()
    return any(needle in low for needle in OUT_OF_MEMORY)


class OllamaVersion:
    """The behaviours of one Ollama version that the simulator can imitate either way."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.number = parse_version(text)
        self.llama_server = self.number >= LLAMA_SERVER

    def messages(self) -> dict[str, str]:
        """Return the error text of each fault reason, in this version's words."""
        if self.llama_server:  # llm/llama_server.go WaitUntilRunning and getServerStatus, v0.30.0 on
            runner = {
                "oom": "llama-server reported out-of-memory during startup: cudaMalloc failed: out of memory",
                "runner": "llama-server process has terminated: exit status 2",
                "crash": "llama-server process no longer running: exit status 2 "
                "CUDA error: an illegal memory access was encountered",
                "run_oom": "llama-server process no longer running: exit status 2 CUDA error: out of memory",
            }
        else:  # llm/server.go, up to v0.25.0-rc0
            runner = {
                "oom": "model requires more system memory (12.3 GiB) than is available (4.0 GiB)",
                "runner": "llama runner process has terminated: exit status 2",
                "crash": "llama runner process no longer running: 2 "
                "CUDA error: an illegal memory access was encountered",
                "run_oom": "llama runner process no longer running: 2 CUDA error: out of memory",
            }
        return {
            **runner,
            "busy": "server busy, please try again.  maximum pending requests exceeded",  # server/sched.go ErrMaxQueue
            "bad_request": "invalid request",
            # llm/llama_server.go Completion: the runner's stream broke off.
            "internal": "an error was encountered while running the model: unexpected EOF",
            "rate_limit": "Rate limit reached for requests. Please try again in 1s.",  # OpenAI's, for /v1 drills
        }

    def midstream_message(self, reason: str) -> str:
        """Return the error a stream breaks off with when the runner dies under it, for a runner reason.

        llm/llama_server.go Completion (llm/server.go before v0.30, same words):
        llama-server's stream ends in "unexpected EOF" and Ollama names the
        runner's last error line, else that EOF.
        """
        cause = {
            "oom": "CUDA error: out of memory",
            "run_oom": "CUDA error: out of memory",
            "runner": "CUDA error: an illegal memory access was encountered",
            "crash": "CUDA error: an illegal memory access was encountered",
        }.get(reason, "unexpected EOF")
        return f"an error was encountered while running the model: {cause}"

    def embed_error_status(self) -> int:
        """Return the status /api/embed answers an error of the embedding call with."""
        return 400 if self.number >= EMBED_ERRORS_400 else 500

    def not_found_wording(self, endpoint: str) -> Wording:
        """Return which of Ollama's two texts for a missing model this endpoint answers."""
        if endpoint in ("chat", "openai_chat"):
            return "new" if self.number >= CHAT_SAYS_NOT_FOUND else "old"
        if endpoint == "generate":
            return "new" if self.number >= GENERATE_SAYS_NOT_FOUND else "old"
        if endpoint in ("embed", "embeddings", "openai_embeddings"):
            return "old"  # the scheduler's error, through handleScheduleError, in every version
        return "new"  # show, delete and the rest look the model up themselves
