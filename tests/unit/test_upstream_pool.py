"""The upstream connection pool's bookkeeping, with stand-in connections (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeprov.upstream_pool import Pool
from nodeprov.upstream_wire import PoolTimeout
from tests.support.waiting import until


class Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.reused = False
        self.idle = False
        self.idle_since = 0.0
        self.on_lost: Any = None
        self.readable = False

    def abort(self) -> None:
        self.closed = True

    def peer_closed(self) -> bool:
        return self.readable

    def lose(self) -> None:
        """The peer closed it (what ``connection_lost`` does)."""
        self.closed = True
        if self.idle and self.on_lost is not None:
            self.on_lost(self)


def pool(
    max_connections: int = 2, wait: float = 60.0, **kw: float
) -> tuple[Pool[Conn], list[Conn]]:
    made: list[Conn] = []

    async def connect() -> Conn:
        made.append(Conn(len(made) + 1))
        return made[-1]

    options = {"keepalive_expiry": 60.0, "peek_after": 60.0, **kw}
    return Pool(connect, max_connections=max_connections, wait=wait, **options), made


async def waiting(p: Pool[Conn], count: int) -> None:
    """Until ``count`` acquirers wait in line (they get there within a few loop turns)."""
    await until(lambda: p.waiting >= count, what=f"{count} waiting")


async def test_released_connections_are_reused_most_recent_first() -> None:
    p, made = pool()
    a, b = await p.acquire(), await p.acquire()
    p.release(a, True)
    p.release(b, True)
    assert await p.acquire() is b
    assert await p.acquire() is a
    assert len(made) == 2 and p.opened == 2


async def test_a_connection_closed_while_idle_leaves_the_pool_with_its_slot() -> None:
    p, _ = pool(max_connections=1)
    a = await p.acquire()
    p.release(a, True)
    a.lose()
    assert p.opened == 0
    assert (await p.acquire()).number == 2


async def test_an_idle_connection_found_readable_is_not_reused() -> None:
    p, _ = pool(peek_after=0.0)
    a = await p.acquire()
    p.release(a, True)
    a.readable = True
    assert (await p.acquire()).number == 2
    assert a.closed and p.opened == 1


async def test_a_waiter_gets_a_released_connection_and_times_out_otherwise() -> None:
    p, _ = pool(max_connections=1, wait=0.01)
    a = await p.acquire()
    with pytest.raises(PoolTimeout, match="all 1 connections stayed busy"):
        await p.acquire()
    assert p.waiting == 0
    p.wait = 60.0
    waiter = asyncio.create_task(p.acquire())
    await waiting(p, 1)
    p.release(a, True)
    assert await waiter is a


async def test_a_broken_connection_hands_its_slot_to_the_waiter() -> None:
    p, _ = pool(max_connections=1)
    a = await p.acquire()
    waiter = asyncio.create_task(p.acquire())
    await waiting(p, 1)
    p.release(a, False)
    assert (await waiter).number == 2
    assert a.closed and p.opened == 1


async def test_a_cancelled_waiter_passes_on_what_it_was_handed() -> None:
    p, _ = pool(max_connections=1)
    a = await p.acquire()
    first = asyncio.create_task(p.acquire())
    second = asyncio.create_task(p.acquire())
    await waiting(p, 2)
    p.release(a, True)  # handed to ``first``...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second is a
    assert p.opened == 1


async def test_close_refuses_new_acquires_and_closes_the_idle() -> None:
    p, _ = pool()
    a, b = await p.acquire(), await p.acquire()
    p.release(a, True)
    p.close()
    assert a.closed and p.opened == 1
    p.release(b, True)  # a busy one is closed when it comes back
    assert b.closed and p.opened == 0
    with pytest.raises(PoolTimeout):
        await p.acquire()
