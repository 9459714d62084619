"""HTTP/1.1 bytes for the upstream client, without I/O: request heads out, response events in.

:func:`request_head` writes a request's head; :class:`ResponseReader` is fed the bytes a
connection receives and collects the response head, body chunks (as they arrive) and its
end, through httptools' C parser (llhttp). A body framed by neither ``Content-Length`` nor
chunked encoding runs until the peer closes: :meth:`ResponseReader.eof` ends it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import overload

import httptools

# Status line plus headers of a response; past it the response is refused.
MAX_HEAD_BYTES = 64 * 1024


class WireError(Exception):
    """The peer sent bytes that are not a valid HTTP/1.1 response (or a head over the cap)."""


class TransportError(Exception):
    """The request failed below HTTP: connecting, writing, reading or waiting for the pool."""


class ConnectError(TransportError):
    """The upstream could not be connected to (refused, unresolvable, TLS failure)."""


class ReadError(TransportError):
    """The connection failed (reset) while sending or receiving."""


class RemoteProtocolError(TransportError):
    """The upstream broke the connection mid-answer, or sent something that is not HTTP."""


class PoolTimeout(TransportError):
    """Every connection the pool may open stayed busy for the whole pool wait."""


class TimeoutException(TransportError):
    """A connect, write or read timeout."""


class ConnectTimeout(TimeoutException):
    pass


class WriteTimeout(TimeoutException):
    pass


class ReadTimeout(TimeoutException):
    pass


class Headers(dict[str, str]):
    """Response headers: lowercase names; a repeated header's values joined by ``", "``."""

    @overload  # type: ignore[override]
    def get(self, key: str) -> str | None: ...

    @overload
    def get(self, key: str, default: str) -> str: ...

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of header ``key`` (any case), or ``default``."""
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)


@dataclass(frozen=True)
class ResponseHead:
    """Status, reason phrase and headers of a response."""

    status: int
    reason: str
    headers: Headers


def check_header(name: str, value: str) -> None:
    """Raise ``ValueError`` for a header that would break the request's framing."""
    if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
        raise ValueError(f"header {name!r} holds a line break or a colon in its name")


def request_head(
    method: str, target: str, fixed: bytes, headers: Iterable[tuple[str, str]], length: int
) -> bytes:
    """The head of a request: ``fixed`` is pre-encoded ``Name: value\\r\\n`` lines (Host first).

    ``headers`` are checked (no line breaks); the body's ``length`` is always sent, so
    the upstream never has to guess where the body ends.
    """
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1"), fixed]
    for name, value in headers:
        check_header(name, value)
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"Content-Length: %d\r\n\r\n" % length)
    return b"".join(lines)


class ResponseReader:
    """One response, parsed as its bytes arrive (the parser calls the ``on_*`` methods)."""

    def __init__(self, max_head_bytes: int = MAX_HEAD_BYTES) -> None:
        self.head: ResponseHead | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0  # bytes in ``chunks``
        self.complete = False
        self.keep_alive = False
        self.started = False  # a byte of the response arrived
        self._until_close = False
        self._parser = httptools.HttpResponseParser(self)
        self._max = max_head_bytes
        self._size = 0
        self._fed = 0  # bytes fed before the final head was complete
        self._reason = b""
        self._names: list[bytes] = []
        self._values: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises :class:`WireError` on a malformed or oversized response."""
        self.started = True
        if self.complete:
            raise WireError("bytes after the end of the response")
        if self.head is None:
            # Counted as fed, not per parsed header: the parser buffers a header until its
            # line ends, and each interim (1xx) response would start a per-head count again.
            self._fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            raise WireError(str(exc.__context__ or exc)) from None
        except httptools.HttpParserError as exc:
            raise WireError(f"malformed response: {exc}") from None
        except httptools.HttpParserUpgrade:
            raise WireError("the upstream switched protocols (101)") from None
        if self.head is None and self._fed > self._max:
            raise WireError(f"the response head is larger than {self._max} bytes")

    def eof(self) -> bool:
        """The peer closed: True if that ends the response (a body that runs until close)."""
        if not self.complete and self.head is not None and self._until_close:
            self.complete = True
        return self.complete

    def take(self) -> bytes:
        """The body bytes buffered so far (and empty the buffer)."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        return data

    # --- parser callbacks -------------------------------------------------------

    def _grow(self, size: int) -> None:
        self._size += size
        if self._size > self._max:
            raise WireError(f"the response head is larger than {self._max} bytes")

    def on_message_begin(self) -> None:
        if self.complete:
            # Another response after the one asked for: the connection is out of step.
            raise WireError("bytes after the end of the response")

    def on_status(self, status: bytes) -> None:
        self._grow(len(status))
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        self._names.append(name)
        self._values.append(value)

    def on_headers_complete(self) -> None:
        if self.complete:
            raise WireError("a second response to one request")
        headers = Headers()
        for raw_name, raw_value in zip(self._names, self._values, strict=True):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1").strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        status = self._parser.get_status_code()
        self._names, self._values = [], []
        if status < 200:
            self._reason, self._size = b"", 0  # an interim response: the real one follows
            return
        reason = self._reason.decode("latin-1")
        self.head = ResponseHead(status, reason, headers)
        framed = "content-length" in headers or "transfer-encoding" in headers
        self._until_close = not framed and status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)

    def on_message_complete(self) -> None:
        if self.head is None:
            return  # the end of an interim (1xx) response
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive() and not self._until_close
