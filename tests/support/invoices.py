"""BOLT11 invoices signed by a throwaway key, for tests that only need a well-formed one."""

from __future__ import annotations

import os
import time

import bolt11
from bolt11 import Bolt11, MilliSatoshi, TagChar, Tags


def make_invoice(
    amount_msat: int | None,
    currency: str = "bc",
    *,
    date: int | None = None,
    expiry_seconds: int | None = None,
) -> str:
    """A signed invoice for ``amount_msat`` on ``currency``'s network, made ``date`` (now)."""
    tags = Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "nodeprov test")
    if expiry_seconds is not None:
        tags.add(TagChar.expire_time, expiry_seconds)
    amount = MilliSatoshi(amount_msat) if amount_msat is not None else None
    made = int(time.time()) if date is None else date
    invoice = Bolt11(currency=currency, amount_msat=amount, date=made, tags=tags)
    return bolt11.encode(invoice, os.urandom(32).hex())
