"""Durable DM job state in the ledger DB: each incoming event once, replies kept until sent.

A job row goes ``accepted`` (before any work) -> ``done`` (replies stored, before publishing)
-> ``sent``. After a restart, ``done`` rows are re-published and ``accepted`` ones resumed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from nodeprov.core.db import Database

Nip = Literal["nip17", "nip04"]
State = Literal["accepted", "done", "sent"]


@dataclass(frozen=True)
class JobRow:
    """One incoming DM event and how far its handling got."""

    event_id: str
    sender: str
    nip: Nip
    state: State
    replies: tuple[str, ...]
    reply_to: str | None
    created_at: int


def _now() -> int:
    return int(time.time())


def _row(r: object) -> JobRow:
    row = r  # Any
    replies = json.loads(row["replies"]) if row["replies"] else []  # type: ignore[index]
    return JobRow(
        row["event_id"],  # type: ignore[index]
        row["sender"],  # type: ignore[index]
        row["nip"],  # type: ignore[index]
        row["state"],  # type: ignore[index]
        tuple(replies),
        row["reply_to"],  # type: ignore[index]
        row["created_at"],  # type: ignore[index]
    )


class DmStore:
    """The listener's tables (created by ``0100_nostr_dm_jobs`` in :mod:`nodeprov.core.schema`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def accept(self, event_id: str, sender: str, nip: Nip, reply_to: str) -> JobRow | None:
        """Record a new event as accepted; None if new, else the existing row (seen before)."""
        async with self.db.write() as conn:
            cur = await conn.execute(
                "INSERT INTO nostr_dm_jobs (event_id, sender, nip, state, reply_to, created_at,"
                " updated_at) VALUES (?, ?, ?, 'accepted', ?, ?, ?) ON CONFLICT DO NOTHING",
                (event_id, sender, nip, reply_to, _now(), _now()),
            )
            if cur.rowcount == 1:
                return None
        return await self.get(event_id)

    async def get(self, event_id: str) -> JobRow | None:
        row = await self.db.fetchone("SELECT * FROM nostr_dm_jobs WHERE event_id = ?", (event_id,))
        return _row(row) if row is not None else None

    async def done(self, event_id: str, replies: list[str]) -> None:
        """Store the replies (before they are published)."""
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE nostr_dm_jobs SET state = 'done', replies = ?, updated_at = ?"
                " WHERE event_id = ?",
                (json.dumps(replies, ensure_ascii=False), _now(), event_id),
            )

    async def sent(self, event_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE nostr_dm_jobs SET state = 'sent', updated_at = ? WHERE event_id = ?",
                (_now(), event_id),
            )

    async def unsent(self) -> list[JobRow]:
        """Jobs whose replies are stored but not yet published."""
        rows = await self.db.fetchall(
            "SELECT * FROM nostr_dm_jobs WHERE state = 'done' ORDER BY created_at"
        )
        return [_row(r) for r in rows]

    async def prune(self, before: int) -> int:
        """Forget answered events last touched before ``before`` (too old to be replayed)."""
        async with self.db.write() as conn:
            cur = await conn.execute(
                "DELETE FROM nostr_dm_jobs WHERE state = 'sent' AND updated_at < ?", (before,)
            )
            return int(cur.rowcount)

    async def watermark(self) -> int | None:
        row = await self.db.fetchone("SELECT value FROM nostr_state WHERE key = 'dm_since'")
        return int(row[0]) if row is not None else None

    async def set_watermark(self, value: int) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO nostr_state (key, value) VALUES ('dm_since', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (value,),
            )
