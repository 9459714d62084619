"""Paying operator earnings to a Lightning address (LNURL-pay + a NUT-05 melt), recorded.

Sizing: the invoice must fit the earnings *with* the mint's fees, because the melt debits
the operator ``amount + fee_reserve + input_fee`` (``core.melt_sizing``, shared with the
refunds of expired keys). The unused fee reserve comes back as melt change.

One payout melts at one mint: the (mint, unit) pool holding the most; earnings beyond
what that pool holds wait for the next payout. Every attempt is a row in ``payouts``
(started -> paid | pending | failed); the money side is the melt journal, tagged
``ref = payout:<id>``. A pending melt is settled by :meth:`Melter.recover` on the
service's start, which then brings the rows up to date.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import httpx

from nodeprov.core import liabilities
from nodeprov.core.db import Database
from nodeprov.core.ledger import OPERATOR, now
from nodeprov.core.lnurl import lnurl_client
from nodeprov.core.melt import Melter, MeltQuote
from nodeprov.core.melt_sizing import quote_for_address
from nodeprov.core.money import Unit, check_unit, from_msat_floor, to_msat
from nodeprov.core.node import Core, Service
from nodeprov.core.wallet import Wallet
from nodeprov.errors import InsufficientBalance, NodeprovError

log = logging.getLogger(__name__)

LNURL_TIMEOUT_SECONDS = 15.0
STALE_START_SECONDS = 3600  # a 'started' row this old was cut short by a crash


_locks: weakref.WeakKeyDictionary[Database, asyncio.Lock] = weakref.WeakKeyDictionary()


class PayoutError(NodeprovError):
    """A payout that cannot be made now (nothing to pay, fees too high); nothing was spent."""

    status = 400
    type = "payout_error"
    code = "payout_failed"


@dataclass(frozen=True)
class PayoutResult:
    """One payout: ``state`` paid or pending; ``fee_msat`` is what it cost beyond the amount."""

    id: int
    address: str
    state: str
    amount_msat: int
    fee_msat: int
    cost_msat: int
    mint_url: str
    unit: str
    quote: str


async def _update(db: Database, payout_id: int, **values: Any) -> None:
    sets = ", ".join(f"{key} = ?" for key in values)
    async with db.write() as conn:
        await conn.execute(
            f"UPDATE payouts SET {sets}, updated_at = ? WHERE id = ?",
            (*values.values(), now(), payout_id),
        )


async def recent_payouts(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    """The newest payout rows, for the CLI and the admin pages."""
    rows = await db.fetchall("SELECT * FROM payouts ORDER BY id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


async def _pool(wallet: Wallet, mint_url: str | None) -> tuple[str, Unit, int]:
    """The trusted (mint, unit) pool the operator may take the most from, in msat.

    What a pool owes users stays in it (``core.liabilities``): the amount returned is what
    is left of the pool after that.
    """
    for pool, unit, free in await liabilities.payout_pools(wallet.ledger.db, wallet.mints):
        if mint_url is None or pool == mint_url.rstrip("/"):
            if free <= 0:
                break
            return pool, check_unit(unit), free
    raise PayoutError("the node holds no proofs to pay out from beyond what it owes users")


async def _sized_quote(
    core: Core, http: httpx.AsyncClient, address: str, budget_msat: int, mint_url: str | None
) -> MeltQuote:
    """Get an invoice from ``address`` and a melt quote that fit ``budget_msat`` with fees."""
    mint, unit, pool_msat = await _pool(core.wallet, mint_url)
    budget = from_msat_floor(min(budget_msat, pool_msat), unit)
    quote = await quote_for_address(core.wallet, http, address, (mint, unit), budget)
    if quote is None:
        raise PayoutError(
            f"{budget_msat} msat of earnings do not cover the smallest payment {address} accepts"
            " plus the mint's fee reserve"
        )
    return quote


async def payout_now(
    core: Core,
    address: str | None = None,
    amount_msat: int | None = None,
    *,
    mint_url: str | None = None,
) -> PayoutResult:
    """Pay ``amount_msat`` (default: all operator earnings, fees included) to ``address``."""
    address = address or core.config.payouts.lightning_address
    if not address:
        raise PayoutError("no Lightning address: pass one or set payouts.lightning_address")
    db = core.ledger.db
    async with _locks.setdefault(db, asyncio.Lock()):
        operator = await core.ledger.account(OPERATOR)
        available = operator.available_msat if operator else 0
        budget = available if amount_msat is None else amount_msat
        if budget <= 0:
            raise PayoutError("there are no earnings to pay out")
        if budget > available:
            raise InsufficientBalance(f"the operator has {available} msat, not {budget} msat")
        async with db.write() as conn:
            cursor = await conn.execute(
                "INSERT INTO payouts (created_at, updated_at, address, budget_msat, state) "
                "VALUES (?, ?, ?, ?, 'started') RETURNING id",
                (now(), now(), address, budget),
            )
            (payout_id,) = await cursor.fetchone()
        try:
            return await _pay(core, payout_id, address, budget, mint_url)
        except BaseException as exc:
            message = exc.message if isinstance(exc, NodeprovError) else repr(exc)
            # A melt the mint may have started is never marked failed: recovery decides it.
            row = await _melt_op(db, payout_id)
            if row is None or row["state"] == "failed":
                await _update(db, payout_id, state="failed", error=message[:500])
            raise


async def _pay(
    core: Core, payout_id: int, address: str, budget: int, mint_url: str | None
) -> PayoutResult:
    async with lnurl_client(LNURL_TIMEOUT_SECONDS) as http:
        for _ in range(2):  # once more if the input fee came out higher than estimated
            quote = await _sized_quote(core, http, address, budget, mint_url)
            amount_msat = to_msat(quote.amount, quote.unit)
            await _update(
                core.ledger.db, payout_id, amount_msat=amount_msat, mint_url=quote.mint_url,
                unit=quote.unit, quote=quote.id,
            )  # fmt: skip
            try:
                melted = await Melter(core.wallet).pay(OPERATOR, quote, ref=f"payout:{payout_id}")
                break
            except InsufficientBalance:  # rare: shrink a little and size again
                budget -= max(to_msat(1, quote.unit), budget // 100)
        else:
            raise PayoutError("the mint's fees changed while sizing the payout; try again")
    cost = melted.cost_msat
    await _update(core.ledger.db, payout_id, state=melted.state, cost_msat=cost)
    log.info(
        "payout %d to %s: %s, %d msat + %d msat fees",
        payout_id, address, melted.state, amount_msat, cost - amount_msat,
    )  # fmt: skip
    return PayoutResult(
        payout_id, address, melted.state, amount_msat, cost - amount_msat, cost,
        quote.mint_url, quote.unit, quote.id,
    )  # fmt: skip


async def _melt_op(db: Database, payout_id: int) -> Any:
    return await db.fetchone(
        "SELECT id, state FROM wallet_ops WHERE kind = 'melt' AND ref = ? ORDER BY id DESC",
        (f"payout:{payout_id}",),
    )


async def reconcile(core: Core, *, recover: bool = True) -> dict[str, int]:
    """Settle melts left pending by an earlier run, then bring payout rows up to date; counts.

    ``recover`` asks the mint about melts last touched before now (:meth:`Melter.recover`);
    only safe when no melt of this process is in flight, i.e. at start-up. On a shared
    (PostgreSQL) ledger only melts old enough to be abandoned: a younger one may be another
    worker's, journalled but not yet at the mint, which would report it unpaid.
    """
    db = core.ledger.db
    outcome: dict[str, int] = {}
    if recover:
        before = now()
        if core.config.ledger_on_postgres:
            before -= 2 * int(core.config.wallet.mint_timeout_seconds) + 60
        settled = await Melter(core.wallet).recover(older_than=before)
        outcome = {f"melt_{k}": v for k, v in settled.items()}
    rows = await db.fetchall(
        "SELECT id, state, created_at FROM payouts WHERE state IN ('started', 'pending')"
    )
    for row in rows:
        op = await _melt_op(db, row["id"])
        if op is None:
            if row["created_at"] <= now() - STALE_START_SECONDS:
                await _update(db, row["id"], state="failed", error="interrupted before the melt")
                outcome["payout_failed"] = outcome.get("payout_failed", 0) + 1
            continue
        state = {"done": "paid", "failed": "failed"}.get(op["state"], "pending")
        if state == row["state"]:
            continue
        spent = await db.fetchone(
            "SELECT -COALESCE(SUM(delta_msat), 0) FROM transactions "
            "WHERE account_id = ? AND ref = ?",
            (OPERATOR, f"payout:{row['id']}"),
        )
        await _update(db, row["id"], state=state, cost_msat=int(spent[0]) if spent else 0)
        outcome[f"payout_{state}"] = outcome.get(f"payout_{state}", 0) + 1
    if outcome:
        log.info("payout recovery: %s", ", ".join(f"{k}={v}" for k, v in sorted(outcome.items())))
    return outcome


class PayoutService:
    """Every interval, pay earnings at or above the threshold; back off after failures.

    The wait after ``n`` consecutive failures is ``retry_base_seconds * 2**(n-1)``, capped
    at the interval. State is kept on the object for status pages and tests.
    """

    def __init__(self, retry_base_seconds: float = 30.0) -> None:
        self.retry_base_seconds = retry_base_seconds
        self.recovered: dict[str, int] | None = None
        self.failures = 0
        self.attempts = 0
        self.last_error: str | None = None
        self.results: list[PayoutResult] = []

    def delay(self, interval: float) -> float:
        """Seconds until the next round: the interval, or the backoff after failures."""
        if not self.failures:
            return interval
        return float(min(interval, self.retry_base_seconds * 2 ** (self.failures - 1)))

    async def round(self, core: Core) -> PayoutResult | None:
        """One check: pay out if the earnings reach the threshold (errors propagate)."""
        await reconcile(core, recover=False)
        operator = await core.ledger.account(OPERATOR)
        earned = operator.available_msat if operator else 0
        if earned < core.config.payouts.threshold_msat:
            return None
        self.attempts += 1
        return await payout_now(core, core.config.payouts.lightning_address)

    async def run(self, core: Core, stop: asyncio.Event) -> None:
        """Recover, then run rounds until ``stop`` (a :data:`~nodeprov.core.node.Service`)."""
        self.recovered = await reconcile(core)
        settings = core.config.payouts
        if not settings.lightning_address:
            log.info("payouts off (no payouts.lightning_address)")
            await stop.wait()
            return
        log.info(
            "payouts to %s above %d msat, checked every %d s",
            settings.lightning_address, settings.threshold_msat, settings.interval_seconds,
        )  # fmt: skip
        wait = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
            if stop.is_set():
                return
            try:
                result = await self.round(core)
            except Exception as exc:  # a failed round is retried, it never stops the daemon
                self.failures += 1
                self.last_error = exc.message if isinstance(exc, NodeprovError) else repr(exc)
                wait = self.delay(settings.interval_seconds)
                log.warning(
                    "payout failed (%s); retrying in %.1f s", self.last_error, wait,
                    exc_info=not isinstance(exc, NodeprovError),
                )  # fmt: skip
                continue
            self.failures, self.last_error = 0, None
            if result is not None:
                self.results.append(result)
            wait = self.delay(settings.interval_seconds)

    def service(self) -> Service:
        """This object as a daemon service (a named coroutine function)."""

        async def payout_service(core: Core, stop: asyncio.Event) -> None:
            await self.run(core, stop)

        return payout_service


async def payout_service(core: Core, stop: asyncio.Event) -> None:
    """Automatic payouts with the default backoff (add this to ``daemon.run``'s services)."""
    await PayoutService().run(core, stop)
