"""The keysets of a trusted mint (NUT-01/02), loaded once and refreshed only when needed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nodeprov.core.mint_api import MintApi
from nodeprov.errors import InvalidToken, UnsupportedUnit

# A token naming an unknown keyset makes us ask the mint again, but not more often than this,
# so garbage tokens cannot turn the node into a load generator against its mint.
RELOAD_INTERVAL_SECONDS = 10.0
SHORT_ID_HEX = 16


@dataclass
class Keyset:
    """One keyset: its unit, whether new outputs may use it, its input fee, its public keys."""

    id: str
    unit: str
    active: bool
    fee_ppk: int
    keys: dict[int, str] = field(default_factory=dict)  # amount -> compressed pubkey (hex)


class MintKeysets:
    """The keysets of one mint in the units the node accepts."""

    def __init__(self, api: MintApi, units: tuple[str, ...]) -> None:
        self.api = api
        self.units = units
        self._known: dict[str, Keyset] = {}
        self._loaded_at: float | None = None

    async def load(self) -> None:
        """Fetch the keyset list, and the keys of any keyset not seen before."""
        infos: list[dict[str, Any]] = await self.api.keysets()
        for info in infos:
            known = self._known.get(info["id"])
            if known is not None:
                known.active = bool(info.get("active", True))
                continue
            if info.get("unit") not in self.units:
                continue
            self._known[info["id"]] = Keyset(
                id=info["id"],
                unit=info["unit"],
                active=bool(info.get("active", True)),
                fee_ppk=int(info.get("input_fee_ppk") or 0),
                keys=await self.api.keys(info["id"]),
            )
        self._loaded_at = time.monotonic()

    def find(self, keyset_id: str) -> Keyset | None:
        """The keyset with this full or short id if it is loaded (never asks the mint)."""
        if keyset_id in self._known:
            return self._known[keyset_id]
        if len(keyset_id) >= SHORT_ID_HEX:  # V4 tokens carry a v2 keyset id's short form
            for kid, keyset in self._known.items():
                if kid.startswith(keyset_id):
                    return keyset
        return None

    async def get(self, keyset_id: str) -> Keyset:
        """The keyset with this full or short id; reloads once if it is not known yet."""
        keyset = self.find(keyset_id)
        if keyset is None and self._may_reload():
            await self.load()
            keyset = self.find(keyset_id)
        if keyset is None:
            raise InvalidToken(f"unknown keyset {keyset_id} at {self.api.url}")
        return keyset

    async def active(self, unit: str) -> Keyset:
        """The keyset new outputs in ``unit`` are signed with."""
        if not self._known:
            await self.load()
        for keyset in self._known.values():
            if keyset.active and keyset.unit == unit:
                return keyset
        raise UnsupportedUnit(f"the mint {self.api.url} has no active {unit} keyset")

    def _may_reload(self) -> bool:
        return (
            self._loaded_at is None or time.monotonic() - self._loaded_at >= RELOAD_INTERVAL_SECONDS
        )
