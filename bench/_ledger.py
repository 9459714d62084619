"""Ledger cost of one paid API-key request (hold + settle), against a bare-SQLite baseline.

    python -m bench._ledger [--requests N] [--concurrency C]

Prints one JSON object: pairs/s and p50/p99 (µs) of the ledger's hold+settle pair, and the same
for a baseline of two minimal write transactions on the same aiosqlite setup, so the ratio says
what the ledger adds on top of the storage it cannot avoid. It drives the ledger in process
(the one measure that does not go through the node's public surfaces), so the harness runs it
in a process of its own and reports an error, not a crash, if the ledger's interface moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench._common import die_with_parent, percentile, run
from nodeprov.core.db import Migration, open_database
from nodeprov.core.ledger import add_asset, credit, ensure_account, open_ledger


async def ledger_round(path: Path, requests: int, concurrency: int) -> tuple[list[float], float]:
    ledger = await open_ledger(path)
    async with ledger.db.write() as conn:
        await ensure_account(conn, "key:bench", "api_key")
        await credit(conn, "key:bench", 10**15, "deposit")
        await add_asset(conn, "http://mint", "msat", 10**15)

    async def one() -> None:
        hold = await ledger.hold("key:bench", 5_000)
        await ledger.settle(hold, 1_234)

    try:
        return await drive(one, requests, concurrency)
    finally:
        await ledger.db.close()


async def baseline_round(path: Path, requests: int, concurrency: int) -> tuple[list[float], float]:
    db = await open_database(
        path, [Migration("t", "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")]
    )
    async with db.write() as conn:
        await conn.execute("INSERT INTO t (id, v) VALUES (1, 0)")

    async def one() -> None:
        for _ in range(2):
            await db.transact(lambda raw: raw.execute("UPDATE t SET v = v + 1 WHERE id = 1"))

    try:
        return await drive(one, requests, concurrency)
    finally:
        await db.close()


async def drive(
    job: Callable[[], Awaitable[None]], requests: int, concurrency: int
) -> tuple[list[float], float]:
    """Run ``job`` ``requests`` times on ``concurrency`` workers; latencies and wall seconds."""
    queue = iter(range(requests))
    latencies: list[float] = []

    async def worker() -> None:
        for _ in queue:
            start = time.perf_counter()
            await job()
            latencies.append(time.perf_counter() - start)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def summary(latencies: list[float], seconds: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "per_s": len(ordered) / seconds,
        "p50_us": percentile(ordered, 0.5) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
    }


async def main(requests: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = await baseline_round(Path(tmp) / "b.sqlite3", requests, concurrency)
        led = await ledger_round(Path(tmp) / "l.sqlite3", requests, concurrency)
    print(json.dumps({"baseline": summary(*base), "ledger": summary(*led)}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    die_with_parent()
    run(main(args.requests, args.concurrency))
