"""BOLT11 invoices the node pays: decoded by the bolt11 package, then checked for expiry."""

from __future__ import annotations

import time

import pytest

from nodeprov.core.invoices import InvalidInvoice, decode_invoice, payable_invoice
from tests.support.invoices import make_invoice


@pytest.mark.parametrize(
    ("currency", "network"),
    [("bc", "bitcoin"), ("tb", "testnet"), ("tbs", "signet"), ("bcrt", "regtest")],
)
def test_network_named_from_the_currency_prefix(currency: str, network: str) -> None:
    assert decode_invoice(make_invoice(21_000, currency)).network == network


def test_amount_expiry_and_payment_hash_decoded() -> None:
    invoice = decode_invoice("lightning:" + make_invoice(21_000, date=1_800_000_000))
    assert invoice.amount_msat == 21_000
    assert invoice.created_at == 1_800_000_000
    assert invoice.expires_at == 1_800_000_000 + 3600  # BOLT11's default expiry
    assert len(invoice.payment_hash) == 64
    assert decode_invoice(make_invoice(None)).amount_msat is None
    short = make_invoice(1000, date=1_800_000_000, expiry_seconds=60)
    assert decode_invoice(short).expires_at == 1_800_000_060


def test_expired_invoice_refused_with_the_reason() -> None:
    invoice = make_invoice(21_000, date=int(time.time()) - 7200)
    with pytest.raises(InvalidInvoice, match=r"expired .* ago; ask the payee for a new one") as err:
        payable_invoice(invoice)
    assert err.value.status == 400 and err.value.code == "invalid_invoice"
    fresh = make_invoice(21_000, date=1_800_000_000, expiry_seconds=60)
    assert payable_invoice(fresh, now=1_800_000_059).amount_msat == 21_000
    with pytest.raises(InvalidInvoice, match="expired 1 s ago"):
        payable_invoice(fresh, now=1_800_000_061)


@pytest.mark.parametrize(
    "junk", ["", "lnbc", "hello world", "cashuBxyz", "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq"]
)
def test_not_an_invoice_is_a_clear_400(junk: str) -> None:
    with pytest.raises(InvalidInvoice):
        decode_invoice(junk)


def test_corrupted_or_mixed_case_invoice_refused() -> None:
    invoice = make_invoice(21_000)
    with pytest.raises(InvalidInvoice, match="not a valid BOLT11"):
        decode_invoice(invoice.replace("lnbc210n", "lnbc310n", 1))  # the checksum covers it
    with pytest.raises(InvalidInvoice, match="mixes upper and lower"):
        decode_invoice(invoice[:10] + invoice[10:].upper())
    assert decode_invoice(invoice.upper()).amount_msat == 21_000
