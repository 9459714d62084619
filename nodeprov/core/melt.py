"""Paying a Lightning invoice from an account (NUT-05 melt with NUT-08 change), journalled.

The account is debited the quote's amount, its fee reserve and the mint's input fee,
the inputs are reserved and blank change outputs are written down, all before the mint
is asked to pay. Whatever the mint does not spend of the fee reserve comes back as change
and is credited back. A melt the mint reports ``PENDING`` (or that a crash interrupted)
stays pending and is settled by :meth:`Melter.recover` from the quote's state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from nodeprov.core import journal, liabilities
from nodeprov.core.bdhke import hash_to_curve_hex
from nodeprov.core.denominations import covering_subset
from nodeprov.core.invoices import payable_invoice
from nodeprov.core.ledger import add_asset, credit, debit
from nodeprov.core.mint_access import KeysetNotLoaded
from nodeprov.core.money import Unit, check_unit, to_msat
from nodeprov.core.wallet import Wallet
from nodeprov.errors import MintError, MintUnavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeltQuote:
    """What the mint asks to pay an invoice: ``amount`` plus at most ``reserve`` in fees."""

    id: str
    amount: int
    reserve: int
    mint_url: str
    unit: Unit


@dataclass(frozen=True)
class Melted:
    """Outcome of a melt: ``paid`` or ``pending``; what it cost the account, fees included."""

    state: str
    quote: str
    amount: int
    unit: str
    cost_msat: int


class Melter:
    """Lightning payouts through a trusted mint."""

    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet
        self.db = wallet.ledger.db

    async def quote(
        self, bolt11: str, *, mint_url: str | None = None, unit: str = "sat"
    ) -> MeltQuote:
        """Ask the mint what paying ``bolt11`` costs (amount and Lightning fee reserve).

        A malformed or expired invoice is :class:`InvalidInvoice` before any mint is asked.
        """
        unit_ = check_unit(unit)
        payable_invoice(bolt11)
        api = self.wallet.api(mint_url or self.wallet.mints[0])
        quote = await api.melt_quote(bolt11, unit_)
        return MeltQuote(
            str(quote["quote"]),
            int(quote["amount"]),
            int(quote.get("fee_reserve") or 0),
            api.url,
            unit_,
        )

    async def melt(
        self,
        account_id: str,
        bolt11: str,
        *,
        mint_url: str | None = None,
        unit: str = "sat",
        ref: str = "",
    ) -> Melted:
        """Pay ``bolt11`` from ``account_id``; raises if the mint refuses, nothing charged."""
        quote = await self.quote(bolt11, mint_url=mint_url, unit=unit)
        return await self.pay(account_id, quote, ref=ref)

    async def pay(self, account_id: str, quote: MeltQuote, *, ref: str = "") -> Melted:
        """Pay a quote from ``account_id``: journal, melt, then settle the change."""
        try:
            return await journal.retry_busy(lambda: self._pay(account_id, quote, ref))
        # Only the input fee inside the first write raises it (rolled back, before any mint
        # call); the later steps load their keyset before their own write.
        except KeysetNotLoaded as exc:
            await self.wallet.keyset(exc.mint_url, exc.keyset_id)
            return await journal.retry_busy(lambda: self._pay(account_id, quote, ref))

    async def _pay(self, account_id: str, quote: MeltQuote, ref: str) -> Melted:
        mint_url, unit_, amount, reserve = quote.mint_url, quote.unit, quote.amount, quote.reserve
        api = self.wallet.api(mint_url)
        keyset = await self.wallet.pool_keysets(mint_url, unit_)
        async with self.db.write() as conn:
            await liabilities.lock_pool(conn, mint_url, unit_)  # before the account's row
            # The account's own balance is checked first: that is the error a user can act on.
            await debit(conn, account_id, to_msat(amount + reserve, unit_), "payout", ref)
            counts = await journal.pool_counts(conn, mint_url, unit_)
            fee = 0
            for _ in range(4):  # the input fee depends on the inputs chosen; settle it
                chosen = covering_subset(counts, amount + reserve + fee)
                if chosen is None:
                    raise MintError(f"the node holds less than {amount + reserve} {unit_}")
                proofs = await journal.take_proofs(conn, mint_url, unit_, chosen)
                new_fee = self.wallet.input_fee(mint_url, proofs)
                if new_fee == fee:
                    break
                fee = new_fee
            total = sum(p.amount for p in proofs)
            debit_msat = to_msat(amount + reserve + fee, unit_)
            if fee:
                await debit(conn, account_id, to_msat(fee, unit_), "payout_fee", ref)
            blanks = max(1, (total - amount - fee).bit_length())
            outputs = self.wallet.make_outputs(keyset, [1] * blanks, "change")
            op_id = await journal.insert_op(
                conn, kind="melt", mint_url=mint_url, unit=unit_, account_id=account_id,
                amount=amount, debit_msat=debit_msat, fee=fee, inputs=proofs, outputs=outputs,
                quote=quote.id, ref=ref,
            )  # fmt: skip
            await journal.set_proof_state(conn, [p.secret for p in proofs], "reserved", op_id)
            await liabilities.check_move(conn, mint_url, unit_, account_id)
        with self.wallet.live.track(op_id):
            try:
                result = await api.melt(
                    quote.id, [p.to_wire() for p in proofs], [o.to_wire() for o in outputs]
                )
            except MintUnavailable:
                result = {"state": "PENDING"}
            except MintError:
                await self._reverse(op_id)
                raise
            state, cost = await self._apply(op_id, result)
        if state == "unpaid":
            raise MintError("the mint could not pay the invoice; nothing was charged")
        return Melted(state, quote.id, amount, unit_, cost if state == "paid" else debit_msat)

    async def _apply(self, op_id: int, result: dict[str, Any]) -> tuple[str, int]:
        state = str(result.get("state") or ("PAID" if result.get("paid") else "UNPAID"))
        if state == "PAID":
            return "paid", await self._finish(op_id, list(result.get("change") or []))
        if state == "UNPAID":
            await self._reverse(op_id)
            return "unpaid", 0
        return "pending", 0

    async def _finish(self, op_id: int, change: list[dict[str, Any]]) -> int:
        """Store the change, credit back the unused reserve; returns what the melt cost."""
        await self.wallet.load_output_keyset(op_id)
        async with self.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":
                return 0
            unit = check_unit(op.unit)
            keyset = self.wallet.known_keyset(op.mint_url, op.outputs[0].keyset_id)
            proofs = self.wallet.unblind_signatures(keyset, op.outputs[: len(change)], change)
            await journal.set_proof_state(conn, [p.secret for p in op.inputs], "spent", op.id)
            await journal.store_proofs(conn, op.mint_url, op.unit, proofs, "unspent", op.id)
            spent_msat = to_msat(
                sum(p.amount for p in op.inputs) - sum(p.amount for p in proofs), unit
            )
            await add_asset(conn, op.mint_url, op.unit, -spent_msat)
            assert op.account_id is not None
            back = op.debit_msat - spent_msat
            if back > 0:
                await credit(conn, op.account_id, back, "payout_change", op.ref or "")
            await journal.set_op_state(conn, op.id, "done")
            return spent_msat

    async def _reverse(self, op_id: int, error: str | None = None) -> None:
        async with self.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":
                return
            await journal.set_proof_state(conn, [p.secret for p in op.inputs], "unspent")
            assert op.account_id is not None
            await credit(conn, op.account_id, op.debit_msat, "reversal", op.ref or "")
            await journal.set_op_state(conn, op.id, "failed", error=error)

    async def recover(self, *, older_than: int | None = None) -> dict[str, int]:
        """Settle pending melts from their quote's state at the mint; counts by outcome."""
        rows = await self.db.fetchall(
            "SELECT id, mint_url, quote FROM wallet_ops WHERE state = 'pending' AND kind = 'melt' "
            "AND updated_at <= ?",
            (older_than if older_than is not None else 2**62,),
        )
        outcome: dict[str, int] = {}
        down: set[str] = set()  # unreachable this round: one timeout per mint, not per melt
        for row in rows:
            if not self.wallet.recoverable(row["id"], row["mint_url"]):
                continue
            if row["mint_url"] in down:
                outcome["pending"] = outcome.get("pending", 0) + 1
                continue
            try:
                quote = await self.wallet.api(row["mint_url"]).melt_quote_state(row["quote"])
                state, _ = await self._apply(row["id"], quote)
            except MintUnavailable as exc:
                logger.warning("melt %s stays pending: %s", row["id"], exc)
                down.add(row["mint_url"])
                state = "pending"
            except MintError as exc:  # a 4xx: one bad record must not stop start-up
                state = await self._refused(row["id"], exc.message)
            outcome[state] = outcome.get(state, 0) + 1
        return outcome

    async def _refused(self, op_id: int, message: str) -> str:
        """The mint refused to say how a melt went: undo it if its inputs are unspent.

        Inputs the mint still reports unspent were never melted, so the account gets its
        money back and the op is marked failed; otherwise it stays pending for an operator.
        """
        op = await self.wallet.op(op_id)
        api = self.wallet.api(op.mint_url)
        try:
            states = await api.check_state([hash_to_curve_hex(p.secret) for p in op.inputs])
        except MintError as exc:
            logger.error("melt %s stays pending: %s; inputs unknown: %s", op_id, message, exc)
            return "pending"
        if any(s != "UNSPENT" for s in states):
            logger.error("melt %s stays pending: %s; its inputs are %s", op_id, message, states)
            return "pending"
        logger.error("melt %s: %s; inputs unspent, marked failed", op_id, message)
        await self._reverse(op_id, error=journal.RECOVERY_FAILED + message)
        return "failed"
