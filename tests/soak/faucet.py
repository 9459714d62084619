"""The clients' wallet: fresh tokens from the real mint, and proof states asked of it (NUT-07).

Independent of the node's wallet: tokens come from nutshell's own wallet (the test-side
:class:`~tests.support.cashu_client.TokenFactory`). The faucet is the checker's instrument,
not the thing under test, so it waits while the mint is down instead of failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import httpx

from nodeprov.protocol.cashu_token import parse_token
from tests.support.cashu_client import TokenFactory, import_cashu

__all__ = ["Faucet", "token_msat"]

CHECK_BATCH = 200


def token_msat(token: str) -> int:
    parsed = parse_token(token)
    return parsed.amount * (1000 if parsed.unit == "sat" else 1)


def token_secrets(token: str) -> list[str]:
    return [p.secret for p in parse_token(token).proofs]


class Faucet:
    """Mints tokens of exact amounts (sat or msat) for the clients."""

    def __init__(self, mint_url: str, workdir: Path) -> None:
        self.mint_url = mint_url
        self.factories = {
            unit: TokenFactory(mint_url, unit, workdir / f"faucet-{unit}")
            for unit in ("sat", "msat")
        }
        self.suspect: set[str] = set()  # units whose wallet may count spent proofs
        self.handed_out: set[str] = set()  # secrets of every proof in a token given out
        self.mint_up = asyncio.Event()
        self.mint_up.set()

    async def token(self, amount: int, unit: str = "sat") -> str:
        factory = self.factories[unit]
        for attempt in range(60):
            await self.mint_up.wait()
            try:
                if unit in self.suspect:
                    await factory.drop_spent()
                    self.suspect.discard(unit)
                token = await factory.token(amount)
            except Exception:
                if attempt == 59:
                    raise
                # The mint went down under a swap: its inputs may be spent at the mint while
                # the wallet still counts them. Drop those once it is back, then try again.
                self.suspect.add(unit)
                await asyncio.sleep(0.5)
                continue
            secrets = token_secrets(token)
            if self.handed_out.isdisjoint(secrets):
                self.handed_out.update(secrets)
                return token
            # The wallet offered proofs it gave out before (it lost track of them while the
            # mint was down): never again, or a client would hold a token someone spent.
            print("faucet: its wallet offered proofs it gave out before; dropped them", flush=True)
            await factory.forget(token)
        raise AssertionError("the faucet's wallet keeps offering proofs it gave out")

    async def states(self, tokens: Iterable[str]) -> dict[str, str]:
        """NUT-07 state of every proof in ``tokens``: secret -> UNSPENT | SPENT | PENDING."""
        return await self.secret_states(s for token in tokens for s in token_secrets(token))

    async def secret_states(self, secrets: Iterable[str]) -> dict[str, str]:
        """NUT-07 state of the proofs with these secrets."""
        import_cashu()
        from cashu.core.crypto.b_dhke import hash_to_curve  # after import_cashu's containment

        by_y: dict[str, str] = {}
        for secret in secrets:
            by_y[hash_to_curve(secret.encode()).format().hex()] = secret
        ys = list(by_y)
        states: dict[str, str] = {}
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            for start in range(0, len(ys), CHECK_BATCH):
                batch = ys[start : start + CHECK_BATCH]
                response = await http.post(self.mint_url + "/v1/checkstate", json={"Ys": batch})
                response.raise_for_status()
                for entry in response.json()["states"]:
                    states[by_y[entry["Y"]]] = entry["state"]
        return states

    async def aclose(self) -> None:
        for factory in self.factories.values():
            await factory.aclose()
