"""A loopback TCP proxy to make a real server slow, stalled or unreachable on demand.

The proxy is asyncio code running on its **own event loop in a daemon thread**, and its control
methods are synchronous and thread-safe. So it keeps forwarding while a test blocks its own loop
(the sync openai SDK, ``time.sleep``) and it works the same from sync and async tests.

    proxy = TcpProxy.to_url(mint.url, delay=0.5).start()   # a mint that answers 0.5 s late
    proxy.pause()               # new connections hang until resume()
    proxy.pause(refuse=True)    # stop listening: new connections get ECONNREFUSED
    proxy.drop_connections()    # cut the connections that are open (keep-alive pools)
    proxy.resume(); proxy.close()

``dead_url()`` gives an http URL on 127.0.0.1 where nothing listens (connection refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = ["TcpProxy", "dead_port", "dead_url"]

LOOPBACK = "127.0.0.1"
_T = TypeVar("_T")
_CHUNK = 65536

# Sockets bound (never listening) for dead_url(): holding them keeps the port reserved, so no
# other server can take it during the run and connects to it are refused deterministically.
_dead_sockets: list[socket.socket] = []


def dead_port() -> int:
    """A port on 127.0.0.1 where nothing listens, reserved for the rest of the process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    _dead_sockets.append(sock)
    port: int = sock.getsockname()[1]
    return port


def dead_url(scheme: str = "http") -> str:
    """``http://127.0.0.1:PORT`` with nothing listening there (connect fails at once)."""
    return f"{scheme}://{LOOPBACK}:{dead_port()}"


def _reuse_port_socket(reuse_address: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


class TcpProxy:
    """Forward 127.0.0.1:<port> to ``target_host:target_port``.

    ``connect_delay``: seconds each new connection waits before it is connected upstream.
    ``delay``: seconds each chunk from the client waits before it is forwarded, i.e. about once
    per HTTP request, also on keep-alive connections (this is the "slow mint" knob).
    Both are plain attributes and can be changed at any time.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        delay: float = 0.0,
        connect_delay: float = 0.0,
        port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        # Seconds each chunk from the server waits: the request is done, the answer is late.
        self.response_delay = 0.0
        self.connect_delay = connect_delay
        self.port = port
        self.connections_total = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None  # set = accept, clear = stall
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._refusing = False
        # Bound with SO_REUSEPORT and never listening: keeps the port ours while pause(refuse=True)
        # has closed the listener, so resume() can bind it again (no other server can take it
        # meanwhile; connects get ECONNREFUSED, as from a port where nothing listens).
        self._placeholder: socket.socket | None = None

    @classmethod
    def to_url(cls, url: str, **kwargs: Any) -> TcpProxy:
        """A proxy in front of the host:port of ``url`` (http, https, ws or wss)."""
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"no host in {url!r}")
        default = 443 if parts.scheme in ("https", "wss") else 80
        return cls(parts.hostname, parts.port or default, **kwargs)

    # ------------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    def __repr__(self) -> str:
        return f"TcpProxy({self.url} -> {self.target_host}:{self.target_port}, delay={self.delay})"

    # ------------------------------------------------------------------------ lifecycle

    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"tcp-proxy-{id(self):x}", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join(5)
            self._thread = None
            raise failure[0]
        return self

    def close(self) -> None:
        """Stop listening, cut every connection and stop the proxy thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._call(self._shutdown(), timeout=10)
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------- control

    def pause(self, *, refuse: bool = False) -> None:
        """New connections stall until ``resume()``; with ``refuse=True`` they are refused."""
        self._call(self._pause(refuse))

    def resume(self) -> None:
        self._call(self._resume())

    def drop_connections(self) -> None:
        """Close every connection that is open now (the client sees a reset/EOF)."""
        self._call(self._drop())

    # ------------------------------------------------------------------------ internals

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start_server(self) -> None:
        if self._open is None:
            self._open = asyncio.Event()
            self._open.set()
        sock = _reuse_port_socket(reuse_address=True)
        sock.bind((LOOPBACK, self.port))
        self.port = sock.getsockname()[1]
        if self._placeholder is None:
            # Without SO_REUSEADDR: a server that sets only that (the usual) cannot share it.
            self._placeholder = _reuse_port_socket(reuse_address=False)
            self._placeholder.bind((LOOPBACK, self.port))
        self._server = await asyncio.start_server(self._handle, sock=sock)

    async def _pause(self, refuse: bool) -> None:
        assert self._open is not None
        self._open.clear()
        if refuse and not self._refusing:
            self._refusing = True
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None

    async def _resume(self) -> None:
        assert self._open is not None
        if self._refusing:
            self._refusing = False
            await self._start_server()  # same port again (the placeholder kept it)
        self._open.set()

    async def _drop(self) -> None:
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await self._drop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._open is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections_total += 1
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()
            if self.connect_delay > 0:
                await asyncio.sleep(self.connect_delay)
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return
            self._writers.add(upstream_writer)
            to_upstream = asyncio.ensure_future(self._pipe(reader, upstream_writer, slow=True))
            to_client = asyncio.ensure_future(self._pipe(upstream_reader, writer, slow=False))
            try:
                done, _ = await asyncio.wait(
                    {to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED
                )
                if to_upstream in done and not to_client.done():
                    # The client half-closed: pass the EOF on and let the answer come back.
                    with contextlib.suppress(OSError):
                        upstream_writer.write_eof()
                    await to_client
            finally:
                to_upstream.cancel()
                to_client.cancel()
                await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            for w in (writer, upstream_writer):
                if w is None:
                    continue
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, slow: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                wait = self.delay if slow else self.response_delay
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
