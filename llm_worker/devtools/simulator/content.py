"""Deterministic stand-ins for what a model says: its reasoning, reply tokens and embedding vectors."""

from __future__ import annotations

import hashlib
import math
import struct

ECHO_WORDS = 8  # a reply starts by echoing this many words of the prompt


def count_words(text: str) -> int:
    """Return the simulator's token count of a prompt: its whitespace-separated words."""
    return len(text.split())


def reply_tokens(prompt: str, natural: int, num_predict: int | None) -> tuple[list[str], str]:
    """Return the reply's tokens and done_reason.

    The reply echoes the prompt's first words, then counts on from there
    ("Why is the sky blue? 6 7 8 ..."), so joined tokens split back into
    exactly ``eval_count`` words. ``num_predict`` below the natural length
    cuts it short with done_reason "length"; a negative one is no limit.
    """
    limit = natural if num_predict is None or num_predict < 0 else min(natural, num_predict)
    words = prompt.split()[: min(ECHO_WORDS, limit)]
    words += [str(i) for i in range(len(words) + 1, limit + 1)]
    tokens = _tokens(words)
    reason = "length" if num_predict is not None and 0 <= num_predict < natural else "stop"
    return tokens, reason


def thought_tokens(level: str) -> list[str]:
    """Return a thinking model's reasoning at a think level ("medium" for ``think: true``), as tokens."""
    return _tokens(f"Thinking at {level} effort.".split())


def think_then_reply(
    prompt: str, natural: int, num_predict: int | None, level: str | None
) -> tuple[list[str], list[str], str]:
    """Return (thoughts, reply tokens, done_reason) of a model that thinks first when ``level`` is set.

    ``num_predict`` bounds both together, as Ollama counts every generated
    token: a low one can end the turn while the model still thinks.
    """
    thoughts = thought_tokens(level) if level else []
    if num_predict is None or num_predict < 0 or num_predict >= len(thoughts):
        left = None if num_predict is None or num_predict < 0 else num_predict - len(thoughts)
        tokens, reason = reply_tokens(prompt, natural, left)
        return thoughts, tokens, reason
    return thoughts[:num_predict], [], "length"


def _tokens(words: list[str]) -> list[str]:
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def embedding(model: str, text: str, dims: int) -> list[float]:
    """Return a unit vector that depends only on the model, the text and dims."""
    raw = hashlib.shake_256(f"{model}\0{text}".encode()).digest(2 * dims)
    values = [v - 32767.5 for v in struct.unpack(f"<{dims}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
