"""Durable NIP-90 job state in the ledger DB: each request once, its answer kept until sent.

A row goes ``accepted`` (before any work) -> ``awaiting_payment`` (an invoice was offered;
its quote id kept) -> ``done`` (the signed events to publish stored, before publishing)
-> ``sent``. After a restart, ``done`` rows are published again and the others resumed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from nodeprov.core.db import Database

State = Literal["accepted", "awaiting_payment", "done", "sent"]
WATERMARK_KEY = "nip90_since"


@dataclass(frozen=True)
class Nip90Row:
    """One job request and how far its handling got."""

    event_id: str
    customer: str
    request: str  # the request event as JSON
    state: State
    quote_id: str | None
    replies: tuple[dict[str, Any], ...]  # signed events


def _now() -> int:
    return int(time.time())


def _row(row: Any) -> Nip90Row:
    replies = json.loads(row["replies"]) if row["replies"] else []
    return Nip90Row(
        row["event_id"], row["customer"], row["request"], row["state"], row["quote_id"],
        tuple(replies),
    )  # fmt: skip


class Nip90Store:
    """The NIP-90 service's table (``0130_nip90_jobs`` in :mod:`nodeprov.core.schema`)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def accept(self, event_id: str, customer: str, request: str) -> Nip90Row | None:
        """Record a new request; None if new, else the existing row (seen before)."""
        async with self.db.write() as conn:
            cur = await conn.execute(
                "INSERT INTO nostr_nip90_jobs (event_id, customer, request, state, created_at,"
                " updated_at) VALUES (?, ?, ?, 'accepted', ?, ?) ON CONFLICT DO NOTHING",
                (event_id, customer, request, _now(), _now()),
            )
            if cur.rowcount == 1:
                return None
        return await self.get(event_id)

    async def get(self, event_id: str) -> Nip90Row | None:
        row = await self.db.fetchone(
            "SELECT * FROM nostr_nip90_jobs WHERE event_id = ?", (event_id,)
        )
        return _row(row) if row is not None else None

    async def awaiting(self, event_id: str, quote_id: str, offer: list[dict[str, Any]]) -> None:
        """The job waits for the invoice of ``quote_id`` (a mint quote) to be paid; ``offer``
        (the signed ``payment-required`` feedback) is published again when it resumes."""
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE nostr_nip90_jobs SET state = 'awaiting_payment', quote_id = ?,"
                " replies = ?, updated_at = ? WHERE event_id = ? AND state = 'accepted'",
                (quote_id, json.dumps(offer, ensure_ascii=False), _now(), event_id),
            )

    async def done(self, event_id: str, replies: list[dict[str, Any]]) -> None:
        """Store the signed events to publish (before they are published)."""
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE nostr_nip90_jobs SET state = 'done', replies = ?, updated_at = ?"
                " WHERE event_id = ? AND state IN ('accepted', 'awaiting_payment')",
                (json.dumps(replies, ensure_ascii=False), _now(), event_id),
            )

    async def sent(self, event_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE nostr_nip90_jobs SET state = 'sent', updated_at = ? WHERE event_id = ?",
                (_now(), event_id),
            )

    async def unfinished(self) -> list[Nip90Row]:
        """Jobs not yet answered (to resume) or answered but not yet published."""
        rows = await self.db.fetchall(
            "SELECT * FROM nostr_nip90_jobs WHERE state <> 'sent' ORDER BY created_at"
        )
        return [_row(r) for r in rows]

    async def prune(self, before: int) -> int:
        """Forget answered jobs last touched before ``before`` (too old to be replayed)."""
        async with self.db.write() as conn:
            cur = await conn.execute(
                "DELETE FROM nostr_nip90_jobs WHERE state = 'sent' AND updated_at < ?", (before,)
            )
            return int(cur.rowcount)

    async def watermark(self) -> int | None:
        row = await self.db.fetchone(
            "SELECT value FROM nostr_state WHERE key = ?", (WATERMARK_KEY,)
        )
        return int(row[0]) if row is not None else None

    async def set_watermark(self, value: int) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                "INSERT INTO nostr_state (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (WATERMARK_KEY, value),
            )
