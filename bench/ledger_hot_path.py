"""Ledger cost of one paid API-key request (hold + settle), against a bare-SQLite baseline.

    .venv/bin/python bench/ledger_hot_path.py [--requests N] [--concurrency C]

Prints requests/s and p50 for the ledger's hold+settle pair, and the same for a baseline of
two minimal write transactions on the same aiosqlite setup, so the ratio says what the
ledger adds on top of the storage it cannot avoid. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from nodeprov.core.db import Database, Migration
from nodeprov.core.ledger import add_asset, credit, ensure_account, open_ledger


async def ledger_round(path: Path, requests: int, concurrency: int) -> list[float]:
    ledger = await open_ledger(path)
    async with ledger.db.write() as conn:
        await ensure_account(conn, "key:bench", "api_key")
        await credit(conn, "key:bench", 10**15, "deposit")
        await add_asset(conn, "http://mint", "msat", 10**15)
    latencies: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        hold = await ledger.hold("key:bench", 5_000)
        await ledger.settle(hold, 1_234)
        latencies.append(time.perf_counter() - start)

    await run(one, requests, concurrency)
    await ledger.db.close()
    return latencies


async def baseline_round(path: Path, requests: int, concurrency: int) -> list[float]:
    db = await Database.open(
        path, [Migration("t", "CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")]
    )
    async with db.write() as conn:
        await conn.execute("INSERT INTO t (id, v) VALUES (1, 0)")
    latencies: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        for _ in range(2):
            await db.transact(lambda raw: raw.execute("UPDATE t SET v = v + 1 WHERE id = 1"))
        latencies.append(time.perf_counter() - start)

    await run(one, requests, concurrency)
    await db.close()
    return latencies


async def run(job: object, requests: int, concurrency: int) -> None:
    assert callable(job)
    queue = iter(range(requests))

    async def worker() -> None:
        for _ in queue:
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def report(name: str, latencies: list[float], seconds: float) -> float:
    rate = len(latencies) / seconds
    p50 = statistics.median(latencies) * 1000
    print(f"{name:<10} {rate:10.0f} req/s   p50 {p50:7.3f} ms")
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = await baseline_round(Path(tmp) / "b.sqlite3", args.requests, args.concurrency)
        base_rate = report("baseline", base, time.perf_counter() - t0)
        t0 = time.perf_counter()
        led = await ledger_round(Path(tmp) / "l.sqlite3", args.requests, args.concurrency)
        led_rate = report("ledger", led, time.perf_counter() - t0)
    print(f"ledger / baseline throughput: {led_rate / base_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
