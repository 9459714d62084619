"""Leadership on a real PostgreSQL: one leader among all sessions; a lost leader is replaced.

Each :class:`Leadership` stands for one process (its own lock connection). Losing the lock
is made real: the server ends the leader's session (``pg_terminate_backend``), as it does
when a dead machine's keepalives run out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import psycopg
import pytest

from nodeprov.leadership import (
    KEEPALIVE,
    Leadership,
    PostgresSession,
    SoloSession,
    advisory_key,
    lock_conninfo,
)
from tests.support.waiting import until

FAST = {"retry_seconds": 0.05, "check_seconds": 0.05, "grace": 5.0}


@dataclass
class Worker:
    """One contender: its leadership and what its leader-only duties saw."""

    leadership: Leadership
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    terms_started: int = 0
    terms_ended: int = 0
    task: asyncio.Task[None] | None = None

    async def duties(self, resign: asyncio.Event) -> None:
        self.terms_started += 1
        try:
            await resign.wait()
        finally:
            self.terms_ended += 1

    def start(self) -> None:
        self.task = asyncio.create_task(self.leadership.run(self.stop, self.duties))

    async def halt(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task

    @property
    def session(self) -> PostgresSession:
        session = self.leadership.session
        assert isinstance(session, PostgresSession)
        return session


@contextlib.asynccontextmanager
async def workers(url: str, n: int, key: int) -> AsyncIterator[list[Worker]]:
    crew = [Worker(Leadership(PostgresSession(url, key), **FAST)) for _ in range(n)]
    for w in crew:
        w.start()
    try:
        yield crew
    finally:
        for w in crew:
            await w.halt()


def leaders(crew: list[Worker]) -> list[Worker]:
    return [w for w in crew if w.leadership.leading]


async def settled(crew: list[Worker]) -> Worker:
    """Wait until one worker leads and every other one has tried and stands by."""

    def one() -> Worker | None:
        lead = leaders(crew)
        rest = [w for w in crew if w not in lead]
        if len(lead) == 1 and all(w.leadership._said == "standby" for w in rest):
            return lead[0]
        return None

    return await until(one, what="one leader and the others standing by")


async def terminate(url: str, pid: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def test_of_two_sessions_on_one_database_exactly_one_leads(postgres_url: str) -> None:
    async with workers(postgres_url, 2, advisory_key("test/one-of-two")) as crew:
        leader = await settled(crew)
        standby = next(w for w in crew if w is not leader)
        # A third session (another process) cannot take the lock either.
        outsider = PostgresSession(postgres_url, advisory_key("test/one-of-two"))
        try:
            assert await outsider.acquire() is False
        finally:
            await outsider.close()
        assert leaders(crew) == [leader]
        assert (leader.terms_started, leader.terms_ended) == (1, 0)
        assert standby.terms_started == 0


async def test_when_the_leaders_session_is_killed_the_other_leads_and_the_old_steps_down(
    postgres_url: str,
) -> None:
    async with workers(postgres_url, 2, advisory_key("test/failover")) as crew:
        first = await settled(crew)
        second = next(w for w in crew if w is not first)
        assert first.session.backend_pid is not None
        await terminate(postgres_url, first.session.backend_pid)
        # The old leader notices on its next check and stops its duties; the standby takes over.
        await until(lambda: first.terms_ended == 1, what="the old leader stepped down")
        await until(lambda: second.leadership.leading, what="the standby took over")
        assert await settled(crew) is second
        assert second.terms_started == 1
        assert first.terms_started == 1  # it stands by now; it did not lead again
    assert [w.terms_started == w.terms_ended for w in crew] == [True, True]


async def test_a_leader_that_stops_frees_the_lock_for_the_next(postgres_url: str) -> None:
    key = advisory_key("test/handover")
    async with workers(postgres_url, 3, key) as crew:
        first = await settled(crew)
        await first.halt()
        rest = [w for w in crew if w is not first]
        second = await settled(rest)
        assert first.terms_ended == 1 and not first.leadership.leading
        assert second.terms_started == 1


async def test_a_standby_keeps_trying_while_the_database_is_unreachable(
    postgres_url: str,
) -> None:
    # Nothing listens on port 1: the contender stands by, then leads once the URL works.
    down = Worker(Leadership(PostgresSession("postgresql://postgres@127.0.0.1:1/x"), **FAST))
    down.start()
    try:
        await until(lambda: down.leadership._said == "standby", what="standing by")
        assert down.terms_started == 0
    finally:
        await down.halt()


async def test_a_crash_in_the_leaders_duties_ends_the_run_with_it(postgres_url: str) -> None:
    async def crash(resign: asyncio.Event) -> None:
        raise RuntimeError("duty failed")

    leadership = Leadership(PostgresSession(postgres_url, advisory_key("test/crash")), **FAST)
    with pytest.raises(RuntimeError, match="duty failed"):
        await leadership.run(asyncio.Event(), crash)
    assert not leadership.leading


async def test_the_sqlite_ledgers_one_process_leads_at_once() -> None:
    w = Worker(Leadership(SoloSession(), **FAST))
    w.start()
    try:
        await until(lambda: w.terms_started == 1, what="solo leader")
        assert w.leadership.leading and w.leadership.terms == 1
    finally:
        await w.halt()
    assert w.terms_ended == 1


def test_the_lock_key_is_a_fixed_signed_64_bit_number() -> None:
    assert advisory_key() == advisory_key("nodeprov/leader/v1")
    assert -(2**63) <= advisory_key() < 2**63
    assert advisory_key("a") != advisory_key("b")


def test_the_lock_connection_asks_both_ends_for_fast_keepalives() -> None:
    params = lock_conninfo("postgresql://u@db:5433/books?options=-c%20search_path%3Dx")
    assert params["host"] == "db" and params["port"] == "5433" and params["dbname"] == "books"
    assert params["keepalives"] == 1 and params["keepalives_idle"] == KEEPALIVE.idle
    # The URL's own options are kept; the server's keepalives are added.
    assert params["options"].startswith("-c search_path=x ")
    assert f"-c tcp_keepalives_idle={KEEPALIVE.idle}" in params["options"]
    assert f"tcp_keepalives_count={KEEPALIVE.count}" in params["options"]


async def test_the_server_applies_the_keepalive_settings_to_the_lock_session(
    postgres_url: str,
) -> None:
    session = PostgresSession(postgres_url, advisory_key("test/keepalive"))
    try:
        assert await session.acquire()
        cur = await session.conn.execute(
            "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_count')"
        )
        assert await cur.fetchone() == (str(KEEPALIVE.idle), str(KEEPALIVE.count))
    finally:
        await session.close()


async def test_a_process_is_alone_only_while_no_other_is_present_and_none_joins_meanwhile(
    postgres_url: str,
) -> None:
    first = PostgresSession(postgres_url, advisory_key("test/alone"))
    second = PostgresSession(postgres_url, advisory_key("test/alone"))
    try:
        # The first process on the database: alone (it recovers everything), then present.
        assert await first.try_alone()
        # A second process that starts meanwhile waits to join until the first lets go.
        joining = asyncio.create_task(second.join())
        await asyncio.sleep(0.2)  # let its request reach the server
        assert not joining.done()
        await first.release_alone()
        await joining
        # Both present: neither is alone (each one's live operations are its own).
        assert not await first.try_alone() and not await second.try_alone()
        await second.close()  # its server process ends (and frees its locks) a moment later
        await until(first.try_alone, what="alone again once the other left")
        await first.release_alone()
    finally:
        await first.close()
        await second.close()
