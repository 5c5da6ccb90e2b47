"""The authors' HTTP helpers on their own: Server-Sent Events as the WHATWG rules read them, Retry-After both ways."""

from __future__ import annotations

from collections.abc import Iterator

from llm_worker.plugin import ServerSentEvent, sse_events


def test_events_are_named_their_data_lines_joined_and_comments_skipped() -> None:
    lines = [
        b": OPENROUTER PROCESSING\n",
        b"\n",  # a comment alone is no event
        b"event: message_start\n",
        b'data: {"a":\n',
        b"data:1}\r\n",  # CRLF, and no space after the colon
        b"id: 7\n",
        b"\n",
        b"data: [DONE]\n",
        b"\n",
        b"event: ping\n",
        b"\n",  # a name without data is no event
        b"data: cut",  # the stream ends inside an event: dropped
    ]
    assert list(sse_events(iter(lines))) == [
        ServerSentEvent("message_start", b'{"a":\n1}'),
        ServerSentEvent("message", b"[DONE]"),
    ]


def test_closing_the_events_closes_the_lines_under_them() -> None:
    closed = []

    def lines() -> Iterator[bytes]:
        try:
            yield b"data: 1\n"
            yield b"\n"
            yield b"data: 2\n"
        finally:
            closed.append(True)

    events = sse_events(lines())
    assert next(events).data == b"1"
    events.close()
    assert closed == [True]
