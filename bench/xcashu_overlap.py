"""What overlapping an X-Cashu token's swap with the upstream call gains, and what it costs.

    .venv/bin/python bench/xcashu_overlap.py [--requests N] [--upstream-ms MS] [--flood N]

Starts a real mint, the test upstream (answering after ``--upstream-ms``: its time to first
token) and two nodes on loopback, one with ``[payments] overlap_swap`` on and one off.
Gain: streamed time to first token (request sent -> first ``data:`` line) for an API key
(no swap), X-Cashu with the overlap off and on, interleaved in the same run; p50 of each.
Cost: a flood of spent tokens from one client at once, known to the node (spent here before,
also re-packed as single proofs) and unknown (spent at the mint behind its back): upstream
calls started per token and the most unconfirmed starts at once. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodeprov.protocol.cashu_token import Token, parse_token, serialize_token  # noqa: E402
from tests.support.cashu_client import TokenFactory  # noqa: E402
from tests.support.fake_openai import Behaviour  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.http_node import MODELS, UPSTREAM_KEY, Node, start_node  # noqa: E402
from tests.support.services import start_mint  # noqa: E402

BODY = {
    "model": "fake-chat",
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 16,
    "stream": True,
}
TOKEN_SAT = 40


async def ttft(http: httpx.AsyncClient, node: Node, headers: dict[str, str]) -> float:
    """Seconds from sending a streamed chat to its first ``data:`` line; reads it all."""
    start = time.perf_counter()
    first = None
    async with http.stream(
        "POST", node.base + "/chat/completions", json=BODY, headers=headers
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - start
    assert first is not None
    return first


async def gain(on: Node, off: Node, factory: TokenFactory, requests: int) -> dict[str, list[float]]:
    async with httpx.AsyncClient(timeout=60) as http:
        made = await http.post(
            on.base + "/wallet/create", json={"cashu_token": await factory.token(100_000)}
        )
        key = made.json()["api_key"]
        times: dict[str, list[float]] = {"api key": [], "x-cashu, off": [], "x-cashu, on": []}
        for i in range(requests + 3):
            runs: list[tuple[str, Node, dict[str, str]]] = [
                ("api key", on, {"Authorization": f"Bearer {key}"}),
                ("x-cashu, off", off, {"X-Cashu": await factory.token(TOKEN_SAT)}),
                ("x-cashu, on", on, {"X-Cashu": await factory.token(TOKEN_SAT)}),
            ]
            for name, node, headers in runs[i % 3 :] + runs[: i % 3]:  # rotate the order
                took = await ttft(http, node, headers)
                if i >= 3:  # warm-up
                    times[name].append(took)
    return times


async def flood(
    node: Node, upstream: FakeUpstream, tokens: list[str], at_once: bool
) -> tuple[int, int, int, list[int]]:
    """Send ``tokens`` from one client, all at once or one by one.

    Returns (upstream starts, upstream arrivals, most unconfirmed starts at once, statuses).
    """
    overlap = node.core.payments.overlap
    started, arrived = overlap.started, len(upstream.requests)
    body = {**BODY, "stream": False}
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, overlap.open_starts("127.0.0.1"))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as http:

        async def one(token: str) -> int:
            r = await http.post(
                node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
            )
            return r.status_code

        if at_once:
            statuses = list(await asyncio.gather(*(one(t) for t in tokens)))
        else:
            statuses = [await one(t) for t in tokens]
    watcher.cancel()
    return overlap.started - started, len(upstream.requests) - arrived, peak, statuses


def singles(token: str) -> list[str]:
    """Each proof of ``token`` as a token of its own (new fingerprints, known proofs)."""
    parsed = parse_token(token)
    return [serialize_token(Token(parsed.mint, parsed.unit, (p,))) for p in parsed.proofs]


async def cost(on: Node, upstream: FakeUpstream, factory: TokenFactory, n: int) -> dict[str, Any]:
    known: list[str] = []
    async with httpx.AsyncClient(timeout=60) as http:
        while len(known) < n:
            token = await factory.token(TOKEN_SAT)
            body = {**BODY, "stream": False}
            r = await http.post(
                on.base + "/chat/completions", json=body, headers={"X-Cashu": token}
            )
            assert r.status_code == 200, r.text
            await factory.redeem(r.headers["x-cashu"])
            known += [token, *singles(token)]
    unknown = []
    for _ in range(n):
        token = await factory.token(TOKEN_SAT)
        await factory.redeem(token)  # spent at the mint; the node has never seen it
        unknown.append(token)
    half = n // 2
    out: dict[str, Any] = {}
    for name, tokens, at_once in (
        ("known, at once", known[:n], True),
        ("unknown, at once", unknown[:half], True),
        ("unknown, 1 by 1", unknown[half:], False),
    ):
        started, arrived, peak, statuses = await flood(on, upstream, tokens, at_once)
        out[name] = (len(tokens), started, arrived, peak, sorted(set(statuses)))
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--upstream-ms", type=float, default=30.0)
    parser.add_argument("--flood", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mint = start_mint(input_fee_ppk=0, workdir=Path(tmp) / "mint")
        behaviour = Behaviour(delay=args.upstream_ms / 1000)
        upstream = FakeUpstream(models=MODELS, behaviour=behaviour, api_key=UPSTREAM_KEY).start()
        nodes: list[Node] = []
        try:
            on = await start_node(Path(tmp) / "on", [mint.url], upstream)
            nodes.append(on)
            off = await start_node(Path(tmp) / "off", [mint.url], upstream, overlap_swap=False)
            nodes.append(off)
            factory = TokenFactory(mint.url, "sat", Path(tmp) / "wallet")
            times = await gain(on, off, factory, args.requests)
            print(
                f"streamed TTFT p50, upstream TTFT {args.upstream_ms:.0f} ms,"
                f" {args.requests} requests each (interleaved):"
            )
            for name, values in times.items():
                print(f"  {name:14} {p50(values):7.1f} ms")
            key, off_, on_ = (p50(times[k]) for k in ("api key", "x-cashu, off", "x-cashu, on"))
            swap = off_ - key
            ideal = key + max(0.0, swap - args.upstream_ms)  # max(swap, upstream) + the rest
            print(
                f"  the swap adds (off - key) {swap:.1f} ms; the overlap saves (off - on)"
                f" {off_ - on_:.1f} ms; on is {on_ - ideal:+.1f} ms from max(swap, upstream)"
            )
            n = args.flood
            print(f"flood of spent tokens from one client ({n} known, {n} unknown):")
            for name, (n, started, arrived, peak, statuses) in (
                await cost(on, upstream, factory, args.flood)
            ).items():
                print(
                    f"  {name:16} tokens {n}, upstream starts {started}"
                    f" ({started / n:.2f}/token), reached the upstream {arrived},"
                    f" most unconfirmed at once {peak}, statuses {statuses}"
                )
            await factory.aclose()
        finally:
            for node in nodes:
                await node.stop()
            upstream.stop()
            mint.close()


if __name__ == "__main__":
    asyncio.run(main())
