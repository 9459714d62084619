"""Leadership: exactly one process among all that share one ledger database leads.

The leader runs the duties that must not run twice at once (the Nostr listener and
announcer, payouts, expiry refunds, funding polls, the hold sweeper, wallet recovery).
With the ledger on PostgreSQL, leading means holding a session-level advisory lock on a
dedicated autocommit connection: the server frees it the moment that session ends, so a
leader that dies (kill -9: the kernel closes its socket) is replaced within one retry
interval. A machine that vanishes without closing its socket is noticed by TCP
keepalives on both ends, asked for here, within about ``idle + interval * count``
seconds instead of the kernel's two hours. With the ledger on SQLite one process owns
the data dir (``core.datadir``) and it simply leads.

The loop itself (:meth:`Leadership.run`) is independent of the lock's kind: a
:class:`LockSession` says whether it got the lock and whether it still holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from nodeprov.core import db_postgres

log = logging.getLogger(__name__)

LOCK_NAME = "nodeprov/leader/v1"
RETRY_SECONDS = 1.0
CHECK_SECONDS = 1.0
# A leader whose check query gets no answer this long steps down. It must be well under
# what the server's keepalives take to drop the session (KEEPALIVE below: about 10 s), so
# that a leader cut off from the database has stopped before another can take the lock.
CHECK_TIMEOUT_SECONDS = 3.0
CONNECT_TIMEOUT_SECONDS = 5
PRESENCE_NAME = "nodeprov/present/v1"
LOCK_APPLICATION = "nodeprov-leader"
STEP_DOWN_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive timing for the lock's connection (both the client's and the server's)."""

    idle: int = 4
    interval: int = 2
    count: int = 3

    def client_params(self) -> dict[str, Any]:
        """libpq connection parameters: this side notices a vanished server."""
        return {
            "keepalives": 1,
            "keepalives_idle": self.idle,
            "keepalives_interval": self.interval,
            "keepalives_count": self.count,
            # Unacknowledged writes also give up after the same time.
            "tcp_user_timeout": self.seconds * 1000,
        }

    def server_options(self) -> str:
        """``-c`` settings for the server's side of this session: it frees the lock of a
        client that vanished (a dead machine) in seconds."""
        return (
            f"-c tcp_keepalives_idle={self.idle} -c tcp_keepalives_interval={self.interval}"
            f" -c tcp_keepalives_count={self.count} -c tcp_user_timeout={self.seconds * 1000}"
        )

    @property
    def seconds(self) -> int:
        return self.idle + self.interval * self.count


KEEPALIVE = Keepalive()


def advisory_key(name: str = LOCK_NAME) -> int:
    """A fixed signed 64-bit advisory-lock key derived from ``name`` (stable across runs)."""
    return db_postgres.advisory_key(name)


def lock_conninfo(url: str, keepalive: Keepalive = KEEPALIVE) -> dict[str, Any]:
    """Connection parameters for the lock's session: ``url`` plus keepalives, with any
    ``options`` the URL already carries kept."""
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] = dict(conninfo_to_dict(url))
    params.update(keepalive.client_params())
    given = str(params.get("options") or "").strip()
    params["options"] = f"{given} {keepalive.server_options()}".strip()
    params.setdefault("connect_timeout", CONNECT_TIMEOUT_SECONDS)
    params["application_name"] = LOCK_APPLICATION
    return params


class LockSession(Protocol):
    """One process's place among those sharing the database: present, and maybe leading.

    Presence is a second advisory lock: every process that serves holds it shared; one
    that takes it exclusively knows no other process is serving (so no other has live
    wallet operations), and none can start serving until it lets go.
    """

    async def join(self) -> None:
        """Be present (shared): before serving. Waits while a process holds it alone."""

    async def try_alone(self) -> bool:
        """Hold presence exclusively if no other process is present (then call
        :meth:`release_alone`); False at once otherwise."""

    async def release_alone(self) -> None:
        """Back from alone to present (shared)."""

    async def acquire(self) -> bool:
        """Try to take the lock without waiting; True if this session now holds it."""

    async def alive(self) -> bool:
        """Whether the session (and so the lock) is still held; False when in doubt."""

    async def close(self) -> None:
        """End the session (the lock, if held, is freed)."""


class SoloSession:
    """The SQLite ledger's lock: the data dir's owner is the only process, so it leads."""

    async def join(self) -> None:
        return None

    async def try_alone(self) -> bool:
        return True

    async def release_alone(self) -> None:
        return None

    async def acquire(self) -> bool:
        return True

    async def alive(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class PostgresSession:
    """Session-level advisory locks (presence, leadership) on one autocommit connection."""

    def __init__(self, url: str, key: int | None = None, keepalive: Keepalive = KEEPALIVE) -> None:
        self.url, self.key, self.keepalive = url, advisory_key() if key is None else key, keepalive
        # Presence is per lock key, so that tests with their own key are their own "node".
        self.presence = advisory_key(f"{PRESENCE_NAME}/{self.key}")
        self.conn: Any = None  # psycopg.AsyncConnection once connected
        self.backend_pid: int | None = None
        self._present = False

    async def _connect(self) -> None:
        if self.conn is None:
            self._present = False
            self.conn = await psycopg.AsyncConnection.connect(
                **lock_conninfo(self.url, self.keepalive), autocommit=True
            )

    async def _one(self, query: str, *args: object) -> Any:
        cur = await self.conn.execute(query, args)
        row = await cur.fetchone()
        return row[0] if row else None

    async def join(self) -> None:
        await self._connect()
        if not self._present:
            await self._one("SELECT pg_advisory_lock_shared(%s)", self.presence)
            self._present = True

    async def try_alone(self) -> bool:
        await self._connect()
        return bool(await self._one("SELECT pg_try_advisory_lock(%s)", self.presence))

    async def release_alone(self) -> None:
        await self.join()  # shared first: presence is never dropped in between
        await self._one("SELECT pg_advisory_unlock(%s)", self.presence)

    async def acquire(self) -> bool:
        await self.join()  # after a reconnect, present again before leading
        got = bool(await self._one("SELECT pg_try_advisory_lock(%s)", self.key))
        self.backend_pid = int(await self._one("SELECT pg_backend_pid()")) if got else None
        return got

    async def alive(self) -> bool:
        if self.conn is None or self.conn.closed:
            return False
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await self.conn.execute("SELECT 1")
        except Exception:
            return False
        return True

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        self._present = False
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                    await conn.close()


Lead = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class Leadership:
    """Take the lock, run ``lead`` while it is held, step down when it is lost; repeat.

    ``lead(resign)`` runs the leader-only duties until ``resign`` is set. When the lock is
    lost (or ``stop`` is set) ``resign`` is set, ``lead`` gets ``grace`` seconds to end,
    then it is cancelled. An exception from ``lead`` ends :meth:`run` with it (the daemon
    treats a crashed duty as fatal, as it does any service).
    """

    def __init__(
        self,
        session: LockSession,
        *,
        retry_seconds: float = RETRY_SECONDS,
        check_seconds: float = CHECK_SECONDS,
        grace: float = STEP_DOWN_GRACE_SECONDS,
    ) -> None:
        self.session = session
        self.retry_seconds, self.check_seconds, self.grace = retry_seconds, check_seconds, grace
        self.leading = False
        self.terms = 0  # how many times this process became leader
        self._said: str | None = None
        self._unreachable = False
        self.changed = asyncio.Event()  # set and replaced on every transition (tests wait)

    def _become(self, role: str) -> None:
        """Record (and log once per transition) whether this process leads."""
        self.leading = role == "leader"
        if role == self._said:
            return
        self._said = role
        if self.leading:
            self.terms += 1
            log.info("leader: pid %d runs the leader-only services", os.getpid())
        else:
            log.info("standby: another process leads; trying every %.1f s", self.retry_seconds)
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def _acquire(self) -> bool:
        try:
            got = await self.session.acquire()
        except Exception as exc:
            await self.session.close()  # reconnect on the next try
            if not self._unreachable:
                log.warning("leadership: cannot reach the database: %s", exc)
            self._unreachable = True
            return False
        self._unreachable = False
        return got

    async def run(self, stop: asyncio.Event, lead: Lead) -> None:
        """Compete for leadership until ``stop``; lead whenever this process holds the lock."""
        try:
            while not stop.is_set():
                if await self._acquire():
                    try:
                        await self._lead(stop, lead)
                    finally:
                        await self.session.close()  # the lock goes with its connection
                    if stop.is_set():
                        break
                self._become("standby")
                await _wait(stop, self.retry_seconds)
        finally:
            self.leading = False
            await self.session.close()

    async def _lead(self, stop: asyncio.Event, lead: Lead) -> None:
        self._become("leader")
        resign = asyncio.Event()
        duties = asyncio.create_task(lead(resign), name="leader-services")
        try:
            while True:
                sleeper = asyncio.ensure_future(_wait(stop, self.check_seconds))
                try:
                    await asyncio.wait({duties, sleeper}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                if stop.is_set() or duties.done():
                    break
                if not await self.session.alive():
                    log.warning("leadership lost (the lock's connection failed); stepping down")
                    break
        finally:
            resign.set()
            self.leading = False
            if not duties.done():
                done, _ = await asyncio.wait({duties}, timeout=self.grace)
                if not done:
                    log.warning("leader-only services did not stop in time; cancelling them")
                    duties.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await duties  # re-raises a duty's crash


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stop``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
