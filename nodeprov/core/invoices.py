"""BOLT11 invoices the node is asked to pay: decoded by the ``bolt11`` package, then checked.

A payout, a refund to a Lightning address or an operator's pasted invoice is decoded here
before any mint is asked for a melt quote, so a malformed, expired or wrong-network invoice
is a clear 400 naming the reason, not a mint error. The signature is verified by the
decoder (it recovers the payee's key from it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import bolt11
from bolt11.exceptions import Bolt11Exception

from nodeprov.errors import NodeprovError

# BOLT11's currency prefixes and the networks they name.
NETWORKS = {"bc": "bitcoin", "tb": "testnet", "tbs": "signet", "bcrt": "regtest", "sb": "simnet"}


class InvalidInvoice(NodeprovError):
    """A Lightning invoice that cannot be paid: malformed, expired or for another network."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_invoice"


@dataclass(frozen=True)
class Invoice:
    """A decoded BOLT11 invoice: amount (None when the payer chooses), network, expiry."""

    text: str
    amount_msat: int | None
    network: str
    created_at: int
    expires_at: int
    payment_hash: str


def decode_invoice(text: str) -> Invoice:
    """The invoice in ``text`` (``lightning:`` prefix allowed), or :class:`InvalidInvoice`."""
    invoice = text.strip()
    if invoice.lower().startswith("lightning:"):
        invoice = invoice[len("lightning:") :]
    # Bech32 forbids mixed case (BIP-173); the decoder lowercases without looking.
    if invoice.lower() != invoice and invoice.upper() != invoice:
        raise InvalidInvoice("the invoice mixes upper and lower case")
    invoice = invoice.lower()
    if not invoice.startswith("ln"):
        raise InvalidInvoice("that is not a BOLT11 Lightning invoice (it starts with lnbc…)")
    try:
        decoded = bolt11.decode(invoice)
    except (Bolt11Exception, ValueError, TypeError, KeyError, IndexError) as exc:
        reason = str(exc) or type(exc).__name__
        raise InvalidInvoice(f"that is not a valid BOLT11 invoice ({reason})") from None
    network = NETWORKS.get(decoded.currency)
    if network is None:
        raise InvalidInvoice(f"the invoice is for an unknown network ({decoded.currency!r})")
    amount = int(decoded.amount_msat) if decoded.amount_msat is not None else None
    return Invoice(
        text=invoice,
        amount_msat=amount,
        network=network,
        created_at=decoded.date,
        expires_at=decoded.expiry_time,
        payment_hash=decoded.payment_hash or "",
    )


def payable_invoice(text: str, *, now: float | None = None) -> Invoice:
    """:func:`decode_invoice`, refusing an invoice that has already expired."""
    invoice = decode_invoice(text)
    moment = time.time() if now is None else now
    if invoice.expires_at <= moment:
        ago = int(moment - invoice.expires_at)
        raise InvalidInvoice(f"the invoice expired {ago} s ago; ask the payee for a new one")
    return invoice
