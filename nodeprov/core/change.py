"""A per-request token's change: paid out as a token of the payer's mint and unit, or kept.

After a job paid by a per-request token (``X-Cashu``, a DM or NIP-90 token), what is left on
its ``req:`` account goes back as change. Less than one unit of the mint goes to the operator;
change the mint's fee would eat is kept on the token's own account; if the mint cannot be
reached the change stays claimable with the original token (:meth:`ChangePayouts.claim`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from nodeprov.core import journal
from nodeprov.core.db import fetchone
from nodeprov.core.ledger import OPERATOR, Ledger, credit, debit, ensure_account
from nodeprov.core.money import check_unit, from_msat_floor, to_msat
from nodeprov.core.wallet import Received, Sent, Wallet
from nodeprov.errors import (
    InsufficientBalance,
    MintError,
    MintUnavailable,
    TokenTooSmall,
    Unauthorized,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint

logger = logging.getLogger(__name__)


class ChangePayouts:
    """Pays out and re-issues the change of per-request tokens (one payout per token at once)."""

    def __init__(
        self,
        ledger: Ledger,
        wallet: Wallet,
        one_at_a_time: Callable[[str], AbstractAsyncContextManager[None]],
    ) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self._one_at_a_time = one_at_a_time

    async def refund(self, account_id: str, received: Received) -> Sent | None:
        """Return a per-request account's balance as a token of the payer's mint and unit.

        What is worth less than one unit of the mint (msat left from a sat token) goes to the
        operator: a sat token pays ``ceil(cost / 1000)`` sat. If the mint cannot be reached,
        the balance stays claimable with the original token (``claim_change``).
        """
        # One payout of a token's change at a time: a claim racing another claim or the job's
        # own settle would read the same balance, take its msat rest twice and fail its debit.
        async with self._one_at_a_time("change:" + received.fingerprint):
            return await self._pay_change(account_id, received)

    async def _pay_change(self, account_id: str, received: Received) -> Sent | None:
        if await self.ledger.account(account_id) is None:
            return None
        unit = check_unit(received.unit)
        ref = "change:" + received.fingerprint
        async with self.ledger.db.write() as conn:
            # Locked: another process may be paying this change out too (a job's settle here,
            # its client's claim there); the second reads what the first left.
            row = await fetchone(
                conn,
                "SELECT balance_msat - reserved_msat FROM accounts WHERE id = ? FOR UPDATE",
                (account_id,),
            )
            available = int(row[0]) if row else 0
            value = from_msat_floor(available, unit)
            dust = available - to_msat(value, unit)
            if dust > 0:
                # Under the change's ref: the dashboard groups them with their request.
                await debit(conn, account_id, dust, "rounding", ref)
                await credit(conn, OPERATOR, dust, "rounding", ref)
        if value <= 0:
            return None
        try:
            return await self.wallet.send(
                account_id, available - dust, mint_url=received.mint_url, unit=unit,
                kind="change", ref=ref,
            )  # fmt: skip
        except TokenTooSmall as exc:
            await self._credit_small_change(account_id, received.fingerprint, exc.message)
            return None
        except InsufficientBalance:
            # Another process paid this change out between the rounding and the send.
            return None
        except MintError as exc:
            logger.warning("change kept claimable for %s: %s", account_id, exc)
            return None

    async def _credit_small_change(self, account_id: str, fingerprint: str, why: str) -> None:
        """Change the mint's fee would eat goes to the token's own account, once.

        Sending it would cost more than it is worth, and keeping it on the per-request
        account would retry that at every claim. On the ``token:`` account the original
        token keeps it usable: sent as a key (``Authorization: Bearer cashu…``) it pays
        from this balance, and the key's wallet routes can withdraw it once it is larger.
        """
        async with self.ledger.db.write() as conn:
            row = await fetchone(
                conn,
                "SELECT balance_msat - reserved_msat FROM accounts WHERE id = ? FOR UPDATE",
                (account_id,),
            )
            amount = int(row[0]) if row else 0
            if amount <= 0:
                return
            await debit(conn, account_id, amount, "change_kept", "change:" + fingerprint)
            await ensure_account(conn, "token:" + fingerprint, "token")
            await credit(conn, "token:" + fingerprint, amount, "deposit", "change:" + fingerprint)
        logger.warning(
            "change of %d msat for %s is below the mint's fee (%s); credited to token:%s",
            amount, account_id, why, fingerprint,
        )  # fmt: skip

    async def in_flight(self, token: str) -> bool:
        """Whether a job paid by per-request ``token`` still holds money (change not yet due)."""
        account = await self.ledger.account("req:" + token_fingerprint(parse_token(token)))
        return account is not None and account.reserved_msat > 0

    async def claim(self, token: str) -> list[str]:
        """Change tokens issued for a per-request token, issuing any still owed."""
        fingerprint = token_fingerprint(parse_token(token))
        account_id = "req:" + fingerprint
        account = await self.ledger.account(account_id)
        if account is None or account.total_deposited_msat == 0:
            # A receive that failed leaves an empty account: the token is still the client's,
            # unless the swap's outcome is still unknown (recovery will settle it).
            op = await self.wallet.pending_op_for(fingerprint)
            if op is not None and op.state == "pending":
                raise MintUnavailable("this token is still being redeemed with the mint; retry")
            raise Unauthorized("No payment with this token is known here")
        if account.available_msat > 0 and account.reserved_msat == 0:
            op = await self.wallet.pending_op_for(fingerprint)
            if op is not None:
                received = Received(
                    0, op.mint_url, check_unit(op.unit), op.amount, op.fee, fingerprint
                )
                await self.refund(account_id, received)
        return await journal.sent_tokens(self.ledger.db, account_id)
