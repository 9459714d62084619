"""LNURL-pay pieces: Lightning address parsing, payRequest validation, invoice amounts.

Invoices are made with the ``bolt11`` package (a dependency of cashu), an implementation
independent of ours, and decoded by both.
"""

from __future__ import annotations

from typing import Any

import bolt11
import pytest

from nodeprov.core.lnurl import (
    LnurlError,
    PayRequest,
    address_url,
    callback_url,
    invoice_amount_msat,
    parse_invoice_response,
    parse_pay_request,
)
from tests.support.invoices import make_invoice

PAY_REQUEST: dict[str, Any] = {
    "tag": "payRequest",
    "callback": "https://pay.example.com/lnurlp/cb/alice?k=1",
    "minSendable": 1000,
    "maxSendable": 5_000_000,
    "metadata": '[["text/plain","alice"]]',
}


# --- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("alice@example.com", "https://example.com/.well-known/lnurlp/alice"),
        ("Alice.B+tips@Pay.Example.com", "https://pay.example.com/.well-known/lnurlp/alice.b+tips"),
        ("  bob_1@example.org ", "https://example.org/.well-known/lnurlp/bob_1"),
        ("op@127.0.0.1:8123", "http://127.0.0.1:8123/.well-known/lnurlp/op"),
        ("op@localhost:9", "http://localhost:9/.well-known/lnurlp/op"),
        ("op@example.com:8443", "https://example.com:8443/.well-known/lnurlp/op"),
    ],
)
def test_address_url(address: str, url: str) -> None:
    assert address_url(address) == url


@pytest.mark.parametrize(
    "address",
    [
        "",
        "alice",
        "@example.com",
        "alice@",
        "alice@example",
        "a b@example.com",
        "alice@ex/ample.com",
        "al?ce@example.com",
        "alice@@example.com",
        "alice@exa mple.com",
    ],
)
def test_bad_addresses(address: str) -> None:
    with pytest.raises(LnurlError, match="not a Lightning address"):
        address_url(address)


# --- payRequest ------------------------------------------------------------------------


def test_pay_request_parsed() -> None:
    request = parse_pay_request(PAY_REQUEST)
    assert request == PayRequest(
        PAY_REQUEST["callback"], 1000, 5_000_000, '[["text/plain","alice"]]'
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"tag": "withdrawRequest"}, "not a payRequest"),
        ({"callback": None}, "no callback"),
        ({"callback": "http://pay.example.com/cb"}, "not an https URL"),
        ({"callback": "ftp://pay.example.com/cb"}, "not an https URL"),
        ({"minSendable": -1}, "no valid minSendable"),
        ({"minSendable": 1.5}, "no valid minSendable"),
        ({"maxSendable": None}, "no valid maxSendable"),
        ({"minSendable": 0}, "is not valid"),
        ({"minSendable": 6_000_000}, "is not valid"),
    ],
)
def test_pay_request_rejected(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(LnurlError, match=needle):
        parse_pay_request(PAY_REQUEST | change)


def test_pay_request_error_status_and_junk() -> None:
    with pytest.raises(LnurlError, match="refused: no such user"):
        parse_pay_request({"status": "ERROR", "reason": "no such user"})
    for junk in (None, [], "payRequest", 5):
        with pytest.raises(LnurlError):
            parse_pay_request(junk)


def test_local_http_callback_allowed_and_string_amounts() -> None:
    data = PAY_REQUEST | {"callback": "http://127.0.0.1:5000/cb", "minSendable": "1000"}
    assert parse_pay_request(data).min_sendable_msat == 1000


def test_callback_url_adds_amount_and_keeps_query() -> None:
    request = parse_pay_request(PAY_REQUEST | {"callback": "https://p.example.com/cb?k=1&amount=9"})
    assert callback_url(request, 21_000) == "https://p.example.com/cb?k=1&amount=21000"
    assert callback_url(request, 1000).endswith("amount=1000")
    assert callback_url(request, 5_000_000).endswith("amount=5000000")
    for outside in (999, 5_000_001):
        with pytest.raises(LnurlError, match="outside what the address accepts"):
            callback_url(request, outside)


# --- invoices --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount", [1, 10, 999, 1000, 2500, 21_000, 150_000, 100_000_000, 123_456_789, 10**11]
)
def test_invoice_amount_matches_bolt11_package(amount: int) -> None:
    invoice = make_invoice(amount)
    assert invoice_amount_msat(invoice) == amount
    assert bolt11.decode(invoice, strict=False).amount_msat == amount
    assert invoice_amount_msat(invoice.upper()) == amount
    assert invoice_amount_msat("lightning:" + invoice) == amount


def test_invoice_without_amount_and_other_networks() -> None:
    assert invoice_amount_msat(make_invoice(None)) is None
    assert invoice_amount_msat(make_invoice(5000, currency="bcrt")) == 5000
    assert invoice_amount_msat(make_invoice(5000, currency="tb")) == 5000


def test_corrupted_invoices_rejected() -> None:
    invoice = make_invoice(21_000)
    flipped = invoice[:-8] + ("q" if invoice[-8] != "q" else "p") + invoice[-7:]
    with pytest.raises(LnurlError, match="not a valid BOLT11"):
        invoice_amount_msat(flipped)
    # The amount itself is covered by the checksum: 21n -> 31n is caught.
    with pytest.raises(LnurlError, match="not a valid BOLT11"):
        invoice_amount_msat(invoice.replace("lnbc210n", "lnbc310n", 1))
    with pytest.raises(LnurlError, match="mixes upper and lower"):
        invoice_amount_msat(invoice[:10] + invoice[10:].upper())
    for junk in (
        "",
        "lnbc",
        "hello world",
        "cashuBxyz",
        "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
    ):
        with pytest.raises(LnurlError):
            invoice_amount_msat(junk)


def test_invoice_response_amount_must_match() -> None:
    invoice = make_invoice(21_000)
    assert parse_invoice_response({"pr": invoice, "routes": []}, 21_000) == invoice
    with pytest.raises(LnurlError, match="invoice is for 22000 msat, not the 21000 msat"):
        parse_invoice_response({"pr": make_invoice(22_000)}, 21_000)
    with pytest.raises(LnurlError, match="invoice is for no amount"):
        parse_invoice_response({"pr": make_invoice(None)}, 21_000)
    with pytest.raises(LnurlError, match="sent no invoice"):
        parse_invoice_response({"routes": []}, 21_000)
    with pytest.raises(LnurlError, match="refused the invoice request: amount too big"):
        parse_invoice_response({"status": "ERROR", "reason": "amount too big"}, 21_000)
    with pytest.raises(LnurlError, match="not a valid BOLT11"):
        parse_invoice_response({"pr": invoice[:-1] + ("q" if invoice[-1] != "q" else "p")}, 21_000)
