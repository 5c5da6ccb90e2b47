"""OpenAI's chat-completions shapes for the providers of OpenAI-compatible APIs (OpenRouter, vLLM, LiteLLM, ...).

Jobs carry Ollama's shapes; an OpenAI-compatible API wants its own:
``openai_messages`` translates a chat's messages (images as image parts, tool
calls with ids, tool answers naming the call they answer), ``ToolCalls``
joins the pieces of tool calls a stream sends, and ``ollama_tool_call`` turns
a call back into Ollama's shape, the one results carry (arguments an object).
"""

from __future__ import annotations

from typing import Any

import msgspec

from llm_worker.protocol.jobs import Message

_encode = msgspec.json.Encoder().encode
# The first base64 characters of each image type: Ollama sends images bare, OpenAI wants a data URL.
_IMAGE_TYPES = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lG": "image/gif", "UklG": "image/webp"}


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI's messages for Ollama's: image parts, tool calls with ids, tool answers naming their call."""
    out: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, function name) of the tool calls made so far
    for number, m in enumerate(messages):
        item: dict[str, Any] = {"role": m.role, "content": openai_content(m.content, m.images)}
        if m.tool_calls:
            calls = [_openai_call(call, f"call_{number}_{i}") for i, call in enumerate(m.tool_calls)]
            item["tool_calls"] = calls
            unanswered += [(call["id"], call["function"]["name"]) for call in calls]
        if m.role == "tool" and unanswered:
            # Ollama names the function a tool message answers; OpenAI wants the call's id.
            index = next((i for i, (_, name) in enumerate(unanswered) if name == m.tool_name), 0)
            item["tool_call_id"] = unanswered.pop(index)[0]
        out.append(item)
    return out


def openai_content(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    """A message's content: its text, or text and image parts when it has images."""
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    return parts + [{"type": "image_url", "image_url": {"url": _image_url(image)}} for image in images]


def _image_url(image: str) -> str:
    """A data URL for Ollama's bare base64 image, its type read from the first bytes."""
    if image.startswith(("data:", "http://", "https://")):
        return image
    kind = next((kind for start, kind in _IMAGE_TYPES.items() if image.startswith(start)), "image/png")
    return f"data:{kind};base64,{image}"


def _openai_call(call: dict[str, Any], default_id: str) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    return {
        "id": call.get("id") or default_id,
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            "arguments": arguments if isinstance(arguments, str) else _encode(arguments).decode(),
        },
    }


def ollama_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as Ollama writes it: arguments as an object (kept as text when they are not JSON)."""
    function = call.get("function") or {}
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = msgspec.json.decode(arguments) if arguments.strip() else {}
        except msgspec.DecodeError:
            pass
    out: dict[str, Any] = {"function": {"name": function.get("name", ""), "arguments": arguments}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


class ToolCalls:
    """The tool calls of a streamed answer, joined from their pieces: id and name first, arguments in fragments."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, call: dict[str, Any]) -> None:
        """Take one piece (an item of a delta's ``tool_calls``) in."""
        known = self._calls.setdefault(call.get("index", len(self._calls)), {"function": {"name": "", "arguments": ""}})
        if call.get("id"):
            known["id"] = call["id"]
        function = call.get("function") or {}
        known["function"]["name"] += function.get("name") or ""
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            known["function"]["arguments"] += arguments
        elif arguments is not None:
            known["function"]["arguments"] = arguments

    def joined(self) -> list[dict[str, Any]]:
        """The calls so far, in index order, as OpenAI's shape (arguments as the text that came)."""
        return [self._calls[i] for i in sorted(self._calls)]

    def ollama(self) -> list[dict[str, Any]]:
        """The calls so far, in index order, as Ollama writes them."""
        return [ollama_tool_call(call) for call in self.joined()]
