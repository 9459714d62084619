"""The channels (HTTP, Nostr) move money through ``Payments`` alone.

No SQL on the wallet journal (``wallet_ops``) and no reaching past ``Payments`` into its
wallet or ledger from ``nodeprov/http`` or ``nodeprov/nostr``: deposits, balances,
withdrawals and change claims are ``Payments`` methods, so their rules live in one place.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "nodeprov"
CHANNELS = ("http", "nostr")
FORBIDDEN = {
    "wallet_ops": re.compile(r"\bwallet_ops\b"),
    "payments.wallet": re.compile(r"\bpayments\.wallet\b"),
    "payments.ledger": re.compile(r"\bpayments\.ledger\b"),
}


def channel_sources() -> list[Path]:
    return sorted(p for channel in CHANNELS for p in (ROOT / channel).rglob("*.py"))


def test_the_check_sees_the_channel_modules() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in channel_sources()}
    assert {"http/wallet_routes.py", "nostr/dm_handlers.py", "http/admin/pages.py"} <= names


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_channels_reach_money_only_through_payments(what: str) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in channel_sources()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if FORBIDDEN[what].search(line)
    ]
    assert found == [], f"{what} used in a channel: {found}"
