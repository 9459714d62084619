"""HTTP calls to a Cashu mint (NUT-01..09), over one shared ``httpx.AsyncClient`` per mint.

Transport failures, 5xx, 408 and 429 answers become :class:`MintUnavailable` (retryable; the
caller's journal decides what the outcome was); a 4xx answer becomes :class:`MintError`
carrying the mint's NUT error code (``11001``: proofs already spent).
"""

from __future__ import annotations

from typing import Any

import httpx

from nodeprov.errors import MintError, MintUnavailable

SPENT_CODE = 11001


class MintApi:
    """The endpoints of one mint that the node uses."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self._client = client

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = await self._client.request(method, self.url + path, json=body)
        except httpx.TimeoutException:
            raise MintUnavailable(f"the mint {self.url} timed out") from None
        except httpx.TransportError as exc:
            raise MintUnavailable(f"the mint {self.url} is unreachable: {exc}") from None
        # 408 and 429 say "not now", not "no": retryable, never a reason to give an op up.
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise MintUnavailable(f"the mint {self.url} failed with {response.status_code}")
        try:
            data = response.json()
        except ValueError:
            raise MintUnavailable(f"the mint {self.url} sent a non-JSON answer") from None
        if response.status_code >= 400:
            detail = data.get("detail", response.text) if isinstance(data, dict) else data
            code = data.get("code") if isinstance(data, dict) else None
            raise MintError(f"the mint refused: {detail}", code if isinstance(code, int) else None)
        return data

    async def keysets(self) -> list[dict[str, Any]]:
        data = await self._call("GET", "/v1/keysets")
        return list(data["keysets"])

    async def keys(self, keyset_id: str) -> dict[int, str]:
        data = await self._call("GET", f"/v1/keys/{keyset_id}")
        keyset = data["keysets"][0]
        return {int(amount): pub for amount, pub in keyset["keys"].items()}

    async def swap(
        self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        data = await self._call("POST", "/v1/swap", {"inputs": inputs, "outputs": outputs})
        return list(data["signatures"])

    async def check_state(self, ys: list[str]) -> list[str]:
        data = await self._call("POST", "/v1/checkstate", {"Ys": ys})
        by_y = {s["Y"]: s["state"] for s in data["states"]}
        return [by_y.get(y, "UNKNOWN") for y in ys]

    async def restore(self, outputs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Signatures the mint already issued for ``outputs``, by ``B_``."""
        data = await self._call("POST", "/v1/restore", {"outputs": outputs})
        signatures = data.get("signatures") or data.get("promises") or []
        return {o["B_"]: s for o, s in zip(data.get("outputs", []), signatures, strict=False)}

    async def melt_quote(self, bolt11: str, unit: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/melt/quote/bolt11", {"request": bolt11, "unit": unit}
        )
        return result

    async def melt_quote_state(self, quote: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/melt/quote/bolt11/{quote}")
        return result

    async def melt(
        self, quote: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/melt/bolt11", {"quote": quote, "inputs": inputs, "outputs": outputs}
        )
        return result

    async def mint_quote(self, amount: int, unit: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", "/v1/mint/quote/bolt11", {"amount": amount, "unit": unit}
        )
        return result

    async def mint_quote_state(self, quote: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/v1/mint/quote/bolt11/{quote}")
        return result

    async def mint(self, quote: str, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._call("POST", "/v1/mint/bolt11", {"quote": quote, "outputs": outputs})
        return list(data["signatures"])
