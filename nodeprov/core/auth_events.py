"""Signed auth events used once (NIP-98): the first use of a signed event wins, in the ledger.

The event's signature is recorded under a unique key, so two workers or two machines sharing
the books cannot both accept one header: the second insert finds the row and the request is
refused as a replay. The signature, not the event id, is the key: the id hashes only what
the event says, so one client asking the same thing twice in one second (a balance polled
twice) signs two events with one id, while BIP-340 signatures carry fresh randomness and
cannot be altered into another valid one without the key; a captured header repeats its
signature and is refused. Rows are kept :data:`KEEP_SECONDS` past the event's ``created_at``
(its time window plus room for clocks that disagree between machines), then the sweeper
prunes them.
"""

from __future__ import annotations

from nodeprov.core.db import Database, SyncConn

# The NIP-98 window is 60 s either side; an event this old is refused by its time check on
# any machine whose clock is within 9 minutes of the pruner's.
KEEP_SECONDS = 600


async def first_use(
    db: Database, sig: str, event_id: str, pubkey: str, created_at: int, at: int
) -> bool:
    """Record the event signed ``sig`` as used at ``at``; False if it was before (a replay)."""
    async with db.write() as conn:
        cursor = await conn.execute(
            "INSERT INTO auth_events (sig, event_id, pubkey, created_at, used_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (sig, event_id, pubkey, created_at, at),
        )
        return bool(cursor.rowcount == 1)


def prune(raw: SyncConn, at: int) -> int:
    """Forget events made more than :data:`KEEP_SECONDS` before ``at``; how many."""
    cursor = raw.execute("DELETE FROM auth_events WHERE created_at < ?", (at - KEEP_SECONDS,))
    return int(cursor.rowcount)
