"""Which PostgreSQL driver the ledger should use: a ledger-shaped workload on each candidate.

    .venv/bin/python -m bench.pg_drivers [--seconds S] [--concurrency 1,8]

One pair is a hold (reserve on the account + insert the hold) and a settle (lock the hold and
its account, delete the hold, charge the account, credit the operator, two transaction rows),
each its own transaction, on an account no other in-flight pair uses. Measured per driver and
concurrency: pairs/s and p50/p99 of a pair. Candidates: asyncpg with its pool, psycopg 3
AsyncConnection (a queue of connections), psycopg 3 sync connections each owned by one thread
(one thread hop per transaction, the shape of ``Database.transact``), and SQLite for reference.
PostgreSQL runs from tests/support/postgres.py with fsync, synchronous_commit and
full_page_writes at their defaults (on): every commit waits for its WAL flush, as in production.
Prints a markdown table and writes it to bench/results/<date>-pg-drivers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import asyncpg
import psycopg

from bench._common import loop_name, percentile, run
from bench._pg_workload import (
    ACCOUNTS,
    AsyncpgDriver,
    Driver,
    PsycopgAsyncDriver,
    PsycopgThreadDriver,
    SqliteDriver,
    seed_postgres,
    seed_sqlite,
)
from tests.support.postgres import PostgresServer

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Result:
    driver: str
    concurrency: int
    pairs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # this process's CPU time (all threads) per pair: the driver's own cost

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


async def drive(driver: Driver, concurrency: int, seconds: float, warmup: float) -> Result:
    """``concurrency`` workers run pairs back to back on their own accounts for ``seconds``."""
    await driver.open()
    try:
        latencies: list[float] = []
        cpu_from = 0.0
        start = time.perf_counter()
        measure_from = start + warmup
        stop_at = measure_from + seconds

        async def cpu_mark() -> None:
            nonlocal cpu_from
            await asyncio.sleep(warmup)
            cpu_from = time.process_time()

        async def worker(index: int) -> None:
            turn = 0
            while True:
                account = f"a{(index + turn * concurrency) % ACCOUNTS}"
                turn += 1
                began = time.perf_counter()
                if began >= stop_at:
                    return
                await driver.pair(account)
                if began >= measure_from:
                    latencies.append(time.perf_counter() - began)

        await asyncio.gather(cpu_mark(), *(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - measure_from
        cpu = time.process_time() - cpu_from
    finally:
        await driver.close()
    latencies.sort()
    return Result(
        driver.name, concurrency, len(latencies), elapsed,
        percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000,
        cpu / max(1, len(latencies)) * 1e6,
    )  # fmt: skip


async def measure(
    server: PostgresServer, workdir: Path, levels: Sequence[int], seconds: float, warmup: float
) -> list[Result]:
    results: list[Result] = []
    runs: list[tuple[Callable[..., Driver] | None, int, bool]] = []
    makers: list[Callable[..., Driver] | None] = [
        AsyncpgDriver, partial(AsyncpgDriver, reset=False), PsycopgAsyncDriver,
        PsycopgThreadDriver, None,
    ]  # fmt: skip
    runs += [(make, level, True) for make in makers for level in levels]
    # The operator row's cost, at the highest concurrency, for the two fastest PostgreSQL shapes.
    runs += [(make, max(levels), False) for make in (makers[1], PsycopgThreadDriver)]
    for make, level, operator in runs:
        driver: Driver
        if make is None:
            path = workdir / f"ledger-{len(results)}.sqlite3"
            await asyncio.to_thread(seed_sqlite, path)
            driver = SqliteDriver(path, operator=operator)
        else:
            url = await asyncio.to_thread(server.create_database)
            await asyncio.to_thread(seed_postgres, url)
            driver = make(url, level, operator=operator)
        result = await drive(driver, level, seconds, warmup)
        print(
            f"  {result.driver}, {level} concurrent: {result.rate:,.0f} pairs/s, "
            f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, "
            f"client CPU {result.cpu_us:.0f} us/pair",
            flush=True,
        )
        results.append(result)
    return results


def report(results: Sequence[Result], server_version: str, seconds: float, load: str) -> str:
    now = datetime.now(UTC)
    lines = [
        f"# PostgreSQL driver measurement, {now:%Y-%m-%d}",
        "",
        f"- date: {now:%Y-%m-%d %H:%M} UTC; command: `.venv/bin/python -m bench.pg_drivers`",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs; load average {load}",
        f"- python {platform.python_version()} on {loop_name()}, asyncpg {asyncpg.__version__}, "
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__} libpq {psycopg.pq.version()})",
        f"- server: {server_version} from tests/support/postgres.py on 127.0.0.1 (TCP), with "
        "fsync, synchronous_commit and full_page_writes at their defaults (on): each commit "
        "waits for its WAL flush. SQLite: WAL, synchronous=NORMAL, one connection in one thread.",
        "- one pair = a hold transaction (conditional UPDATE of the account + INSERT of the hold "
        "RETURNING id) then a settle transaction (SELECT the hold joined to its account FOR "
        "UPDATE, DELETE the hold, UPDATE the account, UPDATE the operator account, INSERT two "
        f"transaction rows); each pair on an account no other in-flight pair uses; {seconds:g} s "
        "per row after a warm-up.",
        "",
        "- client CPU = this process's CPU time (event loop and driver threads) per pair, the "
        "driver's own cost; rows marked \"no operator row\" leave out the settle's UPDATE of "
        "the operator account to show what that one shared row costs.",
        "",
        "| driver | concurrent pairs | pairs measured | pairs/s | p50 per pair | p99 per pair "
        "| client CPU per pair |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.driver} | {r.concurrency} | {r.pairs:,} | {r.rate:,.0f} | "
            f"{r.p50_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.cpu_us:,.0f} µs |"
        )
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, server: PostgresServer, workdir: Path) -> str:
    levels = [int(x) for x in args.concurrency.split(",")]
    with psycopg.connect(server.url) as conn:
        row = conn.execute("SELECT version()").fetchone()
    version = str(row[0]).split(" on ")[0] if row else "PostgreSQL"
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    results = await measure(server, workdir, levels, args.seconds, args.warmup)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    load = f"{load_before} at the start, {load_after} at the end"
    return report(results, version, args.seconds, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per row")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated levels")
    parser.add_argument("--no-write", action="store_true", help="print only, write no file")
    args = parser.parse_args()
    # The server starts here, on the main thread, so that it dies with this process if killed.
    with (
        tempfile.TemporaryDirectory(prefix="nodeprov-pgbench-") as tmp,
        PostgresServer.start(Path(tmp), durable=True) as server,
    ):
        table = run(main_async(args, server, Path(tmp)))
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{datetime.now(UTC):%Y-%m-%d}-pg-drivers.md"
        path.write_text(table)
        print(f"written to {path}")


if __name__ == "__main__":
    main()
