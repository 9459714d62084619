"""Sizing a Lightning payment so that it fits a budget *with* the mint's fees.

A melt debits ``amount + fee_reserve + input_fee``. The invoice is first requested for the
whole budget and quoted; if amount, reserve and input fee together exceed the budget, it is
requested again for ``amount - excess`` (at most a few rounds; invoices never paid cost
nothing). Used by operator payouts and by refunds of expired keys.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from nodeprov.core.denominations import covering_subset
from nodeprov.core.lnurl import request_invoice, resolve
from nodeprov.core.melt import Melter, MeltQuote
from nodeprov.core.money import Unit, ceil_div, from_msat_floor, to_msat
from nodeprov.core.wallet import Wallet

SIZING_ROUNDS = 4

InvoiceFor = Callable[[int], Awaitable[str]]  # msat -> bolt11 (LNURL-pay callback)


async def sized_quote(
    wallet: Wallet,
    mint_url: str,
    unit: Unit,
    budget: int,
    sendable_msat: tuple[int, int],
    invoice_for: InvoiceFor,
) -> MeltQuote | None:
    """A melt quote whose amount, fee reserve and input fee fit ``budget`` (in ``unit``).

    ``sendable_msat`` is the payee's (min, max); ``invoice_for`` fetches an invoice for an
    amount in msat. None if no amount the payee takes fits with the fees.
    """
    low, high = sendable_msat
    melter = Melter(wallet)
    target = min(budget, from_msat_floor(high, unit))
    for _ in range(SIZING_ROUNDS):
        if target <= 0 or to_msat(target, unit) < low:
            return None
        invoice = await invoice_for(to_msat(target, unit))
        quote = await melter.quote(invoice, mint_url=mint_url, unit=unit)
        fee = await input_fee(wallet, mint_url, unit, quote.amount + quote.reserve)
        over = quote.amount + quote.reserve + fee - budget
        if over <= 0:
            return quote
        target = quote.amount - over
    return None


async def quote_for_address(
    wallet: Wallet,
    http: httpx.AsyncClient,
    address: str,
    pool: tuple[str, Unit],
    budget: int,
    *,
    trust_host: bool = True,
) -> MeltQuote | None:
    """:func:`sized_quote` for a Lightning address (LNURL-pay through the guarded fetch).

    ``trust_host`` as in :func:`nodeprov.core.lnurl.resolve`: False for addresses clients chose.
    """
    request = await resolve(http, address, trust_host=trust_host)
    return await sized_quote(
        wallet, pool[0], pool[1], budget,
        (request.min_sendable_msat, request.max_sendable_msat),
        lambda msat: request_invoice(http, request, msat),
    )  # fmt: skip


async def input_fee(wallet: Wallet, mint_url: str, unit: Unit, target: int) -> int:
    """The mint's input fee for proofs covering ``target``, as :meth:`Melter.pay` picks them.

    Uses the highest fee of the pool's keysets, so the estimate is never low.
    """
    rows = await wallet.ledger.db.fetchall(
        "SELECT amount, COUNT(*), MAX(keyset_id) FROM proofs "
        "WHERE mint_url = ? AND unit = ? AND state = 'unspent' GROUP BY amount",
        (mint_url, unit),
    )
    pool = {int(r[0]): int(r[1]) for r in rows}
    ppk = max([(await wallet.keyset(mint_url, str(r[2]))).fee_ppk for r in rows] or [0])
    fee = 0
    for _ in range(SIZING_ROUNDS):
        chosen = covering_subset(pool, target + fee)
        if chosen is None:
            return fee
        new_fee = ceil_div(ppk * sum(chosen.values()), 1000)
        if new_fee == fee:
            break
        fee = new_fee
    return fee
