"""The client on its own: SSE parsing under any chunking, and network failures as sentences."""

from __future__ import annotations

import json
import socket
import threading
from typing import Iterator, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medmllm.client import (
    BackendTimeout,
    MedMLLMClient,
    ServerError,
    StreamInterrupted,
    parse_sse,
)

EVENTS = [
    {"type": "token", "text": "Hello, 世界\r\n"},
    {"type": "box", "label": "lung: left", "roi": {"center": [1.0, 2.0, 3.0]}},
    {"type": "done", "timings": {"tokens": 1}},
]


def _wire(events, newline: bytes) -> bytes:
    parts = [b": ping" + newline + newline]
    for e in events:
        parts.append(b"event: " + e["type"].encode() + newline)
        parts.append(b"data: " + json.dumps(e, ensure_ascii=False).encode() + newline + newline)
    return b"".join(parts)


def _split(data: bytes, cuts: List[int]) -> Iterator[bytes]:
    last = 0
    for cut in sorted(set(cuts)):
        yield data[last:cut]
        last = cut
    yield data[last:]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([b"\r\n", b"\n", b"\r"]), st.lists(st.integers(0, 400), max_size=40))
def test_sse_parser_is_robust_to_any_chunking(newline, cuts):
    data = _wire(EVENTS, newline)
    assert list(parse_sse(_split(data, [c % (len(data) + 1) for c in cuts]))) == EVENTS


def test_sse_parser_byte_by_byte_keeps_multibyte_characters():
    data = _wire(EVENTS, b"\r\n")
    assert list(parse_sse(data[i : i + 1] for i in range(len(data)))) == EVENTS


def test_sse_multiline_data_and_missing_type():
    data = b'data: {"a":\ndata: 1}\n\n'
    assert list(parse_sse([data])) == [{"a": 1, "type": "message"}]


def test_unreadable_event_is_a_clear_error():
    with pytest.raises(StreamInterrupted, match="unreadable 'token' event"):
        list(parse_sse([b"event: token\ndata: {not json\n\n"]))


class RawServer:
    """A one-shot TCP server replying with fixed bytes (or nothing) to test broken servers."""

    def __init__(self, reply: bytes, close: bool = True, hold: float = 0.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply, self.close, self.hold = reply, close, hold
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        conn.recv(65536)
        conn.sendall(self.reply)
        if not self.close:
            self.done.wait(self.hold)
        conn.close()
        self.sock.close()


def test_connection_lost_mid_stream_keeps_the_events_received():
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    event = b'event: token\r\ndata: {"type": "token", "text": "partial"}\r\n\r\n'
    server = RawServer(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")
    received = []
    with pytest.raises(StreamInterrupted, match=r"lost mid-answer|closed the stream"):
        for e in MedMLLMClient(server.url).chat("0" * 64, "hi"):
            received.append(e)
    assert received == [{"type": "token", "text": "partial"}]


def test_stream_ending_without_done_is_reported():
    body = b'event: token\ndata: {"type": "token", "text": "x"}\n\n'
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n"
    server = RawServer(head.encode() + body)
    with pytest.raises(StreamInterrupted, match="before the answer finished"):
        list(MedMLLMClient(server.url).chat("0" * 64, "hi"))


def test_5xx_and_read_timeout_are_sentences():
    body = b"Internal Server Error"
    reply = f"HTTP/1.1 500 Internal Server Error\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body
    with pytest.raises(ServerError, match="the server failed \\(HTTP 500\\)"):
        MedMLLMClient(RawServer(reply).url).models()
    silent = RawServer(b"", close=False, hold=5)
    with pytest.raises(BackendTimeout, match="did not answer in time"):
        MedMLLMClient(silent.url, timeout=(2, 0.3)).models()
    silent.done.set()


def test_token_never_appears_in_repr():
    client = MedMLLMClient("http://127.0.0.1:1", token="top-secret")
    assert "top-secret" not in repr(client)
