"""Test-side Cashu wallet: mints real tokens from a test mint with nutshell's own ``Wallet``.

This is deliberately an implementation independent from ``nodeprov.core.wallet``: tokens made
here are what a third-party wallet would send to the node.

``cashu`` is imported lazily (first use), with its import-time side effects contained:
it reads ``./.env`` or ``~/.cashu/.env`` into ``os.environ``, builds a settings singleton from the
environment, and sets ``sys.tracebacklimit = 0`` unless ``DEBUG=true``. We import it from an
empty temporary cwd/HOME and restore ``os.environ``, the cwd and ``sys.tracebacklimit`` after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

__all__ = ["TokenFactory", "import_cashu"]

Unit = Literal["sat", "msat"]

# A fresh batch minted via FakeWallet (paid instantly); tokens are split from it.
_DEFAULT_BATCH: dict[str, int] = {"sat": 1_000_000, "msat": 1_000_000_000}
# Headroom kept above the requested amount for the input fees of the splitting swap.
_FEE_HEADROOM = 256

_cashu: SimpleNamespace | None = None


def import_cashu() -> SimpleNamespace:
    """Import the parts of ``cashu`` the tests need, containing its import side effects."""
    global _cashu
    if _cashu is not None:
        return _cashu
    saved_env = dict(os.environ)
    had_limit = hasattr(sys, "tracebacklimit")
    saved_limit = getattr(sys, "tracebacklimit", None)
    saved_cwd = os.getcwd()
    sandbox = tempfile.mkdtemp(prefix="nodeprov-cashu-import-")
    try:
        os.chdir(sandbox)  # no ./.env here
        os.environ["HOME"] = sandbox  # no ~/.cashu/.env here
        os.environ["CASHU_DIR"] = os.path.join(sandbox, ".cashu")
        # Keep settings from picking up tor/proxy/debug knobs of the developer's shell.
        for key in ("TOR", "SOCKS_PROXY", "SOCKS_HOST", "HTTP_PROXY", "DEBUG"):
            os.environ.pop(key, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # environs vs marshmallow 3.2x
            from cashu.core.base import ProofSpentState, TokenV3, TokenV4
            from cashu.core.helpers import sum_proofs
            from cashu.wallet.helpers import deserialize_token_from_string
            from cashu.wallet.wallet import Wallet
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        if had_limit:
            sys.tracebacklimit = saved_limit
        elif hasattr(sys, "tracebacklimit"):
            del sys.tracebacklimit
    _cashu = SimpleNamespace(
        Wallet=Wallet,
        TokenV3=TokenV3,
        TokenV4=TokenV4,
        ProofSpentState=ProofSpentState,
        sum_proofs=sum_proofs,
        deserialize_token_from_string=deserialize_token_from_string,
    )
    return _cashu


def _same_mint(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class TokenFactory:
    """Makes fresh tokens of an exact amount from one mint and unit.

    One batch is minted up front (FakeWallet pays instantly) and every token is split from it
    with one swap (or none, if coins of exactly the amount are at hand). With input fees on, the
    swap's fee is paid from the batch, never from the token: tokens are always exactly ``amount``.
    Safe to use from concurrent tasks of one event loop (an internal lock serialises wallet use).
    """

    def __init__(self, mint_url: str, unit: str, data_dir: str | Path) -> None:
        if unit not in ("sat", "msat"):
            raise ValueError(f"unit must be 'sat' or 'msat', not {unit!r}")
        self.mint_url = mint_url.rstrip("/")
        self.unit = unit
        self.data_dir = Path(data_dir)
        self._wallet: Any = None
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"TokenFactory({self.mint_url!r}, {self.unit!r})"

    # ---------------------------------------------------------------------------- internals

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _get_wallet(self) -> Any:
        if self._wallet is None:
            cashu = import_cashu()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            wallet = await cashu.Wallet.with_db(
                self.mint_url, str(self.data_dir), name=f"wallet_{self.unit}", unit=self.unit
            )
            await wallet.load_mint()
            if not any(k.active for k in wallet.keysets.values()):
                raise RuntimeError(f"mint {self.mint_url} has no active {self.unit} keyset")
            await wallet.load_proofs(reload=True)
            self._wallet = wallet
        return self._wallet

    @staticmethod
    def _spendable(wallet: Any) -> list[Any]:
        return [p for p in wallet.active_proofs(wallet.proofs) if not p.reserved]

    async def _top_up(self, wallet: Any, needed: int) -> None:
        cashu = import_cashu()
        have = cashu.sum_proofs(self._spendable(wallet))
        if have >= needed + _FEE_HEADROOM:
            return
        batch = max(_DEFAULT_BATCH[self.unit], 4 * (needed + _FEE_HEADROOM))
        quote = await wallet.request_mint(batch)
        await wallet.mint(batch, quote_id=quote.quote)
        await wallet.load_proofs(reload=True)

    def _parse(self, token: str) -> tuple[Any, list[Any]]:
        cashu = import_cashu()
        parsed = cashu.deserialize_token_from_string(token)
        if not _same_mint(parsed.mint, self.mint_url):
            raise ValueError(f"token is from mint {parsed.mint}, this factory uses {self.mint_url}")
        unit = parsed.unit or self.unit
        if unit != self.unit:
            raise ValueError(f"token unit is {unit!r}, this factory's unit is {self.unit!r}")
        return parsed, list(parsed.proofs)

    # ------------------------------------------------------------------------------- public

    async def token(self, amount: int, version: int = 4) -> str:
        """A fresh, unspent token of exactly ``amount`` (cashuB for version=4, cashuA for 3)."""
        if amount <= 0:
            raise ValueError("amount must be positive")
        if version not in (3, 4):
            raise ValueError("version must be 3 (cashuA) or 4 (cashuB)")
        cashu = import_cashu()
        async with self._get_lock():
            wallet = await self._get_wallet()
            await self._top_up(wallet, amount)
            spendable = self._spendable(wallet)
            send = wallet.coinselect(spendable, amount, include_fees=False)
            if not send or cashu.sum_proofs(send) != amount:
                _, send = await wallet.swap_to_send(spendable, amount, include_fees=False)
            await wallet.set_reserved_for_send(send, reserved=True)
            await wallet.load_proofs(reload=True)
            if cashu.sum_proofs(send) != amount:  # pragma: no cover - nutshell invariant
                raise AssertionError(f"split gave {cashu.sum_proofs(send)}, wanted {amount}")
            serialized: str = await wallet.serialize_proofs(send, legacy=(version == 3))
            return serialized

    async def redeem(self, token: str) -> int:
        """Receive ``token`` into this factory's wallet (a swap); return the amount received.

        With input fees on, that is the token's amount minus the mint's input fee.
        """
        cashu = import_cashu()
        async with self._get_lock():
            wallet = await self._get_wallet()
            _, proofs = self._parse(token)
            # V4 tokens carry 16-hex-char short keyset ids; the mint wants the full ones.
            await wallet._expand_short_keyset_ids(proofs)
            kept, _ = await wallet.redeem(proofs)
            await wallet.load_proofs(reload=True)
            received: int = cashu.sum_proofs(kept)
            return received

    async def proof_states(self, token: str) -> list[str]:
        """NUT-07 state of each proof of ``token``: "UNSPENT", "SPENT" or "PENDING"."""
        async with self._get_lock():
            wallet = await self._get_wallet()
            _, proofs = self._parse(token)
            response = await wallet.check_proof_state(proofs)
            return [state.state.value for state in response.states]

    async def drop_spent(self) -> None:
        """Forget the wallet's proofs the mint says are spent.

        A swap whose answer was lost (the mint went down under it) may have spent its inputs
        at the mint while the wallet still counts them; without this they would be handed out
        again in a token that cannot pay.
        """
        async with self._get_lock():
            wallet = await self._get_wallet()
            await wallet.load_proofs(reload=True)
            await wallet.invalidate(wallet.proofs, check_spendable=True)
            await wallet.load_proofs(reload=True)

    async def forget(self, token: str) -> None:
        """Drop ``token``'s proofs from the wallet (they must never be handed out again)."""
        async with self._get_lock():
            wallet = await self._get_wallet()
            _, proofs = self._parse(token)
            secrets = {p.secret for p in proofs}
            await wallet.load_proofs(reload=True)
            await wallet.invalidate([p for p in wallet.proofs if p.secret in secrets])
            await wallet.load_proofs(reload=True)

    async def balance(self) -> int:
        """Spendable amount left in the factory's wallet (in its unit)."""
        cashu = import_cashu()
        async with self._get_lock():
            wallet = await self._get_wallet()
            total: int = cashu.sum_proofs(self._spendable(wallet))
            return total

    async def aclose(self) -> None:
        """Dispose the wallet's database engine (its aiosqlite worker threads)."""
        if self._wallet is not None:
            with contextlib.suppress(Exception):
                await self._wallet.db.engine.dispose()
            with contextlib.suppress(Exception):
                await self._wallet.httpx.aclose()
            self._wallet = None
