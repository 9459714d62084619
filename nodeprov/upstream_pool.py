"""The connection pool of one upstream origin: keep-alive reuse, a cap, a bounded wait.

Idle connections are a stack (the most recently used first, so the others age out); one
that closed while idle leaves the pool the moment its loop sees the close. At most
``max_connections`` are open or opening; a request beyond that waits in line (first come,
first served) for a connection or a free slot, at most ``wait`` seconds, then gets
:class:`~nodeprov.upstream_wire.PoolTimeout`. Idle connections older than
``keepalive_expiry`` are closed by one timer per pool, never one per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from nodeprov.upstream_wire import PoolTimeout


class PooledConnection(Protocol):
    """What the pool needs of a connection."""

    closed: bool
    reused: bool
    idle: bool
    idle_since: float
    on_lost: Any

    def abort(self) -> None: ...

    def peer_closed(self) -> bool: ...


_SLOT = None  # handed to a waiter: "open a connection of your own"
_TIMED_OUT = False


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_TIMED_OUT)


C = TypeVar("C", bound=PooledConnection)


class Pool(Generic[C]):
    """Connections to one origin, opened with ``connect`` (see the module docstring)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[C]],
        *,
        max_connections: int,
        keepalive_expiry: float,
        wait: float,
        peek_after: float,
    ) -> None:
        self._connect = connect
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self.wait = wait
        self.peek_after = peek_after
        self.opened = 0  # open or opening connections (each holds a slot)
        self._idle: list[C] = []
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Acquirers waiting in line."""
        return sum(not waiter.done() for waiter in self._waiters)

    async def acquire(self, *, fresh: bool = False) -> C:
        """A connection: an idle one (unless ``fresh``), a new one, or one after waiting."""
        if self._closed:
            raise PoolTimeout("the client is closed")
        if not fresh:
            conn = self._take_idle()
            if conn is not None:
                return conn
        if self.opened < self.max_connections:
            self.opened += 1
            return await self._open()
        return await self._wait_turn()

    def release(self, conn: C, reusable: bool) -> None:
        """Take ``conn`` back: kept for reuse (or handed to a waiter) if ``reusable``."""
        if not reusable or conn.closed or self._closed:
            conn.abort()
            self._free_slot()
            return
        conn.reused = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle = True
        conn.idle_since = asyncio.get_running_loop().time()
        conn.on_lost = self._lost
        self._idle.append(conn)
        if self._timer is None:
            self._schedule(self.keepalive_expiry)

    def close(self) -> None:
        """Close the idle connections; later acquires fail, busy ones close on release."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.idle = False
            conn.abort()
            self.opened -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(_TIMED_OUT)

    # --- inside -----------------------------------------------------------------

    def _take_idle(self) -> C | None:
        idle = self._idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            conn.idle = False
            idle_for = now - conn.idle_since
            if (
                conn.closed
                or idle_for > self.keepalive_expiry
                or (idle_for > self.peek_after and conn.peer_closed())
            ):
                conn.abort()
                self.opened -= 1
                continue
            return conn
        return None

    async def _open(self) -> C:
        """A new connection in the slot the caller holds (freed if connecting fails)."""
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    def _free_slot(self) -> None:
        """A connection is gone: its slot goes to the first waiter, or back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(_SLOT)
                return
        self.opened -= 1

    async def _wait_turn(self) -> C:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters.append(waiter)
        handle = loop.call_later(self.wait, _expire, waiter)
        try:
            got = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back(waiter.result())
            raise
        finally:
            handle.cancel()
        if got is _TIMED_OUT:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise PoolTimeout(
                f"all {self.max_connections} connections stayed busy for {self.wait:g} s"
            )
        if got is _SLOT:
            return await self._open()
        conn: C = got
        return conn

    def _give_back(self, got: Any) -> None:
        """What a cancelled waiter was handed goes to the next one."""
        if got is _SLOT:
            self._free_slot()
        elif got is not _TIMED_OUT:
            self.release(got, True)

    def _lost(self, conn: C) -> None:
        """An idle connection closed (by the peer): it leaves the pool with its slot."""
        if conn.idle:
            conn.idle = False
            self._idle.remove(conn)
            self._free_slot()

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._prune)

    def _prune(self) -> None:
        """Close idle connections past their keep-alive expiry (the oldest are first)."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        idle = self._idle
        while idle and now - idle[0].idle_since >= self.keepalive_expiry:
            conn = idle.pop(0)
            conn.idle = False
            conn.abort()
            self._free_slot()
        if idle:
            self._schedule(self.keepalive_expiry - (now - idle[0].idle_since))
