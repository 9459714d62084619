"""Account money moves that are not jobs: create a key, top up, deposit, balance, withdraw.

:class:`~nodeprov.core.payments.Payments` mixes these in, so the channels call them there.
Moves that carry a reference are idempotent on it: ``create_key`` on the token (the key
is derived from it, :mod:`nodeprov.core.key_secret`), ``deposit`` and ``withdraw`` on
``ref`` (``dm:<event id>``). A repeat finds the first outcome and moves nothing again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from nodeprov.core import auth_events, journal
from nodeprov.core.key_secret import derive_api_key
from nodeprov.core.ledger import Account, Ledger
from nodeprov.core.money import check_unit, to_msat
from nodeprov.core.wallet import Received, Sent, Wallet
from nodeprov.errors import (
    InsufficientBalance,
    MintUnavailable,
    PaymentError,
    TokenAlreadySpent,
    Unauthorized,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint


def mask_key(key: str) -> str:
    """A key as ``/v1/wallet/balance`` shows it: ``sk-xNKv…9f2Q`` (the first 7 and last 4
    characters); the operator finds the account by it (stored as the account's ``key_hint``)."""
    return key[:7] + "…" + key[-4:] if len(key) > 16 else "…"


def api_key_account(api_key: str) -> str:
    """The account id of an API key: only its SHA-256 is ever stored."""
    return "key:" + hashlib.sha256(api_key.encode()).hexdigest()


class AccountMoves:
    """The account side of :class:`~nodeprov.core.payments.Payments` (which sets these)."""

    ledger: Ledger
    wallet: Wallet
    _key_secret: bytes
    _serial: dict[str, tuple[asyncio.Lock, int]]

    @asynccontextmanager
    async def _one_at_a_time(self, key: str) -> AsyncIterator[None]:
        """Serialise work on one token or reference so the second sees the first's outcome."""
        lock, users = self._serial.get(key, (asyncio.Lock(), 0))
        self._serial[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._serial[key]
            if users == 1:
                del self._serial[key]
            else:
                self._serial[key] = (lock, users - 1)

    async def create_key(
        self, token: str, *, expires_at: int | None = None, refund_address: str | None = None
    ) -> tuple[str, Account]:
        """Fund an API key with ``token``; returns the key and its account.

        The key is derived from the token (:mod:`nodeprov.core.key_secret`), so creating
        again with a token that create already redeemed answers with the same key and the
        account as it is now (``expires_at``/``refund_address`` of the first call stand):
        the token is the credential, as in token-as-key mode.
        """
        fingerprint = token_fingerprint(parse_token(token))
        api_key = derive_api_key(self._key_secret, fingerprint)
        account_id = api_key_account(api_key)
        async with self._one_at_a_time("token:" + fingerprint):
            if (account := await self._funded(account_id)) is not None:
                return api_key, account
            await self.ledger.open_account(
                account_id, "api_key", expires_at=expires_at, refund_address=refund_address,
                key_hint=mask_key(api_key),
            )  # fmt: skip
            try:
                await self.wallet.receive(token, account_id, "api_key")
            except TokenAlreadySpent:
                # Another process may be redeeming it for this very key right now.
                if (account := await self._funded(account_id)) is not None:
                    return api_key, account
                await self._raise_if_redeeming(fingerprint, account_id)
                await self.ledger.drop_empty_account(account_id)
                raise
            except PaymentError:
                # The mint never took the token (or was never asked): nothing to keep.
                await self.ledger.drop_empty_account(account_id)
                raise
            # Any other failure (mint unreachable mid-swap, cancellation) keeps the account:
            # recovery credits it if the swap landed, and a retry finds it by the same key.
        account = await self.ledger.account(account_id)
        assert account is not None
        return api_key, account

    async def note_key_hint(self, account_id: str, key: str) -> None:
        """Keep ``key``'s masked form on its account if it has none yet (keys made before
        hints were kept, or funded over Lightning), so the operator can find it by it."""
        row = await self.ledger.db.fetchone(
            "SELECT key_hint FROM accounts WHERE id = ?", (account_id,)
        )
        if row is not None and row[0] is None:
            async with self.ledger.db.write() as conn:
                await conn.execute(
                    "UPDATE accounts SET key_hint = ? WHERE id = ? AND key_hint IS NULL",
                    (mask_key(key), account_id),
                )

    async def _raise_if_redeeming(self, fingerprint: str, account_id: str) -> None:
        op = await self.wallet.pending_op_for(fingerprint)
        if op is not None and op.state == "pending" and op.account_id == account_id:
            raise MintUnavailable(
                "this token is still being redeemed with the mint; retry in a minute"
            )

    async def topup(self, account_id: str, token: str) -> Received:
        if await self.ledger.account(account_id) is None:
            raise Unauthorized("Unknown API key")
        return await self.wallet.receive(token, account_id, "api_key")

    async def deposit(self, account_id: str, token: str, ref: str) -> Received:
        """Credit ``token`` to ``account_id`` once per ``ref``: a repeat returns the first outcome.

        ``ref`` names the request that carried the token (``dm:<event id>``); a request that
        is resumed after a crash finds its deposit here instead of failing on a spent token.
        """
        async with self._one_at_a_time("ref:" + ref):
            op = await journal.op_by_ref(self.ledger.db, "receive", ref, account_id)
            if op is not None and op.state == "done":
                unit = check_unit(op.unit)
                credited = to_msat(op.amount - op.fee, unit)
                return Received(
                    credited, op.mint_url, unit, op.amount, op.fee, op.fingerprint or ""
                )
            if op is not None and op.state == "pending":
                raise MintUnavailable("this deposit is still being settled with the mint")
            kind = account_id.partition(":")[0]
            return await self.wallet.receive(
                token, account_id, {"key": "api_key"}.get(kind, kind), ref=ref
            )

    async def first_auth_use(
        self, sig: str, event_id: str, pubkey: str, created_at: int, at: int
    ) -> bool:
        """Record a signed auth event (NIP-98) as used at ``at``; False if it was before."""
        return await auth_events.first_use(self.ledger.db, sig, event_id, pubkey, created_at, at)

    async def balance(self, account_id: str) -> int:
        """Available msat of ``account_id`` (0 for an account not seen yet)."""
        account = await self.ledger.account(account_id)
        return account.available_msat if account is not None else 0

    async def _funded(self, account_id: str) -> Account | None:
        """The account if it was ever credited (a redeemed token), else None."""
        account = await self.ledger.account(account_id)
        return account if account is not None and account.total_deposited_msat > 0 else None

    async def withdraw(
        self,
        account_id: str,
        amount_msat: int | None = None,
        *,
        mint_url: str | None = None,
        unit: str | None = None,
        ref: str = "",
    ) -> Sent:
        """Pay an account's balance (or ``amount_msat`` of it) out as a token.

        With ``ref`` (``dm:<event id>``) it is idempotent: a second call with the same ref
        returns the token the first one issued and debits nothing.
        """
        if not ref:
            return await self._withdraw(account_id, amount_msat, mint_url, unit, ref)
        async with self._one_at_a_time("ref:" + ref):
            op = await journal.op_by_ref(self.ledger.db, "send", ref, account_id)
            if op is not None and op.state == "done" and op.token is not None:
                unit_ = check_unit(op.unit)
                return Sent(op.token, op.amount - op.fee, unit_, op.mint_url, op.fee, op.debit_msat)
            if op is not None and op.state == "pending":
                # Recovery settles it (a token issued, or the balance back); then ask again.
                raise MintUnavailable("this withdrawal is still being settled with the mint")
            return await self._withdraw(account_id, amount_msat, mint_url, unit, ref)

    async def _withdraw(
        self,
        account_id: str,
        amount_msat: int | None,
        mint_url: str | None,
        unit: str | None,
        ref: str,
    ) -> Sent:
        account = await self.ledger.account(account_id)
        if account is None:
            raise Unauthorized("Unknown API key")
        amount = account.available_msat if amount_msat is None else amount_msat
        if amount_msat is None:
            # "Everything" is what one pool can pay: a balance spread over pools (earnings
            # in sat and msat) pays the larger part now and keeps the rest, not an error.
            most = await self.wallet.most_one_pool_pays(account_id, mint_url, unit)
            if most > 0:  # none can pay anything: ask for it all, so the refusal says why
                amount = min(amount, most)
        if amount > account.available_msat:
            raise InsufficientBalance.of(account.available_msat, amount)
        return await self.wallet.send(account_id, amount, mint_url=mint_url, unit=unit, ref=ref)
