"""One keep-alive HTTP/1.1 connection to an upstream, as an asyncio Protocol.

It learns that the peer closed it from ``connection_lost``, so taking it from the pool costs
no system call; one idle for over :data:`PEEK_AFTER` seconds is checked for a close the loop
has not seen yet. Reads stop above :data:`READ_HIGH_WATER` buffered bytes (backpressure).
The pooled client around it: :mod:`nodeprov.upstream_http`.
"""

from __future__ import annotations

import asyncio
import select
from dataclasses import dataclass
from typing import Any, cast

from nodeprov.upstream_wire import (
    ReadError,
    ReadTimeout,
    RemoteProtocolError,
    ResponseHead,
    ResponseReader,
    TransportError,
    WireError,
    WriteTimeout,
)

# A connection idle this long is checked for a close its loop has not processed yet.
PEEK_AFTER = 1.0
# Body bytes buffered before the connection stops reading from the socket (backpressure).
READ_HIGH_WATER = 256 * 1024
# Bodies up to this size go out in the same write as the head (one segment, one syscall).
JOIN_BODY_BELOW = 64 * 1024


@dataclass(frozen=True)
class Timeouts:
    """Seconds: to connect, per write stall, per read (head and each body chunk), pool wait."""

    connect: float
    read: float
    write: float
    pool: float


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False  # it served a request before
        self.idle = False  # in its pool's idle list
        self.idle_since = 0.0
        self.reader: ResponseReader | None = None
        self.error: TransportError | None = None
        self.on_lost: Any = None  # called with the connection when it closes while idle
        self._waiter: asyncio.Future[bool] | None = None
        self._write_paused = False
        self._read_paused = False

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        if reader is None or self.error is not None:
            self.abort()  # bytes nobody asked for: the connection's state is unknown
            return
        try:
            reader.feed(data)
        except WireError as exc:
            self.error = RemoteProtocolError(str(exc))
            self.abort()
        else:
            if reader.buffered > READ_HIGH_WATER and not self._read_paused and self.transport:
                self._read_paused = True
                self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader = self.reader
        if reader is not None and self.error is None and not reader.eof():
            if exc is None:
                self.error = RemoteProtocolError("the server closed the connection mid-answer")
            else:
                self.error = ReadError(f"{type(exc).__name__}: {exc}")
        self._wake()
        if self.idle and self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # --- used by the client and its pool ------------------------------------------

    def abort(self) -> None:
        """Close at once, dropping anything unsent (its state is of no further use)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def peer_closed(self) -> bool:
        """Whether the socket is readable while idle: a close (or stray bytes) not seen yet."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return True
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    async def _wait(self, seconds: float) -> bool:
        """Until something happens on the connection (True) or ``seconds`` pass (False)."""
        waiter: asyncio.Future[bool] = self.loop.create_future()
        self._waiter = waiter
        handle = self.loop.call_later(seconds, _expire, waiter)
        try:
            return await waiter
        finally:
            self._waiter = None
            handle.cancel()

    async def send(self, head: bytes, body: bytes, timeouts: Timeouts, read: float) -> ResponseHead:
        """Write a request and wait for the head of its response."""
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            raise RemoteProtocolError("the connection closed before the request was sent")
        reader = self.reader = ResponseReader()
        self.error = None
        if len(body) < JOIN_BODY_BELOW:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        while self._write_paused and not self.closed:
            if not await self._wait(timeouts.write):
                raise WriteTimeout(f"the request could not be written in {timeouts.write:g} s")
        while reader.head is None:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise RemoteProtocolError("the connection closed before the answer came")
            if not await self._wait(read):
                raise ReadTimeout(f"no answer within {read:g} s")
        return reader.head

    async def next_chunk(self, read: float) -> bytes:
        """The body bytes that arrived since the last call; ``b""`` at the body's end."""
        reader = self.reader
        assert reader is not None
        while True:
            data = reader.take()
            if data:
                if self._read_paused and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
                return data
            if reader.complete:
                return b""
            if self.error is not None:
                raise self.error
            if self.closed:
                raise RemoteProtocolError("the connection closed mid-answer")
            if not await self._wait(read):
                raise ReadTimeout(f"no data within {read:g} s")

    @property
    def reusable(self) -> bool:
        """Whether the last answer ended cleanly on a connection both sides keep open."""
        reader = self.reader
        return (
            not self.closed
            and self.error is None
            and reader is not None
            and reader.complete
            and reader.keep_alive
            and not reader.chunks
        )
