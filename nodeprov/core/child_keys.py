"""Child keys: API keys that spend from a parent key's balance, up to a limit of their own.

A child holds no money and has no account: it is a row of ``child_keys`` naming its parent's
account, its key's account id (``key:<sha256>``, as any key is stored: only hashed), a spend
limit in msat (or none), an expiry, a label, and what it has spent and reserves now. Its jobs
go through the one charge lifecycle: :func:`nodeprov.core.holds.hold` reserves on the parent's
balance and on the child's remaining limit in one transaction, and the settle charges the
parent and counts the charge as the child's spending, so concurrent requests by a parent and
its children never overdraw the parent nor pass a child's limit.

A revoked or expired child, or one whose parent is revoked or expired, cannot hold. A child
cannot move money (withdraw, refund, top up) nor make children: the channels refuse it with
:class:`~nodeprov.errors.ChildKeyNotAllowed`. Expiry refunds read accounts only, so they never
pay anything for a child. Only an API key (``key:`` account) may have children: a token used
as a key is the money itself, and is turned into a key with ``/v1/wallet/create`` first.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from nodeprov.core.account_moves import api_key_account, mask_key
from nodeprov.core.ledger import Account, Ledger, log, now
from nodeprov.errors import AccountExpired, ChildKeyNotAllowed, InvalidRequest, Unauthorized
from nodeprov.protocol.child_keys import remaining_msat, spendable_msat

_COLUMNS = (
    "id, key_account, parent_id, label, limit_msat, spent_msat, reserved_msat, created_at, "
    "last_used_at, expires_at, revoked, key_hint"
)


class ChildKeyNotFound(InvalidRequest):
    status = 404
    code = "child_key_not_found"


@dataclass(frozen=True)
class ChildKey:
    """One child key as stored (amounts in msat; the key itself is never stored)."""

    id: str
    key_account: str
    parent_id: str
    label: str | None
    limit_msat: int | None
    spent_msat: int
    reserved_msat: int
    created_at: int
    last_used_at: int | None
    expires_at: int | None
    revoked: bool
    key_hint: str | None

    @property
    def remaining_msat(self) -> int | None:
        """What is left of the limit (running jobs' holds count); None: no limit."""
        return remaining_msat(self.limit_msat, self.spent_msat, self.reserved_msat)

    def expired(self, at: int) -> bool:
        return self.expires_at is not None and self.expires_at <= at

    def view(self, at: int) -> dict[str, Any]:
        """The child as its parent's balance call lists it (Routstr's names where it has them)."""
        return {
            "id": self.id,
            "label": self.label,
            "api_key": self.key_hint,
            "balance_limit": self.limit_msat,
            "balance_limit_reset": None,
            "total_spent": self.spent_msat,
            "reserved": self.reserved_msat,
            "remaining": self.remaining_msat,
            "validity_date": self.expires_at,
            "expired": self.expired(at),
            "revoked": self.revoked,
            "created_at": self.created_at,
            "last_used": self.last_used_at,
        }

    def operator_view(self, at: int) -> dict[str, Any]:
        """The child as the operator sees it: with its parent's account id."""
        return {**self.view(at), "parent_id": self.parent_id}


def _child(row: Any) -> ChildKey:
    return ChildKey(
        id=row["id"],
        key_account=row["key_account"],
        parent_id=row["parent_id"],
        label=row["label"],
        limit_msat=row["limit_msat"],
        spent_msat=int(row["spent_msat"]),
        reserved_msat=int(row["reserved_msat"]),
        created_at=int(row["created_at"]),
        last_used_at=row["last_used_at"],
        expires_at=row["expires_at"],
        revoked=bool(row["revoked"]),
        key_hint=row["key_hint"],
    )


class ChildKeys:
    """Making, finding and revoking child keys over the ledger's database."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.db = ledger.db

    async def create(
        self,
        parent_id: str,
        *,
        limit_msat: int | None = None,
        expires_at: int | None = None,
        label: str | None = None,
    ) -> tuple[str, ChildKey]:
        """One child of ``parent_id``: its key (shown once, stored hashed) and its row."""
        (made,) = await self.create_many(
            parent_id, 1, limit_msat=limit_msat, expires_at=expires_at, label=label
        )
        return made

    async def create_many(
        self,
        parent_id: str,
        count: int,
        *,
        limit_msat: int | None = None,
        expires_at: int | None = None,
        label: str | None = None,
    ) -> list[tuple[str, ChildKey]]:
        """``count`` children of ``parent_id`` in one transaction, each with a new random key."""
        parent = await self.ledger.account(parent_id)
        check_parent(parent, now())
        made: list[tuple[str, str]] = []
        async with self.db.write() as conn:
            for _ in range(count):
                key = "sk-" + secrets.token_urlsafe(32)
                child_id = "ck_" + secrets.token_hex(8)
                await conn.execute(
                    "INSERT INTO child_keys (id, key_account, parent_id, label, limit_msat, "
                    "created_at, expires_at, key_hint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        child_id, api_key_account(key), parent_id, label, limit_msat, now(),
                        expires_at, mask_key(key),
                    ),
                )  # fmt: skip
                # A zero-delta line keeps the child's creation in the parent's history.
                await log(conn, parent_id, "child_key", 0, child_id, "created")
                made.append((key, child_id))
        children = [await self.get(child_id) for _, child_id in made]
        return [(key, c) for (key, _), c in zip(made, children, strict=True) if c is not None]

    async def get(self, child_id: str) -> ChildKey | None:
        row = await self.db.fetchone(f"SELECT {_COLUMNS} FROM child_keys WHERE id = ?", (child_id,))
        return _child(row) if row is not None else None

    async def by_account(self, key_account: str) -> ChildKey | None:
        """The child whose key has the account id ``key_account`` (``key:<sha256>``)."""
        row = await self.db.fetchone(
            f"SELECT {_COLUMNS} FROM child_keys WHERE key_account = ?", (key_account,)
        )
        return _child(row) if row is not None else None

    async def by_key(self, api_key: str) -> ChildKey | None:
        """The child an API key (``sk-…``) is, if it is one."""
        return await self.by_account(api_key_account(api_key))

    async def find(self, text: str) -> ChildKey | None:
        """The child ``text`` names: its id (``ck_…``, or a prefix of it), its key (``sk-…``)
        or the key's masked form (``sk-xNKv…9f2Q``); None if it names none (or several)."""
        text = text.strip().replace("...", "…")
        if text.startswith("sk-") and "…" not in text:
            return await self.by_key(text)
        if "…" in text:
            sql, params = "key_hint = ?", (text,)
        elif text.startswith("ck_") and len(text) > len("ck_"):
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql, params = "id LIKE ? ESCAPE '\\'", (escaped + "%",)
        else:
            return None
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM child_keys WHERE {sql} ORDER BY id LIMIT 2", params
        )
        return _child(rows[0]) if len(rows) == 1 else None

    async def of_parent(self, parent_id: str) -> list[ChildKey]:
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM child_keys WHERE parent_id = ? ORDER BY created_at, id",
            (parent_id,),
        )
        return [_child(row) for row in rows]

    async def all(self, limit: int = 1000) -> list[ChildKey]:
        """Every child key, newest first (the operator's list)."""
        rows = await self.db.fetchall(
            f"SELECT {_COLUMNS} FROM child_keys ORDER BY created_at DESC, id LIMIT ?", (limit,)
        )
        return [_child(row) for row in rows]

    async def revoke(self, child_id: str, *, parent_id: str | None) -> tuple[ChildKey, bool]:
        """Revoke a child (of ``parent_id``, when given: another parent's child is not found);
        returns it and whether it was live before. Its running jobs still settle."""
        child = await self.get(child_id)
        if child is None or (parent_id is not None and child.parent_id != parent_id):
            raise ChildKeyNotFound(f"no child key {child_id!r} of this key")
        async with self.db.write() as conn:
            cursor = await conn.execute(
                "UPDATE child_keys SET revoked = 1 WHERE id = ? AND revoked = 0", (child_id,)
            )
            changed = cursor.rowcount == 1
            if changed:  # in the parent's history, like the creation
                await log(conn, child.parent_id, "child_key", 0, child_id, "revoked")
        after = await self.get(child_id)
        assert after is not None
        return after, changed

    async def usable(self, child: ChildKey) -> Account:
        """The parent's account of a child that may be used now; 401 if it or its parent is
        revoked or expired (the same rules the hold applies)."""
        at = now()
        if child.revoked:
            raise Unauthorized("Unknown or revoked API key")
        if child.expired(at):
            raise AccountExpired("This child key has expired")
        parent = await self.ledger.account(child.parent_id)
        if parent is None or parent.revoked:
            raise Unauthorized("Unknown or revoked API key: its parent key is revoked")
        if parent.expires_at is not None and parent.expires_at <= at:
            raise AccountExpired("This child key's parent key has expired")
        return parent

    async def spendable(self, child: ChildKey) -> int:
        """What ``child`` may spend now: its remaining limit, at most its parent's balance."""
        parent = await self.usable(child)
        return spendable_msat(
            parent.available_msat, child.limit_msat, child.spent_msat, child.reserved_msat
        )


def check_parent(parent: Account | None, at: int) -> None:
    """Refuse to make children for an account that is not a live API key."""
    if parent is None or parent.revoked:
        raise Unauthorized("Unknown or revoked API key")
    if parent.kind != "api_key":
        raise ChildKeyNotAllowed(
            "only an API key can have child keys: turn this token into one with "
            "POST /v1/wallet/create first"
        )
    if parent.expires_at is not None and parent.expires_at <= at:
        raise AccountExpired("This key has expired; it cannot make child keys")
