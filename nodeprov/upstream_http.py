"""A small pooled HTTP/1.1 client for the upstreams, on asyncio Protocols.

Each :class:`HttpClient` talks to one origin (its base URL, http or https with the default
SSL context and SNI) over a pool of keep-alive connections of its own
(:mod:`nodeprov.upstream_conn`). Response bytes go through :mod:`nodeprov.upstream_wire`
(httptools).

Timeouts: connect; write (while the request is stuck in the send buffer); read (for the
head and then for every chunk of the body); pool (waiting for a free connection when
``max_connections`` are in use, then :class:`PoolTimeout`). A request whose reused
connection turns out closed by the server before any byte of the answer came is sent once
more on a fresh connection; nothing else is retried. The upstream is reached directly:
``HTTP(S)_PROXY`` are not read.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nodeprov import __version__
from nodeprov.upstream_conn import PEEK_AFTER, Connection, Timeouts
from nodeprov.upstream_pool import Pool
from nodeprov.upstream_wire import (
    ConnectError,
    ConnectTimeout,
    Headers,
    ReadError,
    RemoteProtocolError,
    ResponseHead,
    check_header,
    request_head,
)

__all__ = ["HttpClient", "Request", "Response", "Timeouts"]


class Response:
    """An upstream answer: status and headers at once; the body read whole or streamed."""

    def __init__(
        self, head: ResponseHead, conn: Connection, pool: Pool[Connection], read: float
    ) -> None:
        self.status_code = head.status
        self.reason_phrase = head.reason
        self.headers: Headers = head.headers
        self._conn: Connection | None = conn
        self._pool: Pool[Connection] = pool
        self._read = read
        self._content: bytes | None = None

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def content(self) -> bytes:
        """The body (after :meth:`aread`; a non-streamed answer is read already)."""
        if self._content is None:
            raise RuntimeError("the response body was not read (call aread())")
        return self._content

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return json.loads(self.content)

    async def aread(self) -> bytes:
        """The whole body (read once, then kept)."""
        if self._content is None:
            chunks = [chunk async for chunk in self.aiter_bytes()]
            self._content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._content

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk, each as soon as it arrives."""
        conn = self._conn
        if conn is None:
            return
        try:
            while data := await conn.next_chunk(self._read):
                yield data
        except BaseException:
            self._release(False)
            raise
        self._release(conn.reusable)

    async def aclose(self) -> None:
        """Give the connection back (closed, if the body was not read to its end)."""
        self._release(False)

    def _release(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn, reusable)


@dataclass(frozen=True)
class Request:
    """A request ready to send: method, absolute URL, its path, extra headers, body."""

    method: str
    url: str
    target: str
    extra: tuple[tuple[str, str], ...]
    content: bytes
    defaults: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def headers(self) -> Headers:
        """Every header sent but Host and Content-Length (lowercase names; for inspection)."""
        headers = Headers({k.lower(): v for k, v in self.defaults.items()})
        headers.update((k.lower(), v) for k, v in self.extra)
        return headers


class HttpClient:
    """Pooled keep-alive connections to one origin; paths are relative to ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        max_connections: int,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        tls = parts.scheme == "https"
        host = parts.hostname
        port = parts.port or (443 if tls else 80)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None and port != (443 if tls else 80):
            netloc += f":{port}"
        self._prefix = parts.path.rstrip("/") + "/"
        self.base_url = f"{parts.scheme}://{netloc}{self._prefix}"
        self.timeouts = timeouts
        self.headers = Headers(
            {"user-agent": f"nodeprov/{__version__}", "accept-encoding": "identity"}
        )
        self.headers.update((k.lower(), v) for k, v in headers.items())
        for name, value in self.headers.items():
            check_header(name, value)
        lines = [f"Host: {netloc}\r\n"] + [f"{k}: {v}\r\n" for k, v in self.headers.items()]
        self._fixed = "".join(lines).encode("latin-1")
        if tls and ssl_context is None:
            ssl_context = ssl.create_default_context()  # the system's CAs, hostname checked

        async def connect() -> Connection:
            loop = asyncio.get_running_loop()
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: Connection(loop),
                        host,
                        port,
                        ssl=ssl_context if tls else None,
                        server_hostname=host if tls else None,
                    ),
                    timeouts.connect,
                )
            except TimeoutError:
                raise ConnectTimeout(f"no connection within {timeouts.connect:g} s") from None
            except OSError as exc:  # refused, unresolvable, TLS (ssl.SSLError is an OSError)
                raise ConnectError(f"{type(exc).__name__}: {exc}") from None
            return conn

        self._pool: Pool[Connection] = Pool(
            connect,
            max_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
            wait=timeouts.pool,
            peek_after=PEEK_AFTER,
        )

    def build(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, content: bytes = b""
    ) -> Request:
        """A request to ``path`` (relative to the base URL) with extra ``headers``."""
        target = self._prefix + path.lstrip("/")
        url = self.base_url[: -len(self._prefix)] + target
        extra = tuple(headers.items()) if headers else ()
        return Request(method, url, target, extra, content, self.headers)

    async def send(
        self, request: Request, *, stream: bool = False, read: float | None = None
    ) -> Response:
        """Send ``request``; the answer's body is read whole unless ``stream``."""
        head = request_head(
            request.method, request.target, self._fixed, request.extra, len(request.content)
        )
        read = self.timeouts.read if read is None else read
        pool = self._pool
        fresh = False
        while True:
            conn = await pool.acquire(fresh=fresh)
            try:
                answer = await conn.send(head, request.content, self.timeouts, read)
            except (RemoteProtocolError, ReadError) as exc:
                pool.release(conn, False)
                started = conn.reader is not None and conn.reader.started
                if fresh or not conn.reused or started:
                    raise exc from None
                fresh = True  # a kept-alive connection the server had closed: once more
                continue
            except BaseException:
                pool.release(conn, False)
                raise
            response = Response(answer, conn, pool, read)
            if not stream:
                await response.aread()
            return response

    async def get(self, path: str, *, read: float | None = None) -> Response:
        """``GET path``, the body read whole."""
        return await self.send(self.build("GET", path), read=read)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection right now (all ``max_connections`` busy)."""
        return self._pool.waiting

    @property
    def connections(self) -> int:
        """Connections open or opening to the origin."""
        return self._pool.opened

    async def aclose(self) -> None:
        """Close every idle connection and refuse new ones; answers in flight go on."""
        self._pool.close()
