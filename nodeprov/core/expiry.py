"""Refunding expired API keys to their Lightning address (LNURL-pay + a NUT-05 melt).

Each round finds ``api_key`` accounts past ``expires_at`` with a ``refund_address`` and an
available balance, asks the address for an invoice that fits the balance *with* the mint's
fee reserve and input fee, and melts it from the account (:class:`Melter`, journalled).
A failure leaves the balance where it was (claimable with the key, e.g. ``/v1/wallet/refund``)
and is retried after ``base * 2**(n-1)`` seconds (capped). What each key got is recorded in
``key_refunds``; a balance too small to send is left claimable and not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from nodeprov.config import Config
from nodeprov.core.db import Database
from nodeprov.core.ledger import now
from nodeprov.core.lnurl import lnurl_client
from nodeprov.core.melt import Melter, MeltQuote
from nodeprov.core.melt_sizing import quote_for_address
from nodeprov.core.money import check_unit, from_msat_floor, to_msat
from nodeprov.core.wallet import Wallet
from nodeprov.errors import NodeprovError

log = logging.getLogger(__name__)

LNURL_TIMEOUT_SECONDS = 15.0
# All of one refund's asking (LNURL requests and the mint's melt quotes) within a round:
# the address is a client's choice and must not stall the refunds due after it.
ADDRESS_SECONDS = 4 * LNURL_TIMEOUT_SECONDS


# Expired keys with an address and money, not in a melt, and due (new, or retry time
# reached, or a balance different from the one a final outcome left).
_DUE = """
SELECT a.id, a.refund_address, a.balance_msat - a.reserved_msat AS available
FROM accounts a LEFT JOIN key_refunds r ON r.account_id = a.id
WHERE a.kind = 'api_key' AND a.expires_at IS NOT NULL AND a.expires_at <= ?
  AND a.refund_address IS NOT NULL AND a.reserved_msat = 0 AND a.balance_msat > 0
  AND (r.account_id IS NULL OR (r.next_at <= ? AND NOT
       (r.state IN ('paid', 'too_small') AND r.balance_msat = a.balance_msat)))
  AND NOT EXISTS (SELECT 1 FROM wallet_ops w WHERE w.kind = 'melt' AND w.state = 'pending'
                  AND w.account_id = a.id)
ORDER BY a.expires_at
"""


class RefundTooSmall(NodeprovError):
    """The balance does not cover the smallest payment the address takes plus fees."""

    code = "refund_too_small"


class RefundStalled(NodeprovError):
    """Asking the address for an invoice took longer than a refund may (retried later)."""

    code = "refund_stalled"


@dataclass(frozen=True)
class RefundResult:
    """One attempt: ``paid``, ``pending``, ``failed`` or ``too_small``; amounts in msat."""

    account_id: str
    address: str
    state: str
    amount_msat: int = 0
    fee_msat: int = 0
    error: str | None = None


class HasWallet(Protocol):
    """What the service needs of the daemon's core."""

    wallet: Wallet
    config: Config


async def refund_record(db: Database, account_id: str) -> dict[str, Any] | None:
    """What the service last did for ``account_id`` (a ``key_refunds`` row), if anything."""
    row = await db.fetchone("SELECT * FROM key_refunds WHERE account_id = ?", (account_id,))
    return dict(row) if row else None


class ExpiryRefunder:
    """Rounds of refunds; failures back off per key (``retry_base_seconds``, doubling)."""

    def __init__(
        self,
        wallet: Wallet,
        *,
        retry_base_seconds: int = 60,
        retry_max_seconds: int = 6 * 3600,
        http: httpx.AsyncClient | None = None,
        private_hosts: bool = False,
        address_seconds: float = ADDRESS_SECONDS,
    ) -> None:
        self.wallet = wallet
        self.address_seconds = address_seconds
        # Refund addresses are chosen by clients: only public hosts, unless the operator
        # runs on a private network (wallet.refund_private_hosts).
        self.private_hosts = private_hosts
        self.db = wallet.ledger.db
        self.retry_base_seconds = retry_base_seconds
        self.retry_max_seconds = retry_max_seconds
        self._http = http
        self.results: list[RefundResult] = []

    async def round(self, at: int | None = None) -> list[RefundResult]:
        """Refund every due key once (``at``: the time to judge expiry and retries by)."""
        at = now() if at is None else at
        await self._reconcile()
        rows = await self.db.fetchall(_DUE, (at, at))
        results = []
        async with contextlib.AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(lnurl_client(LNURL_TIMEOUT_SECONDS))
            for row in rows:
                result = await self._refund(http, row["id"], row["refund_address"], at)
                results.append(result)
        self.results.extend(results)
        return results

    async def _refund(
        self, http: httpx.AsyncClient, account_id: str, address: str, at: int
    ) -> RefundResult:
        try:
            account = await self.wallet.ledger.account(account_id)
            available = account.available_msat if account else 0
            try:
                # Only the asking is cut short: it writes nothing, the melt below is journalled.
                async with asyncio.timeout(self.address_seconds):
                    quote = await self._sized_quote(http, address, available, account_id)
            except TimeoutError:
                raise RefundStalled(
                    f"{address} gave no payable invoice within {self.address_seconds:g} s"
                ) from None
            melted = await Melter(self.wallet).pay(account_id, quote, ref=f"refund:{account_id}")
        except RefundTooSmall as exc:
            result = RefundResult(account_id, address, "too_small", error=exc.message)
        except (NodeprovError, httpx.HTTPError) as exc:
            error = getattr(exc, "message", None) or repr(exc)
            result = RefundResult(account_id, address, "failed", error=error)
        else:
            amount = to_msat(quote.amount, quote.unit)
            fee = melted.cost_msat - amount if melted.state == "paid" else 0
            result = RefundResult(account_id, address, melted.state, amount, fee)
            await self._record(result, at, quote=quote.id)
            log.info("refunded expired key %s: %s %d msat to %s", account_id, melted.state,
                     amount, address)  # fmt: skip
            return result
        await self._record(result, at)
        log.warning("refund of expired key %s to %s: %s (%s)", account_id, address,
                    result.state, result.error)  # fmt: skip
        return result

    async def _record(self, result: RefundResult, at: int, quote: str | None = None) -> None:
        account = await self.wallet.ledger.account(result.account_id)
        balance = account.balance_msat if account else 0
        async with self.db.write() as conn:
            row = await (
                await conn.execute(
                    "SELECT failures FROM key_refunds WHERE account_id = ?", (result.account_id,)
                )
            ).fetchone()
            failures = (int(row[0]) if row else 0) + 1 if result.state == "failed" else 0
            wait = min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, failures - 1))
            await conn.execute(
                "INSERT INTO key_refunds (account_id, address, state, failures, next_at, "
                "balance_msat, refunded_msat, fees_msat, quote, error, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account_id) DO UPDATE SET "
                "address = excluded.address, state = excluded.state, "
                "failures = excluded.failures, next_at = excluded.next_at, "
                "balance_msat = excluded.balance_msat, "
                "refunded_msat = key_refunds.refunded_msat + excluded.refunded_msat, "
                "fees_msat = key_refunds.fees_msat + excluded.fees_msat, "
                "quote = COALESCE(excluded.quote, key_refunds.quote), error = excluded.error, "
                "updated_at = excluded.updated_at",
                (
                    result.account_id, result.address, result.state, failures,
                    at + wait if failures else at, balance,
                    result.amount_msat if result.state == "paid" else 0, result.fee_msat,
                    quote, result.error, now(),
                ),
            )  # fmt: skip

    async def _reconcile(self) -> None:
        """Bring ``pending`` rows up to date with their melt (settled by ``Melter.recover``)."""
        rows = await self.db.fetchall(
            "SELECT r.account_id, w.state, w.amount, w.unit, w.debit_msat FROM key_refunds r "
            "JOIN wallet_ops w ON w.kind = 'melt' AND w.quote = r.quote "
            "WHERE r.state = 'pending' AND w.state IN ('done', 'failed')"
        )
        for row in rows:
            account = await self.wallet.ledger.account(row["account_id"])
            paid = row["state"] == "done"
            amount = to_msat(int(row["amount"]), check_unit(row["unit"])) if paid else 0
            async with self.db.write() as conn:
                await conn.execute(
                    "UPDATE key_refunds SET state = ?, refunded_msat = refunded_msat + ?, "
                    "balance_msat = ?, updated_at = ? WHERE account_id = ?",
                    (
                        "paid" if paid else "failed", amount,
                        account.balance_msat if account else 0, now(), row["account_id"],
                    ),
                )  # fmt: skip

    async def _sized_quote(
        self, http: httpx.AsyncClient, address: str, available_msat: int, account_id: str
    ) -> MeltQuote:
        """An invoice from ``address`` whose amount, fee reserve and input fee fit the balance."""
        mint_url, unit = await self.wallet.choose_pool(available_msat, None, None, account_id)
        budget = from_msat_floor(available_msat, unit)
        quote = await quote_for_address(
            self.wallet, http, address, (mint_url, unit), budget, trust_host=self.private_hosts
        )
        if quote is None:
            raise RefundTooSmall(
                f"{available_msat} msat do not cover the smallest payment {address} accepts"
                " plus the mint's fees"
            )
        return quote

    async def run(self, stop: asyncio.Event, interval: float = 60.0) -> None:
        """Rounds every ``interval`` seconds until ``stop``; a failed round is logged."""
        while not stop.is_set():
            try:
                await self.round()
            except Exception:
                log.exception("expired-key refunds failed; retrying in %.0f s", interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


async def refund_expired_keys(core: HasWallet, stop: asyncio.Event) -> None:
    """Daemon service: refund expired keys every ``wallet.expiry_check_seconds`` (if enabled)."""
    settings = core.config.wallet
    if not settings.refund_expired:
        await stop.wait()
        return
    refunder = ExpiryRefunder(core.wallet, private_hosts=settings.refund_private_hosts)
    await refunder.run(stop, interval=float(settings.expiry_check_seconds))
