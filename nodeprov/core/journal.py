"""The wallet's write-ahead journal and proof store (SQL only, inside ledger transactions).

A wallet operation is written as ``pending`` with everything needed to finish or undo it
(incoming proofs, our blinded outputs with their secrets and blinding factors, the
account involved) *before* the mint is asked to do anything. Its outcome is written in
the same transaction that moves the balances, so the books and the proofs never
disagree. Start-up recovery reads the pending rows back (see ``wallet.Wallet.recover``).

Proof states: ``unspent`` (ours, in the pool), ``reserved`` (inputs of a pending swap or
melt), ``sent`` (given to a user in a token), ``spent`` (swapped or melted away).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from nodeprov.core.db import Conn, Database, fetchone
from nodeprov.core.ledger import now
from nodeprov.errors import ProofsBusy
from nodeprov.protocol.cashu_token import Proof

T = TypeVar("T")

# The error of an op that recovery marked failed because the mint refused to settle it
# (a 4xx: a quote it no longer knows, a keyset it dropped) starts with this.
RECOVERY_FAILED = "recovery: "


@dataclass(frozen=True)
class BlindedOutput:
    """An output we asked the mint to sign; ``r`` and ``secret`` unblind its signature."""

    amount: int
    keyset_id: str
    secret: str
    r: str
    B_: str
    role: str  # "keep", "send" or "change"

    def to_wire(self) -> dict[str, Any]:
        return {"amount": self.amount, "id": self.keyset_id, "B_": self.B_}


@dataclass(frozen=True)
class Op:
    id: int
    kind: str
    state: str
    mint_url: str
    unit: str
    account_id: str | None
    amount: int
    debit_msat: int
    fee: int
    fingerprint: str | None
    token: str | None
    inputs: tuple[Proof, ...]
    outputs: tuple[BlindedOutput, ...]
    quote: str | None
    ref: str | None


def _op(row: Any) -> Op:
    return Op(
        id=row["id"],
        kind=row["kind"],
        state=row["state"],
        mint_url=row["mint_url"],
        unit=row["unit"],
        account_id=row["account_id"],
        amount=row["amount"],
        debit_msat=row["debit_msat"],
        fee=row["fee"],
        fingerprint=row["fingerprint"],
        token=row["token"],
        inputs=tuple(Proof.from_wire(p) for p in json.loads(row["inputs"] or "[]")),
        outputs=tuple(BlindedOutput(**o) for o in json.loads(row["outputs"] or "[]")),
        quote=row["quote"],
        ref=row["ref"],
    )


async def insert_op(
    conn: Conn,
    *,
    kind: str,
    mint_url: str,
    unit: str,
    account_id: str | None,
    amount: int,
    inputs: tuple[Proof, ...] | list[Proof],
    outputs: tuple[BlindedOutput, ...] | list[BlindedOutput],
    state: str = "pending",
    debit_msat: int = 0,
    fee: int = 0,
    fingerprint: str | None = None,
    token: str | None = None,
    quote: str | None = None,
    ref: str | None = None,
) -> int:
    t = now()
    cursor = await conn.execute(
        "INSERT INTO wallet_ops (kind, state, mint_url, unit, account_id, amount, debit_msat, "
        "fee, fingerprint, token, inputs, outputs, quote, ref, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (
            kind,
            state,
            mint_url,
            unit,
            account_id,
            amount,
            debit_msat,
            fee,
            fingerprint,
            token,
            json.dumps([p.to_wire() for p in inputs]),
            json.dumps([o.__dict__ for o in outputs]),
            quote,
            ref,
            t,
            t,
        ),
    )
    (op_id,) = await cursor.fetchone()
    return int(op_id)


async def set_op_state(
    conn: Conn,
    op_id: int,
    state: str,
    *,
    token: str | None = None,
    error: str | None = None,
    quote: str | None = None,
) -> None:
    await conn.execute(
        "UPDATE wallet_ops SET state = ?, token = COALESCE(?, token), error = COALESCE(?, error), "
        "quote = COALESCE(?, quote), updated_at = ? WHERE id = ?",
        (state, token, error, quote, now(), op_id),
    )


async def get_op(conn: Conn, op_id: int) -> Op:
    """The op, locked until the transaction ends: its state decides what the caller writes.

    Two processes may finish one op at once (a live request and recovery elsewhere); the
    second waits here and then reads the first's outcome, so it is applied once.
    """
    row = await fetchone(conn, "SELECT * FROM wallet_ops WHERE id = ? FOR UPDATE", (op_id,))
    if row is None:
        raise KeyError(op_id)
    return _op(row)


def ops_from_rows(rows: list[Any]) -> list[Op]:
    return [_op(r) for r in rows]


async def store_proofs(
    conn: Conn,
    mint_url: str,
    unit: str,
    proofs: list[Proof],
    state: str,
    op_id: int,
) -> None:
    """Insert proofs we now own (or just gave away, state ``sent``); idempotent by secret."""
    t = now()
    await conn.executemany(
        "INSERT INTO proofs (secret, mint_url, unit, keyset_id, amount, C, dleq, state, op_id, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (secret) DO UPDATE SET state = excluded.state, op_id = excluded.op_id",
        [
            (
                p.secret,
                mint_url,
                unit,
                p.keyset_id,
                p.amount,
                p.C,
                json.dumps(p.dleq.to_wire()) if p.dleq else None,
                state,
                op_id,
                t,
            )
            for p in proofs
        ],
    )


async def set_proof_state(
    conn: Conn, secrets: list[str], state: str, op_id: int | None = None
) -> None:
    await conn.executemany(
        "UPDATE proofs SET state = ?, op_id = COALESCE(?, op_id) WHERE secret = ?",
        [(state, op_id, s) for s in secrets],
    )


async def pool_counts(conn: Conn, mint_url: str, unit: str) -> dict[int, int]:
    """How many unspent proofs of each denomination the pool holds."""
    cursor = await conn.execute(
        "SELECT amount, COUNT(*) FROM proofs WHERE mint_url = ? AND unit = ? AND state = 'unspent' "
        "GROUP BY amount",
        (mint_url, unit),
    )
    return {row[0]: row[1] for row in await cursor.fetchall()}


async def take_proofs(conn: Conn, mint_url: str, unit: str, amounts: dict[int, int]) -> list[Proof]:
    """Lock ``count`` unspent proofs of each denomination (the caller changes their state).

    Several writers (workers, machines) take from one pool: rows another transaction has
    locked are skipped, and if that leaves too few, :class:`ProofsBusy` rolls this one back
    so the caller can choose again (:func:`retry_busy`). One writer never sees it.
    """
    taken: list[Proof] = []
    for amount, count in amounts.items():
        cursor = await conn.execute(
            "SELECT keyset_id, secret, C, dleq FROM proofs WHERE mint_url = ? AND unit = ? "
            "AND state = 'unspent' AND amount = ? LIMIT ? FOR UPDATE SKIP LOCKED",
            (mint_url, unit, amount, count),
        )
        rows = list(await cursor.fetchall())
        if len(rows) < count:
            raise ProofsBusy("the node's proofs are in use by other payments; try again")
        for row in rows:
            dleq = json.loads(row["dleq"]) if row["dleq"] else None
            taken.append(
                Proof.from_wire(
                    {
                        "amount": amount,
                        "id": row["keyset_id"],
                        "secret": row["secret"],
                        "C": row["C"],
                        **({"dleq": dleq} if dleq else {}),
                    }
                )
            )
    return taken


async def retry_busy(attempt: Callable[[], Awaitable[T]], tries: int = 8) -> T:
    """Run ``attempt`` (a whole pool transaction) again while others hold its proofs."""
    for n in range(tries - 1):
        try:
            return await attempt()
        except ProofsBusy:
            await asyncio.sleep(random.uniform(0, 0.002 * 2**n))  # let the other one commit
    return await attempt()


async def recovery_failures(db: Database, limit: int = 20) -> tuple[int, list[dict[str, Any]]]:
    """How many ops recovery gave up on because the mint refused them, and the newest ones.

    For ``nodeprov status`` and the admin page: each needs an operator's look (the op row
    keeps its inputs and outputs, so what the mint did can still be restored by hand).
    """
    pattern = RECOVERY_FAILED + "%"
    count = await db.fetchone(
        "SELECT COUNT(*) FROM wallet_ops WHERE state = 'failed' AND error LIKE ?", (pattern,)
    )
    rows = await db.fetchall(
        "SELECT id, kind, mint_url, unit, amount, quote, error, updated_at FROM wallet_ops "
        "WHERE state = 'failed' AND error LIKE ? ORDER BY id DESC LIMIT ?",
        (pattern, limit),
    )
    return (int(count[0]) if count else 0), [dict(r) for r in rows]


async def op_by_ref(db: Database, kind: str, ref: str, account_id: str | None = None) -> Op | None:
    """The op of ``kind`` carrying ``ref`` (of ``account_id``, if given), a finished one first.

    Money moves keyed by a reference (``dm:<event id>``) look here for an earlier outcome
    before moving anything again.
    """
    row = await db.fetchone(
        "SELECT * FROM wallet_ops WHERE kind = ? AND ref = ? AND (? IS NULL OR account_id = ?)"
        " ORDER BY state = 'done' DESC, state = 'pending' DESC, id DESC LIMIT 1",
        (kind, ref, account_id, account_id),
    )
    return _op(row) if row is not None else None


async def sent_tokens(db: Database, account_id: str) -> list[str]:
    """Tokens handed out to ``account_id`` (its change tokens, for a per-request account)."""
    rows = await db.fetchall(
        "SELECT token FROM wallet_ops WHERE account_id = ? AND kind = 'send' AND state = 'done'"
        " ORDER BY id",
        (account_id,),
    )
    return [str(r[0]) for r in rows]


# --- proofs taken in: what the node knows is spent (before any mint call) ------------------


async def mark_taken(conn: Conn, ids: Sequence[str], *, taken: bool) -> None:
    """Record (``taken=False``: forget) proof ids a receive handed to the mint.

    Kept in ``processed`` (kind ``proof``) next to the token fingerprints, so a token reusing
    any of these proofs, however it is packed, is known as spent without asking the mint.
    """
    if taken:
        at = now()
        await conn.executemany(
            "INSERT INTO processed (kind, id, at) VALUES ('proof', ?, ?) ON CONFLICT DO NOTHING",
            [(i, at) for i in ids],
        )
    else:
        await conn.executemany(
            "DELETE FROM processed WHERE kind = 'proof' AND id = ?", [(i,) for i in ids]
        )


async def seen_before(db: Database, fingerprint: str, ids: Sequence[str]) -> bool:
    """Whether a receive already took this token (its fingerprint) or any of its proofs."""
    marks = ", ".join("?" * len(ids))
    row = await db.fetchone(
        "SELECT 1 FROM processed WHERE (kind = 'token' AND id = ?)"
        f" OR (kind = 'proof' AND id IN ({marks})) LIMIT 1",
        (fingerprint, *ids),
    )
    return row is not None
