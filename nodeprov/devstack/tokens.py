"""Demo tokens: fresh ecash from the local FakeWallet mint (its Lightning invoices pay themselves).

Uses the node's own mint API and the wallet's blinding; no third-party wallet involved.
"""

from __future__ import annotations

import asyncio

from nodeprov.core.denominations import binary_split
from nodeprov.core.wallet import Wallet
from nodeprov.errors import MintError
from nodeprov.protocol.cashu_token import Token, serialize_token

PAID_STATES = ("PAID", "ISSUED")
QUOTE_WAIT_SECONDS = 10.0


async def mint_token(
    wallet: Wallet, mint_url: str, amount: int, unit: str = "sat", *, memo: str | None = None
) -> str:
    """A fresh ``cashuB`` token of exactly ``amount`` ``unit`` minted at ``mint_url``."""
    if amount <= 0:
        raise ValueError("amount must be positive")
    api = wallet.api(mint_url)
    keyset = await wallet.active_keyset(mint_url, unit)
    quote = await api.mint_quote(amount, unit)
    quote_id = str(quote["quote"])
    deadline = asyncio.get_running_loop().time() + QUOTE_WAIT_SECONDS
    while str(quote.get("state", "")).upper() not in PAID_STATES and not quote.get("paid"):
        if asyncio.get_running_loop().time() > deadline:
            raise MintError(
                f"the mint {api.url} did not mark the quote paid; is it a FakeWallet mint?"
            )
        await asyncio.sleep(0.1)
        quote = await api.mint_quote_state(quote_id)
    outputs = wallet.make_outputs(keyset, binary_split(amount), role="send")
    signatures = await api.mint(quote_id, [o.to_wire() for o in outputs])
    proofs = wallet.unblind_signatures(keyset, outputs, signatures)
    return serialize_token(Token(api.url, unit, tuple(proofs), memo))
