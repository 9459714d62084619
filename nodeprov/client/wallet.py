"""The user's wallet: a nodeprov wallet (journalled proofs in SQLite) with one account, "client".

Receive, send, crash recovery and the audit are the node's own code; this module adds
minting from a Lightning quote, remembering mints, sizing payments for a provider (whose
input fee on receiving is paid on top) and taking change back exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from nodeprov.core import journal
from nodeprov.core.denominations import complete_split
from nodeprov.core.keysets import MintKeysets
from nodeprov.core.ledger import Ledger, ensure_account, open_ledger
from nodeprov.core.mint_api import MintApi
from nodeprov.core.money import UNITS, Unit, ceil_div, check_unit, from_msat_ceil, to_msat
from nodeprov.core.wallet import Received, Sent, Wallet
from nodeprov.errors import (
    InsufficientBalance,
    MintError,
    MintUnavailable,
    NodeprovError,
    TokenAlreadySpent,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint

ACCOUNT = "client"
ENV_DATA_DIR = "NODEPROV_CLIENT_DIR"
DEFAULT_DATA_DIR = Path("~/.nodeprov-client")
MINTS_FILE = "mints.json"
DB_FILE = "wallet.sqlite3"


def data_dir(path: str | Path | None = None) -> Path:
    """The wallet folder: ``path``, else ``$NODEPROV_CLIENT_DIR``, else ``~/.nodeprov-client``."""
    chosen = Path(path or os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser()
    chosen.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the proofs: money
    return chosen


def _norm(url: str) -> str:
    return url.rstrip("/")


@dataclass(frozen=True)
class ChangeResult:
    """What came of a change token: credited msat, or why nothing was credited."""

    credited_msat: int
    status: str  # "received", "duplicate" (already in the wallet), "spent", "invalid"
    message: str = ""


class ClientWallet(Wallet):
    """Proofs of the user at any mint it chose to trust; one ledger account holds them."""

    def __init__(self, ledger: Ledger, mints: Sequence[str], client: httpx.AsyncClient) -> None:
        super().__init__(ledger, mints, UNITS, client)
        self.http = client
        self.dir: Path | None = None

    @classmethod
    async def open(cls, path: str | Path | None = None, *, http_s: float = 15.0) -> ClientWallet:
        """Open (or create) the wallet in ``path``; finishes anything a crash interrupted."""
        folder = data_dir(path)
        ledger = await open_ledger(folder / DB_FILE)
        mints_path = folder / MINTS_FILE
        mints = json.loads(mints_path.read_text()) if mints_path.exists() else []
        wallet = cls(ledger, mints, httpx.AsyncClient(timeout=http_s))
        wallet.dir = folder
        async with ledger.db.write() as conn:
            await ensure_account(conn, ACCOUNT, "client")
        if await ledger.db.fetchone("SELECT 1 FROM wallet_ops WHERE state = 'pending' LIMIT 1"):
            with contextlib.suppress(NodeprovError):  # a mint down: ops stay pending
                await wallet.recover()
        return wallet

    async def close(self) -> None:
        await self.http.aclose()
        await self.ledger.db.close()

    async def __aenter__(self) -> ClientWallet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- mints ----------------------------------------------------------------------

    def trust(self, mint_url: str) -> str:
        """Add a mint (remembered in the data dir); returns its normalised URL."""
        url = _norm(mint_url)
        if url not in self._apis:
            api = MintApi(url, self.http)
            self._apis[url] = api
            self._keysets[url] = MintKeysets(api, self.units)
            if self.dir is not None:
                (self.dir / MINTS_FILE).write_text(json.dumps(list(self._apis), indent=1))
        return url

    # --- balances -------------------------------------------------------------------

    async def balance_msat(self) -> int:
        account = await self.ledger.account(ACCOUNT)
        return account.balance_msat if account else 0

    async def holdings(self) -> list[dict[str, object]]:
        """Per mint and unit: value in the unit and in msat (the proofs held)."""
        return [
            {"mint": m, "unit": u, "amount": a, "msat": to_msat(a, check_unit(u))}
            for (m, u), a in sorted((await self.balances()).items())
        ]

    async def audit_ok(self) -> bool:
        return (await self.ledger.audit()).ok

    # --- in -------------------------------------------------------------------------

    async def receive_token(self, text: str, *, ref: str = "") -> Received:
        """Receive a token into the wallet (trusting its mint)."""
        self.trust(parse_token(text).mint)
        return await self.receive(text, ACCOUNT, "client", ref=ref)

    async def already_received(self, text: str) -> bool:
        fingerprint = token_fingerprint(parse_token(text))
        row = await self.ledger.db.fetchone(
            "SELECT 1 FROM processed WHERE kind = 'token' AND id = ?", (fingerprint,)
        )
        return row is not None

    async def take_change(self, text: str, *, ref: str = "") -> ChangeResult:
        """Receive change from a provider exactly once; a repeat or a spent token is reported."""
        try:
            if await self.already_received(text):
                return ChangeResult(0, "duplicate", "this change token is already in the wallet")
            received = await self.receive_token(text, ref=ref)
        except TokenAlreadySpent as exc:
            return ChangeResult(0, "spent", f"the provider's change token is spent: {exc.message}")
        except MintUnavailable:
            raise
        except NodeprovError as exc:
            return ChangeResult(0, "invalid", f"the provider's change token failed: {exc.message}")
        return ChangeResult(received.credited_msat, "received")

    async def fund_amount(
        self, mint_url: str, amount: int, unit: str = "sat", *, wait: float = 60.0
    ) -> Received:
        """Mint ``amount`` (in ``unit``) from a bolt11 quote; waits for it to be paid."""
        url = self.trust(mint_url)
        unit_ = check_unit(unit)
        api = self.api(url)
        quote = await api.mint_quote(amount, unit_)
        deadline = time.monotonic() + wait
        state = quote.get("state") or ("PAID" if quote.get("paid") else "UNPAID")
        while state not in ("PAID", "ISSUED"):
            if time.monotonic() > deadline:
                raise MintError(
                    f"quote {quote['quote']} is not paid yet; pay this invoice: {quote['request']}"
                )
            await asyncio.sleep(0.5)
            now = await api.mint_quote_state(quote["quote"])
            state = now.get("state") or ("PAID" if now.get("paid") else "UNPAID")
        return await self.mint_quote(url, unit_, amount, str(quote["quote"]))

    async def mint_quote(self, mint_url: str, unit: Unit, amount: int, quote: str) -> Received:
        """Mint the outputs of a paid quote, journalled as a receive (recovery restores them)."""
        keyset = await self.active_keyset(mint_url, unit)
        outputs = self.make_outputs(keyset, complete_split(amount), "keep")
        async with self.ledger.db.write() as conn:
            op_id = await journal.insert_op(
                conn, kind="receive", mint_url=mint_url, unit=unit, account_id=ACCOUNT,
                amount=amount, fingerprint="quote:" + quote, inputs=(), outputs=outputs,
                quote=quote, ref="mint:" + quote,
            )  # fmt: skip
        try:
            signatures = await self.api(mint_url).mint(quote, [o.to_wire() for o in outputs])
        except MintUnavailable:
            if await self._resolve(op_id) != "done":
                raise
        except MintError as exc:
            await self._fail_receive(op_id, spent=False, error=exc.message)
            raise
        else:
            await self._finish_receive(op_id, signatures)
        return Received(to_msat(amount, unit), mint_url, unit, amount, 0, "quote:" + quote)

    # --- out ------------------------------------------------------------------------

    async def send_amount(
        self, amount_msat: int, *, mint_url: str | None = None, unit: str | None = None
    ) -> Sent:
        """A token worth ``amount_msat`` (whole units) from the wallet."""
        await self._check_funds(amount_msat)
        return await self.send(ACCOUNT, amount_msat, mint_url=mint_url, unit=unit)

    async def _check_funds(self, amount_msat: int) -> None:
        have = await self.balance_msat()
        if have < amount_msat:
            raise InsufficientBalance(
                f"the client wallet holds {have} msat, {amount_msat} msat are needed",
                available_msat=have,
                required_msat=amount_msat,
            )

    async def pick_pool(
        self, amount_msat: int, mints: Sequence[str], units: Sequence[str]
    ) -> tuple[str, Unit]:
        """A (mint, unit) pool holding ``amount_msat`` that the provider accepts; msat first."""
        accepted = {_norm(m) for m in mints}
        held = await self.balances()
        for unit in ("msat", "sat"):
            if units and unit not in units:
                continue
            need = to_msat(from_msat_ceil(amount_msat, check_unit(unit)), check_unit(unit))
            for (mint, pool_unit), amount in sorted(held.items(), key=lambda kv: -kv[1]):
                if pool_unit != unit or (accepted and mint not in accepted):
                    continue
                if to_msat(amount, check_unit(unit)) >= need:
                    return mint, check_unit(unit)
        offered = ", ".join(sorted(accepted)) or "any mint"
        raise InsufficientBalance(
            f"no pool in the client wallet holds {amount_msat} msat at a mint the provider "
            f"accepts ({offered}; units {', '.join(units) or 'any'})",
            required_msat=amount_msat,
        )

    async def pay(self, value: int, mint_url: str, unit: Unit, *, ref: str = "") -> Sent:
        """A token whose value after the receiver's input fee is at least ``value`` (in unit)."""
        ppk = (await self.active_keyset(mint_url, unit)).fee_ppk
        target = value + ceil_div(len(complete_split(value)) * ppk, 1000)
        for _ in range(4):
            await self._check_funds(to_msat(target, unit))
            sent = await self.send(
                ACCOUNT, to_msat(target, unit), mint_url=mint_url, unit=unit, kind="payment",
                ref=ref,
            )  # fmt: skip
            fee = self.input_fee(mint_url, parse_token(sent.token).proofs)
            if sent.amount - fee >= value:
                return sent
            await self.receive_token(sent.token, ref="resize")
            target += value - (sent.amount - fee)
        raise MintError(f"could not make a token worth {value} {unit} after the mint's fees")
