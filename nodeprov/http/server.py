"""The HTTP server: uvicorn's HTTP/1.1 protocol with limits on how long and how large a
request's headers and body may be, and proxy headers believed only from configured proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nodeprov.config import HttpSection
from nodeprov.errors import ConfigError, openai_error


def _header_refusal(limit: int) -> bytes:
    message = f"the request line and headers are larger than {limit} bytes"
    error = openai_error("invalid_request_error", "request_header_fields_too_large", message)
    body = json.dumps(error).encode()
    head = (
        "HTTP/1.1 431 Request Header Fields Too Large\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with limits on each request's headers and body.

    uvicorn times out idle keep-alive connections only after a first response, every byte
    received resets that timer, and its parser keeps header bytes until the blank line. Here
    a connection must deliver a request's complete headers within ``header_timeout`` seconds
    of connecting (or of the request's first byte on a kept-alive connection), however
    slowly the bytes arrive, and in at most ``max_header_bytes`` (past it: 431, then close);
    once the headers are in, the body may not pause for more than ``body_idle_timeout``
    seconds nor take longer than ``body_timeout`` seconds in all (a byte every few seconds
    never pauses long). Nothing has been held or charged when a connection is cut: every
    route reads its body first.
    """

    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    body_timeout: float = 120.0
    max_header_bytes: int = 64 * 1024
    _header_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None
    _body_total_deadline: asyncio.TimerHandle | None = None
    # Header bytes of the request being read: counted up to the blank line that ends them
    # (found across chunk boundaries with the last three bytes seen), never body bytes.
    _header_bytes: int = 0
    _in_headers: bool = True
    _tail: bytes = b""
    _refused: bool = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the client closes or the linger ends
        if self._in_headers and not self.transport.is_closing():
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._tail))
            self._tail = seen[-3:] if end < 0 else b""
            if self._header_bytes > self.max_header_bytes:
                self._refuse_headers()  # before the parser buffers (or serves) any of it
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm_header_deadline()
        super().on_headers_complete()
        self._arm_body_deadline()  # disarmed at once by on_message_complete if no body
        self._body_total_deadline = self.loop.call_later(self.body_timeout, self._body_too_slow)

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_deadline()

    def on_message_complete(self) -> None:
        self._disarm_body_deadline()
        self._in_headers, self._header_bytes, self._tail = True, 0, b""
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        self._disarm_body_deadline()
        super().connection_lost(exc)

    def _refuse_headers(self) -> None:
        """431 and close; the rest of what the client sends is read and dropped for a while,
        so that closing does not reset the connection before the client reads the answer."""
        self._refused = True
        self._disarm_header_deadline()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined answer is being written: no room for ours
            return
        self.transport.write(_header_refusal(self.max_header_bytes))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._late)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _arm_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
        self._body_deadline = self.loop.call_later(self.body_idle_timeout, self._body_late)

    def _disarm_body_deadline(self) -> None:
        for handle in (self._body_deadline, self._body_total_deadline):
            if handle is not None:
                handle.cancel()
        self._body_deadline = self._body_total_deadline = None

    def _server_paused(self) -> bool:
        # The server stopped reading (the app has not taken the body yet): not the client's
        # doing, so not held against it.
        return self.flow is not None and self.flow.read_paused

    def _body_late(self) -> None:
        self._body_deadline = None
        if self._server_paused():
            self._arm_body_deadline()
            return
        self._late()

    def _body_too_slow(self) -> None:
        self._body_total_deadline = None
        if self._server_paused():
            self._body_total_deadline = self.loop.call_later(
                self.body_idle_timeout, self._body_too_slow
            )
            return
        self._late()

    def _late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(http: HttpSection) -> type[HeaderTimeoutProtocol]:
    """:class:`HeaderTimeoutProtocol` with the limits of ``http``."""
    limits = {
        "header_timeout": float(http.header_timeout_seconds),
        "body_idle_timeout": float(http.body_idle_timeout_seconds),
        "body_timeout": float(http.body_timeout_seconds),
        "max_header_bytes": http.max_header_bytes,
    }
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), limits)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon (or the test) decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A listening socket (port 0: a free one); :class:`ConfigError` naming the address if not.

    ``shared``: SO_REUSEPORT, so each worker of ``start --workers`` listens on the port with a
    socket (and accept queue) of its own beside this one, and the kernel spreads connections
    over them (:mod:`nodeprov.workers`).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio turns on TCP_NODELAY only for sockets that do, and without
    # it every keep-alive response waits ~40 ms (Nagle against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use (another node or program listens there)"
        raise ConfigError(
            f"cannot listen on {shown}: {reason}; choose another http.port"
            " (or NODEPROV_HTTP__PORT) or stop what uses it"
        ) from None
    sock.setblocking(False)
    return sock


async def serve(
    app: Any,
    sock: socket.socket,
    stop: asyncio.Event,
    http: HttpSection | None = None,
    *,
    more: Sequence[socket.socket] = (),
) -> None:
    """Serve ``app`` on ``sock`` (and ``more``) until ``stop`` is set; open streams get a grace
    period.

    ``http`` gives the request limits (see :class:`HeaderTimeoutProtocol`), how long an idle
    keep-alive connection stays open, and the proxies whose ``X-Forwarded-For`` is believed:
    none by default, so the client address is the peer's and no client can name another's.
    """
    http = http or HttpSection()
    proxies = list(http.forwarded_allow_ips)
    config = uvicorn.Config(
        app,
        lifespan="off",
        loop="none",  # the caller's loop (nodeprov.event_loop); uvicorn sets no loop policy
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=http.keepalive_timeout_seconds,
        http=guarded_protocol(http),
        proxy_headers=bool(proxies),
        forwarded_allow_ips=proxies,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock, *more]))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        waiter.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
        for each in (sock, *more):
            each.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise RuntimeError("the HTTP server stopped") from task.exception()
