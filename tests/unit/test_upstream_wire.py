"""The upstream client's HTTP/1.1 bytes, without I/O: request heads out, responses in."""

from __future__ import annotations

import pytest

from nodeprov.upstream_wire import ResponseReader, WireError, request_head

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def feed_bytewise(reader: ResponseReader, data: bytes) -> None:
    for i in range(len(data)):
        reader.feed(data[i : i + 1])


def test_request_head_has_the_fixed_lines_the_headers_and_the_length() -> None:
    head = request_head(
        "POST", "/v1/chat/completions", b"Host: up\r\n", [("Content-Type", "a/b")], 12
    )
    assert head == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: up\r\nContent-Type: a/b\r\n"
        b"Content-Length: 12\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("name", "value"), [("X-A", "v\r\nX-Injected: 1"), ("X-A", "v\nx"), ("X-A\r\nB", "v")]
)
def test_request_head_refuses_a_header_that_would_split_the_request(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        request_head("POST", "/", b"", [(name, value)], 0)


def test_content_length_body_fed_byte_by_byte() -> None:
    reader = ResponseReader()
    feed_bytewise(reader, b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert reader.head is not None and not reader.complete
    assert (reader.head.status, reader.head.reason) == (201, "Created")
    assert reader.head.headers["X-A"] == "1, 2" and reader.head.headers.get("x-a") == "1, 2"
    feed_bytewise(reader, b"hel")
    assert reader.take() == b"hel" and not reader.complete
    reader.feed(b"lo")
    assert reader.take() == b"lo"
    assert reader.complete and reader.keep_alive


def test_chunked_body_is_delivered_as_it_arrives() -> None:
    reader = ResponseReader()
    reader.feed(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    assert reader.take() == b""
    reader.feed(b"6\r\ndata: ")
    assert reader.take() == b"data: "  # part of a chunk: passed on before the chunk ends
    reader.feed(b"\r\n3\r\n1\n\n\r\n")
    assert reader.take() == b"1\n\n"
    assert not reader.complete
    reader.feed(b"0\r\n\r\n")
    assert reader.complete and reader.keep_alive and reader.take() == b""


def test_a_body_without_framing_runs_until_the_peer_closes() -> None:
    reader = ResponseReader()
    reader.feed(HEAD + b"\r\nsome ")
    reader.feed(b"bytes")
    assert not reader.complete
    assert reader.eof()
    assert reader.complete and not reader.keep_alive
    assert reader.take() == b"some bytes"


def test_eof_before_the_end_of_a_framed_body_is_not_an_end() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not reader.eof() and not reader.complete
    headless = ResponseReader()
    assert not headless.eof()


def test_connection_close_and_http_1_0_are_not_kept_alive() -> None:
    for head in (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    ):
        reader = ResponseReader()
        reader.feed(head)
        assert reader.complete and not reader.keep_alive


def test_an_interim_100_continue_is_skipped() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert reader.head is None and not reader.complete
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert reader.head is not None and reader.head.status == 200
    assert reader.complete and reader.take() == b"ok"


def test_204_has_no_body_even_without_framing() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert reader.complete and reader.keep_alive


def test_a_head_over_the_cap_is_refused() -> None:
    reader = ResponseReader(max_head_bytes=1024)
    with pytest.raises(WireError, match="larger than 1024"):
        reader.feed(b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 2000 + b"\r\n\r\n")


@pytest.mark.parametrize(
    "garbage",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"],
)
def test_malformed_responses_are_refused(garbage: bytes) -> None:
    with pytest.raises(WireError):
        ResponseReader().feed(garbage)


def test_bytes_after_the_end_are_refused() -> None:
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    with pytest.raises(WireError):
        reader.feed(b"HTTP/1.1 200 OK\r\n")
