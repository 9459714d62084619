"""Funding an API key over Lightning: a NUT-04 mint quote, paid, then minted, journalled.

A quote is a ``wallet_ops`` row of kind ``mint``: ``unpaid`` while the invoice waits,
``pending`` once our blinded outputs are written (before the mint is asked to sign),
then ``done`` (proofs stored, account credited in the same transaction) or ``expired``.
A crash while ``pending`` is settled by :meth:`LightningFunding.recover`: outputs the mint
already signed are restored (NUT-09), otherwise the still-paid quote is minted again.

The public quote id (``lnq_…``) is ours, not the mint's. A new key's text is handed to
the client once, in the answer that creates the quote, and never stored: the op keeps only
its account id (the key's hash). Its account opens when the funds arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nodeprov.core import journal
from nodeprov.core.child_keys import ChildKeys
from nodeprov.core.db import Conn, fetchone
from nodeprov.core.denominations import complete_split
from nodeprov.core.journal import Op
from nodeprov.core.ledger import add_asset, credit, ensure_account, now
from nodeprov.core.money import Unit, to_msat
from nodeprov.core.payments import api_key_account
from nodeprov.core.wallet import Wallet
from nodeprov.errors import (
    AccountExpired,
    ChildKeyNotAllowed,
    InvalidRequest,
    MintError,
    MintUnavailable,
    NodeprovError,
    Unauthorized,
)

logger = logging.getLogger(__name__)

UNIT: Unit = "sat"
KIND = "mint"
# How long after the mint's quote expiry an unpaid quote is given up (clock skew, late pay).
EXPIRY_GRACE_SECONDS = 120
DEFAULT_QUOTE_SECONDS = 3600  # if the mint names no expiry
POLL_SECONDS = 30.0
LIVE_OP_SECONDS = 120


@dataclass(frozen=True)
class FundingQuote:
    """An invoice that funds a key: pay ``invoice``, then poll with ``id``."""

    id: str
    invoice: str
    amount: int  # sat
    amount_msat: int
    expires_at: int
    mint_url: str
    api_key: str | None = None  # a new key: shown here once, only its hash is kept


@dataclass(frozen=True)
class FundingStatus:
    """A quote's state (``unpaid``, ``pending``, ``paid``, ``expired``, ``failed``)."""

    id: str
    state: str
    amount: int
    amount_msat: int
    expires_at: int
    new_key: bool
    api_key: str | None  # only for quotes stored by older versions, first paid answer
    balance_msat: int | None  # the funded key's balance, once paid


class QuoteNotFound(InvalidRequest):
    status = 404
    code = "quote_not_found"


class TooManyOpenQuotes(NodeprovError):
    """The node holds as many unpaid quotes as it allows (``wallet.lightning_max_open_quotes``)."""

    status = 503
    type = "server_error"
    code = "too_many_open_quotes"
    retryable = True


_STATE_VIEW = {"unpaid": "unpaid", "pending": "pending", "done": "paid"}


class LightningFunding:
    """Mint quotes that credit accounts once their invoice is paid."""

    def __init__(
        self, wallet: Wallet, *, max_sat: int | None = None, max_open: int | None = None
    ) -> None:
        self.wallet = wallet
        self.db = wallet.ledger.db
        self.max_sat = max_sat  # the largest invoice create() makes (config: wallet.*)
        # Unpaid quotes cost a mint round trip every poll and anyone may create one.
        self.max_open = max_open

    # --- creating a quote ------------------------------------------------------------

    async def create(
        self,
        amount: int,
        *,
        api_key: str | None = None,
        expires_at: int | None = None,
        refund_address: str | None = None,
        mint_url: str | None = None,
    ) -> FundingQuote:
        """An invoice for ``amount`` sat funding ``api_key`` (or a new key when None)."""
        self._check_amount(amount)
        if api_key is not None and (expires_at is not None or refund_address is not None):
            raise InvalidRequest("expiry and refund address are set when a key is created")
        if api_key is None:
            fresh = "sk-" + secrets.token_urlsafe(32)
            new_key: str | None = fresh
            account_id = api_key_account(fresh)
        else:
            new_key, account_id = None, await self._fundable(api_key)
        return await self._open_quote(
            amount, account_id, mint_url, new_key, expires_at, refund_address
        )

    async def create_for_npub(self, pubkey: str, amount: int) -> FundingQuote:
        """An invoice for ``amount`` sat crediting the npub account of ``pubkey`` (hex) once
        paid: the account that DM deposits fund and NIP-90 jobs pay from."""
        self._check_amount(amount)
        return await self._open_quote(amount, "npub:" + pubkey, None, None, None, None)

    def _check_amount(self, amount: int) -> None:
        if type(amount) is not int or amount <= 0:
            raise InvalidRequest("'amount' must be a positive whole number of sats")
        if self.max_sat is not None and amount > self.max_sat:
            raise InvalidRequest(
                f"'amount' is {amount} sat; this node's invoices are at most {self.max_sat} sat"
            )

    async def _open_quote(
        self,
        amount: int,
        account_id: str,
        mint_url: str | None,
        new_key: str | None,
        key_expires_at: int | None,
        refund_address: str | None,
    ) -> FundingQuote:
        """Ask the mint for a quote and record it as an unpaid funding of ``account_id``."""
        # Checked before the mint is asked (cheap refusal) and again in the write (the bound).
        await self._check_open(None)
        api = self.wallet.api(mint_url or self.wallet.mints[0])
        quote = await api.mint_quote(amount, UNIT)
        invoice = str(quote["request"])
        expiry = int(quote.get("expiry") or now() + DEFAULT_QUOTE_SECONDS)
        public_id = "lnq_" + secrets.token_urlsafe(18)
        async with self.db.write() as conn:
            await self._check_open(conn)
            op_id = await journal.insert_op(
                conn, kind=KIND, state="unpaid", mint_url=api.url, unit=UNIT,
                account_id=account_id, amount=amount, inputs=(), outputs=(),
                quote=str(quote["quote"]), ref=public_id,
            )  # fmt: skip
            await conn.execute(
                "INSERT INTO lightning_funding (id, op_id, invoice, expires_at, new_key, api_key,"
                " key_expires_at, refund_address, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    public_id, op_id, invoice, expiry, new_key is not None, None, key_expires_at,
                    refund_address, now(),
                ),
            )  # fmt: skip
        return FundingQuote(
            public_id, invoice, amount, to_msat(amount, UNIT), expiry, api.url, new_key
        )

    async def _check_open(self, conn: Conn | None) -> None:
        """Refuse a new quote while ``max_open`` unpaid, unexpired quotes wait for payment."""
        if self.max_open is None:
            return
        sql = (
            "SELECT COUNT(*) FROM wallet_ops w JOIN lightning_funding f ON f.op_id = w.id "
            "WHERE w.kind = ? AND w.state = 'unpaid' AND f.expires_at >= ?"
        )
        params = (KIND, now() - EXPIRY_GRACE_SECONDS)
        row = await (self.db.fetchone(sql, params) if conn is None else fetchone(conn, sql, params))
        if row is not None and int(row[0]) >= self.max_open:
            raise TooManyOpenQuotes(
                f"this node has {self.max_open} unpaid Lightning invoices open, its maximum;"
                " try again once some are paid or expire, or pay with a Cashu token"
            )

    async def _fundable(self, api_key: str) -> str:
        account_id = api_key_account(api_key)
        account = await self.wallet.ledger.account(account_id)
        if account is None and await ChildKeys(self.wallet.ledger).by_account(account_id):
            raise ChildKeyNotAllowed("a child key cannot be topped up: only its parent key can")
        if account is None or account.revoked:
            raise Unauthorized("Unknown or revoked API key")
        if account.expires_at is not None and account.expires_at <= now():
            raise AccountExpired("This key has expired; it cannot be topped up")
        return account_id

    # --- polling and minting -----------------------------------------------------------

    async def status(self, public_id: str) -> FundingStatus:
        """Check the quote at the mint (minting if it was paid) and report; shows a new key once."""
        op = await self._op_by_public_id(public_id)
        if op is None:
            raise QuoteNotFound(f"no Lightning quote {public_id!r} is known here")
        try:
            await self.check(op)
        except MintUnavailable as exc:
            logger.warning("quote %s not checked: %s", public_id, exc)
        async with self.db.write() as conn:
            op = await journal.get_op(conn, op.id)
            row = await fetchone(conn, "SELECT * FROM lightning_funding WHERE id = ?", (public_id,))
            assert row is not None
            shown = None
            # Quotes created by older versions kept the key until shown once; clear it.
            if op.state == "done" and row["api_key"] is not None:
                shown = str(row["api_key"])
                await conn.execute(
                    "UPDATE lightning_funding SET api_key = NULL WHERE id = ?", (public_id,)
                )
        balance = None
        if op.state == "done" and op.account_id is not None:
            account = await self.wallet.ledger.account(op.account_id)
            balance = account.balance_msat if account else None
        return FundingStatus(
            public_id, _STATE_VIEW.get(op.state, op.state), op.amount,
            to_msat(op.amount, UNIT), int(row["expires_at"]), bool(row["new_key"]), shown,
            balance,
        )  # fmt: skip

    async def _op_by_public_id(self, public_id: str) -> Op | None:
        rows = await self.db.fetchall(
            "SELECT w.* FROM wallet_ops w JOIN lightning_funding f ON f.op_id = w.id "
            "WHERE f.id = ?",
            (public_id,),
        )
        return journal.ops_from_rows(rows)[0] if rows else None

    async def check(self, op: Op) -> str:
        """Bring one mint op forward: poll an unpaid quote, mint a paid one; its new state."""
        if op.state == "pending":
            return op.state  # minting now, or left by a crash: recover() decides
        if op.state != "unpaid":
            return op.state
        assert op.quote is not None
        quote = await self.wallet.api(op.mint_url).mint_quote_state(op.quote)
        state = _quote_state(quote)
        if state == "UNPAID":
            expiry = await self._expiry(op.id)
            if expiry + EXPIRY_GRACE_SECONDS < now():
                await self._set_state(op.id, "unpaid", "expired")
                return "expired"
            return "unpaid"
        if state != "PAID":
            # ISSUED without our outputs written: not something this node did.
            logger.error("mint quote %s is %s but op %s never minted it", op.quote, state, op.id)
            await self._set_state(op.id, "unpaid", "failed", error=f"quote {state}")
            return "failed"
        with self.wallet.live.track(op.id):
            outputs = await self._write_outputs(op)
            if outputs is None:
                return (await self.wallet.op(op.id)).state  # another check got there first
            return await self._mint(op.id, op.quote, op.mint_url, outputs)

    async def _write_outputs(self, op: Op) -> list[journal.BlindedOutput] | None:
        """Journal fresh outputs and move ``unpaid`` -> ``pending``; None if someone else did."""
        keyset = await self.wallet.active_keyset(op.mint_url, op.unit)
        outputs = self.wallet.make_outputs(keyset, complete_split(op.amount), "keep")
        async with self.db.write() as conn:
            cursor = await conn.execute(
                "UPDATE wallet_ops SET outputs = ?, state = 'pending', updated_at = ? "
                "WHERE id = ? AND state = 'unpaid'",
                (json.dumps([o.__dict__ for o in outputs]), now(), op.id),
            )
            if cursor.rowcount != 1:
                return None
        return outputs

    async def _mint(
        self, op_id: int, quote: str, mint_url: str, outputs: Sequence[journal.BlindedOutput]
    ) -> str:
        api = self.wallet.api(mint_url)
        # A MintUnavailable from here leaves the op pending for the poll (callers catch it).
        try:
            signatures = await api.mint(quote, [o.to_wire() for o in outputs])
        except MintUnavailable:
            return await self._resolve(op_id, retry=False)
        except MintError as exc:
            return await self._resolve(op_id, refused=exc.message)
        await self._finish(op_id, signatures)
        return "done"

    async def _resolve(self, op_id: int, *, refused: str | None = None, retry: bool = True) -> str:
        """Settle a ``pending`` op from the mint's view: restore signed outputs, else retry.

        Raises :class:`MintUnavailable` (the op stays ``pending``) so a recovery round can
        leave that mint alone until the next round.
        """
        op = await self.wallet.op(op_id)
        if op.state != "pending":
            return op.state
        api = self.wallet.api(op.mint_url)
        signed = await api.restore([o.to_wire() for o in op.outputs])
        if op.outputs and all(o.B_ in signed for o in op.outputs):
            await self._finish(op.id, [signed[o.B_] for o in op.outputs])
            return "done"
        if refused is not None:
            # The mint refused and signed nothing: back to unpaid, fresh outputs next time.
            logger.warning("mint refused op %s: %s", op.id, refused)
            await self._set_state(op.id, "pending", "unpaid", error=refused, clear_outputs=True)
            return "unpaid"
        assert op.quote is not None
        if not retry:
            return "pending"
        if _quote_state(await api.mint_quote_state(op.quote)) != "PAID":
            logger.error("op %s: quote %s issued but our outputs unsigned", op.id, op.quote)
            return "pending"
        try:
            signatures = await api.mint(op.quote, [o.to_wire() for o in op.outputs])
        except MintUnavailable:
            raise
        except MintError as exc:
            return await self._resolve(op.id, refused=exc.message)
        await self._finish(op.id, signatures)
        return "done"

    async def _finish(self, op_id: int, signatures: Sequence[Any]) -> None:
        """Store the minted proofs and credit the account, once (one transaction)."""
        await self.wallet.load_output_keyset(op_id)
        async with self.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":
                return
            keyset = self.wallet.known_keyset(op.mint_url, op.outputs[0].keyset_id)
            proofs = self.wallet.unblind_signatures(keyset, op.outputs, signatures)
            await journal.store_proofs(conn, op.mint_url, op.unit, proofs, "unspent", op.id)
            value_msat = to_msat(sum(p.amount for p in proofs), UNIT)
            await add_asset(conn, op.mint_url, op.unit, value_msat)
            await self._open_account(conn, op)
            assert op.account_id is not None
            await credit(conn, op.account_id, value_msat, "deposit", op.ref or "")
            await journal.set_op_state(conn, op.id, "done")

    async def _open_account(self, conn: Conn, op: Op) -> None:
        row = await fetchone(
            conn,
            "SELECT key_expires_at, refund_address FROM lightning_funding WHERE op_id = ?",
            (op.id,),
        )
        assert op.account_id is not None
        kind = "npub" if op.account_id.startswith("npub:") else "api_key"
        await ensure_account(
            conn, op.account_id, kind,
            expires_at=row["key_expires_at"] if row else None,
            refund_address=row["refund_address"] if row else None,
        )  # fmt: skip

    async def _expiry(self, op_id: int) -> int:
        row = await self.db.fetchone(
            "SELECT expires_at FROM lightning_funding WHERE op_id = ?", (op_id,)
        )
        return int(row[0]) if row else 0

    async def _set_state(
        self, op_id: int, old: str, new: str, *, error: str | None = None,
        clear_outputs: bool = False,
    ) -> None:  # fmt: skip
        async with self.db.write() as conn:
            await conn.execute(
                "UPDATE wallet_ops SET state = ?, error = COALESCE(?, error), updated_at = ?"
                + (", outputs = '[]'" if clear_outputs else "")
                + " WHERE id = ? AND state = ?",
                (new, error, now(), op_id, old),
            )

    # --- recovery ----------------------------------------------------------------------

    async def recover(
        self, *, older_than: int | None = None, unpaid: bool = True
    ) -> dict[str, int]:
        """Settle ``pending`` mint ops and (with ``unpaid``) poll unpaid quotes; counts by state.

        At start-up every pending op is an orphan; while running, pass ``older_than`` so
        that an op a live request is minting right now is left alone. Start-up passes
        ``unpaid=False``: anyone can open an unpaid quote and none of them has moved money,
        so they wait for the poll instead of holding the node down. A mint that is
        unreachable is asked once per round: its other ops wait for the next round.
        """
        states = "('unpaid', 'pending')" if unpaid else "('pending')"
        rows = await self.db.fetchall(
            f"SELECT * FROM wallet_ops WHERE kind = ? AND state IN {states} "
            "AND (state = 'unpaid' OR updated_at <= ?) ORDER BY id",
            (KIND, older_than if older_than is not None else 2**62),
        )
        outcome: dict[str, int] = {}
        down: set[str] = set()
        for op in journal.ops_from_rows(rows):
            if op.mint_url in down or not self.wallet.recoverable(op.id, op.mint_url):
                continue  # e.g. a poll of this process is minting it right now
            try:
                state = await (self._resolve(op.id) if op.state == "pending" else self.check(op))
            except MintUnavailable as exc:
                state = (await self.wallet.op(op.id)).state  # a paid quote may be pending now
                logger.warning("mint op %s stays %s: %s; %s left for now", op.id, state, exc,
                               op.mint_url)  # fmt: skip
                down.add(op.mint_url)
            except NodeprovError as exc:  # a 4xx: one lost quote must not stop start-up
                logger.error("mint op %s (quote %s): %s; marked failed", op.id, op.quote, exc)
                error = journal.RECOVERY_FAILED + exc.message
                await self._set_state(op.id, op.state, "failed", error=error)
                state = "failed"
            if state != op.state:
                outcome[state] = outcome.get(state, 0) + 1
        return outcome


class HasWallet(Protocol):
    """What the service needs of the daemon's core."""

    wallet: Wallet


async def poll_lightning_funding(
    core: HasWallet, stop: asyncio.Event, interval: float = POLL_SECONDS
) -> None:
    """Daemon service: mint paid quotes nobody polled, settle ops a mint outage left pending."""
    funding = LightningFunding(core.wallet)
    while not stop.is_set():
        try:
            # Ops younger than this may be minted right now by a live request.
            outcome = await funding.recover(older_than=now() - LIVE_OP_SECONDS)
            if outcome:
                logger.info("lightning funding: %s", outcome)
        except Exception:
            logger.exception("lightning funding poll failed; retrying in %.0f s", interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def _quote_state(quote: dict[str, Any]) -> str:
    """NUT-04 quote state; older mints only say ``paid``/``issued`` booleans."""
    state = quote.get("state")
    if isinstance(state, str):
        return state.upper()
    if quote.get("issued"):
        return "ISSUED"
    return "PAID" if quote.get("paid") else "UNPAID"
