"""The wallet's access to its trusted mints: APIs, keysets, blinded outputs, the journal.

The base of :class:`~nodeprov.core.wallet.Wallet`: everything the receive, send and
recovery paths share that moves no money.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import httpx

from nodeprov.core import journal
from nodeprov.core.bdhke import blind, point, unblind, verify_signature_dleq
from nodeprov.core.journal import BlindedOutput, Op
from nodeprov.core.keysets import Keyset, MintKeysets
from nodeprov.core.ledger import Ledger
from nodeprov.core.live_ops import LiveOps
from nodeprov.core.mint_api import MintApi
from nodeprov.core.money import check_unit
from nodeprov.errors import MintError, MintUnavailable, UntrustedMint
from nodeprov.protocol.cashu_token import Dleq, Proof

logger = logging.getLogger("nodeprov.core.wallet")


class KeysetNotLoaded(MintUnavailable):
    """A keyset needed inside a ledger write is not loaded: load it outside, then retry."""

    def __init__(self, mint_url: str, keyset_id: str) -> None:
        super().__init__(f"keyset {keyset_id} of {mint_url} is not loaded yet")
        self.mint_url = mint_url
        self.keyset_id = keyset_id


def norm(url: str) -> str:
    """A mint URL as the node keys it (no trailing ``/``)."""
    return url.rstrip("/")


class MintAccess:
    """The trusted mints (APIs, keysets), blinded outputs and reads of the journal."""

    def __init__(
        self,
        ledger: Ledger,
        mints: Sequence[str],
        units: Sequence[str],
        client: httpx.AsyncClient,
    ) -> None:
        self.ledger = ledger
        self.units = tuple(check_unit(u) for u in units)
        self._apis = {norm(m): MintApi(norm(m), client) for m in mints}
        self._keysets = {m: MintKeysets(api, self.units) for m, api in self._apis.items()}
        # Ops awaited by a live request of this process: recovery leaves them alone.
        self.live = LiveOps()

    @property
    def mints(self) -> tuple[str, ...]:
        return tuple(self._apis)

    def recoverable(self, op_id: int, mint_url: str) -> bool:
        """Whether recovery may settle this op now: no live request owns it, its mint is trusted.

        An op of a mint the config no longer lists stays as it is (logged): the mint may
        come back, and nothing can be settled without it.
        """
        if op_id in self.live:
            return False  # a request of this process is still waiting for the mint
        if norm(mint_url) not in self._apis:
            logger.warning("op %s is at %s, which is not a trusted mint now; left", op_id, mint_url)
            return False
        return True

    def api(self, mint_url: str) -> MintApi:
        try:
            return self._apis[norm(mint_url)]
        except KeyError:
            accepted = ", ".join(self._apis)
            raise UntrustedMint(
                f"tokens from {mint_url} are not accepted here; accepted mints: {accepted}"
            ) from None

    async def start(self) -> None:
        """Load keysets of every trusted mint (a mint that is down is retried on first use)."""
        for mint_url in self._apis:
            try:
                await self._keysets[mint_url].load()
            except MintUnavailable as exc:
                logger.warning("mint not reachable at start: %s", exc)

    async def keyset(self, mint_url: str, keyset_id: str) -> Keyset:
        """The keyset ``keyset_id`` (full or short id) of a trusted mint."""
        return await self._keysets[mint_url].get(keyset_id)

    async def active_keyset(self, mint_url: str, unit: str) -> Keyset:
        return await self._keysets[mint_url].active(unit)

    def known_keyset(self, mint_url: str, keyset_id: str) -> Keyset:
        """A keyset already loaded; never asks the mint, so it is safe inside a ledger write."""
        keyset = self._keysets[mint_url].find(keyset_id)
        if keyset is None:
            raise KeysetNotLoaded(mint_url, keyset_id)
        return keyset

    async def pool_keysets(self, mint_url: str, unit: str) -> Keyset:
        """Before a write that picks proofs from a pool: its mint's keysets, loaded now.

        Returns the active keyset for outputs. The input fee is then computed from loaded
        keysets inside the transaction, so no mint round trip holds the writer; a proof of a
        keyset still unknown (one another process added) raises :class:`KeysetNotLoaded`,
        and the caller loads it and tries again.
        """
        return await self.active_keyset(mint_url, unit)

    async def load_output_keyset(self, op_id: int) -> None:
        """Load the keyset of an op's outputs before a write transaction unblinds them."""
        op = await self.op(op_id)
        if op.outputs:
            await self.keyset(op.mint_url, op.outputs[0].keyset_id)

    def make_outputs(self, keyset: Keyset, amounts: list[int], role: str) -> list[BlindedOutput]:
        outputs = []
        for amount in amounts:
            secret = secrets.token_hex(32)
            B_, r = blind(secret)
            outputs.append(BlindedOutput(amount, keyset.id, secret, r, B_, role))
        return outputs

    def unblind_signatures(
        self, keyset: Keyset, outputs: Sequence[BlindedOutput], signatures: Sequence[Any]
    ) -> list[Proof]:
        """Turn the mint's blind signatures on ``outputs`` into proofs, checking their DLEQ."""
        proofs = []
        for output, sig in zip(outputs, signatures, strict=True):
            # A blank output (NUT-08 melt change) takes the amount the mint signed it for.
            amount = int(sig.get("amount", output.amount))
            A = point(keyset.keys[amount])
            dleq = sig.get("dleq")
            if dleq and not verify_signature_dleq(output.B_, sig["C_"], dleq["e"], dleq["s"], A):
                raise MintError("the mint's DLEQ proof does not verify")
            C = unblind(sig["C_"], output.r, A)
            proofs.append(
                Proof(
                    amount=amount,
                    keyset_id=output.keyset_id,
                    secret=output.secret,
                    C=C,
                    dleq=Dleq(e=dleq["e"], s=dleq["s"], r=output.r) if dleq else None,
                )
            )
        return proofs

    async def op(self, op_id: int) -> Op:
        row = await self.ledger.db.fetchone("SELECT * FROM wallet_ops WHERE id = ?", (op_id,))
        if row is None:
            raise KeyError(op_id)
        return journal.ops_from_rows([row])[0]

    async def pending_op_for(self, fingerprint: str) -> Op | None:
        row = await self.ledger.db.fetchone(
            "SELECT * FROM wallet_ops WHERE fingerprint = ? ORDER BY id DESC LIMIT 1",
            (fingerprint,),
        )
        return journal.ops_from_rows([row])[0] if row else None

    async def balances(self) -> dict[tuple[str, str], int]:
        """Value of the proofs held, per (mint, unit), in the mint's unit."""
        rows = await self.ledger.db.fetchall(
            "SELECT mint_url, unit, SUM(amount) FROM proofs WHERE state IN ('unspent', 'reserved') "
            "GROUP BY mint_url, unit"
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}
