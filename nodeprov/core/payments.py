"""The one payment pipeline both channels call: authorize → hold → job → settle → change.

Channels enter every paid job through :meth:`Payments.job` (the lifecycle and its rules:
:mod:`nodeprov.core.charges`). Underneath, ``begin`` authorizes a payer and holds the most
the job can cost; the :class:`Charge` is then settled at a cost or cancelled (nothing is
charged, and a per-request token comes back whole as change). :meth:`Payments.run`
composes the steps for jobs that return at once.

Payers: an API key (``sk-…``), a token used as a key (first use redeems it into an
account keyed by the token's fingerprint), a per-request token (``X-Cashu`` or a DM
token: change is returned; one that cannot pay is refused before it is swapped, NUT-24), or a
Nostr pubkey's account. A per-request token's swap may run beside the upstream call
(:meth:`Payments.authorize` with a ``client``; the bounds: :mod:`nodeprov.core.overlap`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from nodeprov.core import journal
from nodeprov.core.account_moves import AccountMoves, api_key_account
from nodeprov.core.change import ChangePayouts
from nodeprov.core.charges import (
    Channel,
    Job,
    JobOutcome,
    Payer,
    PayerKind,
    PaymentFailed,
    Pending,
    Settled,
    decode_result,
    encode_result,
)
from nodeprov.core.child_keys import ChildKeys
from nodeprov.core.ledger import (
    Account,
    Hold,
    Ledger,
    Outcome,
)
from nodeprov.core.overlap import SwapOverlap
from nodeprov.core.pricing import Cost, Endpoint, Pricer
from nodeprov.core.wallet import Appraisal, Received, Sent, Wallet
from nodeprov.errors import (
    InsufficientBalance,
    InvalidToken,
    PaymentTooSmall,
    TokenAlreadySpent,
    Unauthorized,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint

logger = logging.getLogger(__name__)
T = TypeVar("T")
REDEEMED_KEPT = 10_000  # tokens-as-keys whose account is remembered (32-byte keys)
# How long a first use waits for another process's receive of the same token (its swap at
# the mint) before it answers that the token was spent; and how often it looks.
OTHER_RECEIVE_WAIT_SECONDS = 60.0
OTHER_RECEIVE_POLL_SECONDS = 0.05
__all__ = [
    "Charge",
    "JobOutcome",
    "Payer",
    "PayerKind",
    "PaymentFailed",
    "Payments",
    "Settled",
    "api_key_account",
]


@dataclass
class Charge:
    """An authorized job with its hold (use :meth:`Payments.job`, which closes it once)."""

    payments: Payments
    account_id: str
    hold: Hold
    max_cost: Cost
    model: str
    endpoint: Endpoint
    received: Received | None = None
    closed: bool = field(default=False)

    async def cancel(self) -> Sent | None:
        """Charge nothing; a per-request token is returned whole (minus mint fees) as change."""
        return await self.payments._cancel(self)


class Payments(AccountMoves):
    """Pricing, ledger and wallet behind one interface.

    ``renew_seconds``: how often a running job renews its hold's lease (default: a third
    of the lease, ``ledger.hold_timeout_seconds``). ``key_secret`` derives the API key a
    ``create`` token is worth (:mod:`nodeprov.core.key_secret`). ``overlap`` decides when a
    per-request token's swap runs beside the upstream call (default: on, 2 per client).
    """

    def __init__(
        self,
        ledger: Ledger,
        wallet: Wallet,
        pricer: Pricer,
        *,
        key_secret: bytes,
        renew_seconds: float | None = None,
        overlap: SwapOverlap | None = None,
    ) -> None:
        self.ledger = ledger
        self.wallet = wallet
        self.pricer = pricer
        self.renew_seconds = renew_seconds
        self.overlap = overlap or SwapOverlap()
        self.children = ChildKeys(ledger)  # child keys pay through the same holds
        self._key_secret = key_secret
        # Work in flight per key (a token's fingerprint, a money move's ref): (lock, users).
        self._serial: dict[str, tuple[asyncio.Lock, int]] = {}
        self.change = ChangePayouts(ledger, wallet, self._one_at_a_time)
        # SHA-256 of a token used as a key -> the account it was redeemed into.
        self._redeemed: OrderedDict[bytes, str] = OrderedDict()

    def derived_secret(self, purpose: str) -> bytes:
        """A secret for ``purpose`` derived from the node's API-key secret: the same in every
        process and on every machine that shares that secret (and so the books)."""
        return hmac.new(self._key_secret, b"nodeprov/derived/v1\0" + purpose.encode(),
                        hashlib.sha256).digest()  # fmt: skip

    # --- accounts (create_key, topup, deposit, balance, withdraw: AccountMoves) ----------

    async def account_for(self, payer: Payer) -> str:
        """The ledger account that pays for ``payer`` (redeeming a token-as-key on first use)."""
        if payer.kind == "api_key":
            account_id = api_key_account(payer.credential)
            account = await self.ledger.account(account_id)
            if account is None or account.revoked:
                raise Unauthorized("Unknown or revoked API key")
            return account_id
        if payer.kind == "npub":
            account_id = "npub:" + payer.credential
            await self.ledger.open_account(account_id, "npub")
            return account_id
        # A token once redeemed stays redeemed (a funded account is never dropped), so its
        # account id is remembered: later uses skip parsing the token and reading its account.
        # Nothing about the account's state is kept: the hold reads revocation, expiry and
        # balance in its own UPDATE, so a revocation anywhere applies to the next request.
        seen = hashlib.sha256(payer.credential.encode()).digest()
        known = self._redeemed.get(seen)
        if known is not None:
            self._redeemed.move_to_end(seen)
            return known
        fingerprint = token_fingerprint(parse_token(payer.credential))
        account_id = "token:" + fingerprint
        if await self._funded(account_id) is not None:
            return self._remember_redeemed(seen, account_id)
        # Without the lock a concurrent first use would find the account the receive opens
        # before the mint's swap credits it, and fail with "Current: 0 sats". A receive that
        # failed also leaves an empty account: only a funded one means "already redeemed".
        async with self._one_at_a_time("token:" + fingerprint):
            if await self._funded(account_id) is None:
                try:
                    await self.wallet.receive(payer.credential, account_id, "token")
                except TokenAlreadySpent:
                    # Another process redeemed it first, or is swapping it right now (another
                    # worker on this database): use the account it funds.
                    if await self._funded_elsewhere(account_id, fingerprint) is None:
                        raise
        return self._remember_redeemed(seen, account_id)

    async def _funded_elsewhere(self, account_id: str, fingerprint: str) -> Account | None:
        """The account once another process's receive of this token is done (None: it
        failed, or none is running). The lock in :meth:`account_for` is per process."""
        deadline = asyncio.get_running_loop().time() + OTHER_RECEIVE_WAIT_SECONDS
        while True:
            funded = await self._funded(account_id)
            if funded is not None:
                return funded
            op = await journal.op_by_ref(self.ledger.db, "receive", fingerprint, account_id)
            if op is None or op.state != "pending":
                return await self._funded(account_id)  # it may have finished just now
            if asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(OTHER_RECEIVE_POLL_SECONDS)

    def _remember_redeemed(self, seen: bytes, account_id: str) -> str:
        self._redeemed[seen] = account_id
        if len(self._redeemed) > REDEEMED_KEPT:
            self._redeemed.popitem(last=False)  # the least recently used
        return account_id

    # --- jobs -----------------------------------------------------------------------

    async def begin(
        self,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        endpoint: Endpoint = "chat",
        ref: str | None = None,
    ) -> Charge:
        """Price the request, authorize the payer and hold the maximum cost (for job ``ref``)."""
        charge = await self.authorize(payer, model, body, endpoint, ref)
        assert isinstance(charge, Charge)  # no client: never pending
        return charge

    async def authorize(
        self,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        endpoint: Endpoint = "chat",
        ref: str | None = None,
        *,
        client: str | None = None,
    ) -> Charge | Pending:
        """:meth:`begin`, or for a per-request token of ``client`` that may overlap its swap
        with the upstream call (:mod:`nodeprov.core.overlap`), the job :class:`Pending`."""
        max_cost = self.pricer.max_cost(model, body, endpoint)
        if payer.kind != "request_token":
            # Keys and pubkeys need no lookup first: the hold's conditional UPDATE finds the
            # account (or says why not), which keeps a paid request to two ledger round trips.
            if payer.kind == "api_key":
                account_id = api_key_account(payer.credential)
            elif payer.kind == "npub":
                account_id = "npub:" + payer.credential
            else:
                account_id = await self.account_for(payer)
            try:
                hold = await self.ledger.hold(account_id, max_cost.total_msat, model, ref)
            except Unauthorized:
                if payer.kind != "npub":
                    raise
                raise InsufficientBalance.of(0, max_cost.total_msat, "; deposit first") from None
            return Charge(self, account_id, hold, max_cost, model, endpoint)
        # NUT-24: a token that cannot pay is refused on what it says (mint, unit, amount less
        # the mint's input fee for its proofs) before any swap, so it stays the sender's.
        offer = await self.wallet.appraise(payer.credential)
        if offer.value_msat < max_cost.total_msat:
            raise PaymentTooSmall.for_token(
                offer.value_msat, offer.fee, offer.unit, max_cost.total_msat
            )
        take = partial(self._take, offer, max_cost, model, endpoint, ref)
        if client is None or not await self._may_overlap(offer, client):
            return await take()
        return self.overlap.pending(client, max_cost, take)

    async def _may_overlap(self, offer: Appraisal, client: str) -> bool:
        """Whether this token's swap may run beside the upstream call (takes a slot if so)."""
        overlap = self.overlap
        if not overlap.enabled:
            return False
        if overlap.failed_before(offer.proof_ids) or await self.wallet.seen_before(offer):
            overlap.known_spent += 1
            return False
        return overlap.take(client)

    async def _take(
        self,
        offer: Appraisal,
        max_cost: Cost,
        model: str,
        endpoint: Endpoint,
        ref: str | None,
    ) -> Charge:
        """Swap a per-request token into its own account and hold ``max_cost`` there."""
        account_id = "req:" + token_fingerprint(offer.token)
        try:
            received = await self.wallet.receive(offer, account_id, "request")
        except (TokenAlreadySpent, InvalidToken):
            self.overlap.failed(offer.proof_ids)  # next time it never starts an upstream call
            raise
        try:
            hold = await self.ledger.hold(account_id, max_cost.total_msat, model, ref)
        except InsufficientBalance:
            refund = await self.change.refund(account_id, received)
            raise PaymentFailed(
                InsufficientBalance.of(received.credited_msat, max_cost.total_msat),
                refund,
            ) from None
        return Charge(self, account_id, hold, max_cost, model, endpoint, received)

    def job(
        self,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        endpoint: Endpoint = "chat",
        *,
        ref: str | None = None,
        client: str | None = None,
    ) -> Job:
        """The charge lifecycle of one job (see :mod:`nodeprov.core.charges`).

        With ``client`` (who asks: an address, an npub) a per-request token's swap may run
        beside the upstream call; the caller must then call the upstream via ``job.start``.
        """
        return Job(self, payer, model, body, endpoint, ref, client)

    async def outcome(self, ref: str) -> JobOutcome | None:
        """What the job settled under ``ref`` cost (and the result kept with it), if any."""
        found = await self.ledger.outcome(ref)
        if found is None:
            return None
        cost = Cost(found.cost_msat, 0, found.input_msat, found.output_msat)
        return JobOutcome(found.ref, found.charged_msat, cost, decode_result(found.result))

    async def run(
        self,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        job: Callable[[], Awaitable[tuple[T, Mapping[str, Any]]]],
        endpoint: Endpoint = "chat",
    ) -> tuple[T, Settled]:
        """Pay for ``job`` (which returns its result and the upstream ``usage``)."""
        async with self.job(payer, model, body, endpoint) as paid:
            result, usage = await job()
            settled = await paid.settle(usage)
        return result, settled

    async def _settle(
        self,
        charge: Charge,
        cost: Cost,
        *,
        ref: str | None = None,
        result: Any = None,
        channel: Channel = "http",
    ) -> Settled:
        """Charge ``cost`` (at most the hold) and give change; ``ref`` records the outcome,
        ``channel`` is kept with the charge."""
        if charge.closed:
            raise RuntimeError("charge already closed")
        charge.closed = True
        record = None
        if ref is not None:
            record = Outcome(
                ref,
                charge.account_id,
                0,
                cost.total_msat,
                cost.input_msat,
                cost.output_msat,
                encode_result(result),
            )
        settlement = await self.ledger.settle(
            charge.hold, cost.total_msat, ref=ref or charge.model, record=record, channel=channel
        )
        change: Sent | None = None
        balance: int | None = None
        if charge.received is not None:
            change = await self.change.refund(charge.account_id, charge.received)
        else:
            balance = settlement.available_msat
        return Settled(cost, settlement.charged_msat, change, balance)

    async def _cancel(self, charge: Charge) -> Sent | None:
        if charge.closed:
            return None
        charge.closed = True
        await self.ledger.release(charge.hold)
        if charge.received is None:
            return None
        return await self.change.refund(charge.account_id, charge.received)

    async def account(self, account_id: str) -> Account | None:
        """An account as the channels may show it (balance, spent, last used)."""
        return await self.ledger.account(account_id)

    async def payment_in_flight(self, token: str) -> bool:
        """Whether a job paid by per-request ``token`` still holds money (change not yet due)."""
        return await self.change.in_flight(token)

    async def claim_change(self, token: str) -> list[str]:
        """Change tokens issued for a per-request token, issuing any still owed."""
        return await self.change.claim(token)
