"""(7) Scaling out: the ledger on PostgreSQL, one worker against two, SQLite beside them.

Three nodes in turn, each on its own data dir and ledger: SQLite with one process (today's
default), PostgreSQL with one worker, PostgreSQL with two (``start --workers 2``). 32 clients
each pay with a key of their own (a node serves many users), and then all with one key: every
request of one key updates that key's row twice, and PostgreSQL holds a row's lock until the
commit is on disk, so one key's requests queue one commit after another. PostgreSQL
runs from Debian's binaries (``tests/support/postgres.py``) with fsync and synchronous commit
on, as in production. The node's processes are not pinned here: two workers need both cores,
which they share with the load generator, the upstream and PostgreSQL itself, so the two-worker
figure is what this whole machine does, not what a second core alone adds. Each run also
measures the CPU one request costs the node, PostgreSQL and the rest of the machine, and so the
most requests/s the machine's cores allow at that cost (:mod:`bench._cpu`): a second worker
can add no more than what the first left idle.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

import httpx

from bench._cpu import CpuMeter, Usage
from bench._measures import Bench, Load, Row, ms, signed
from bench._procs import Node
from tests.support.postgres import PostgresServer, find_bin_dir
from tests.support.services import free_port

CLIENTS = 32


def _key(node: Node, token: str) -> str:
    response = httpx.post(node.url + "/v1/wallet/create", json={"cashu_token": token}, timeout=30)
    response.raise_for_status()
    return str(response.json()["api_key"])


def scale(b: Bench, mint: str, token: Callable[[], str], workers: int = 2) -> None:
    """Paid requests/s at 32 clients and the added p50 at one, per ledger and worker count."""
    if find_bin_dir() is None:
        b.rows.append(Row("scale-out (PostgreSQL)", "-", "skipped: PostgreSQL not installed",
                          "-"))  # fmt: skip
        return
    # The harness runs pinned to the load core; what starts here (PostgreSQL, the workers)
    # must have both cores, as in production.
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        server = PostgresServer.start(b.workdir / "pg", durable=True)
    finally:
        os.sched_setaffinity(0, pinned)
    results: dict[str, tuple[Load, Load, Load, Usage]] = {}
    try:
        direct = b.load(b.direct_chat)
        for label, count, url in (
            ("SQLite, 1 process", 1, ""),
            ("PostgreSQL, 1 worker", 1, server.create_database()),
            (f"PostgreSQL, {workers} workers", workers, server.create_database()),
        ):
            workdir = b.workdir / f"scale-{secrets.token_hex(3)}"
            workdir.mkdir()
            node = Node(b.procs, workdir, None, mint, b.upstream, None, ledger_url=url,
                        workers=count)  # fmt: skip
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            try:
                node.start(free_port)
            finally:
                os.sched_setaffinity(0, pinned)
            try:
                keys = [_key(node, token()) for _ in range(CLIENTS)]
                auth = (f"Authorization: Bearer {keys[0]}",)
                chat = node.url + "/v1/chat/completions"
                one = b.load(chat, headers=auth)
                meter = CpuMeter(node.pid, server.pid if url else None)
                meter.start()
                many = b.load(chat, clients=CLIENTS, keys=keys)
                usage = meter.stop()
                one_key = b.load(chat, clients=CLIENTS, headers=auth)
                results[label] = (one, many, one_key, usage)
            finally:
                node.stop()
    finally:
        server.stop()
    base = results["PostgreSQL, 1 worker"][1].rate
    for label, (one, many, one_key, usage) in results.items():
        a50 = one.p(0.5) - direct.p(0.5)
        ratio = f"{many.rate / base:.2f}x PostgreSQL 1 worker" if base else "-"
        target, met = "-", None
        if workers == 2 and label == "PostgreSQL, 2 workers":
            target, met = ">= 1.6x one worker", bool(base) and many.rate >= 1.6 * base
        b.rows.append(Row(
            f"scale: {label}: paid requests/s, {CLIENTS} clients with a key each "
            "(with one key); added p50 at 1 client",
            f"{direct.rate:,.0f}/s at 1 client direct",
            f"{many.rate:,.0f}/s, p99 {ms(many.p(0.99))} ms, {many.error_text()} "
            f"({one_key.rate:,.0f}/s); {signed(a50)} ms; {_cpu_text(usage, many.rate)}",
            ratio, target, met,
        ))  # fmt: skip


def _cpu_text(usage: Usage, rate: float) -> str:
    node, postgres, rest = usage.per_request_ms(rate)
    ceiling = usage.ceiling(rate)
    return (
        f"CPU per request: node {node:.2f} ms, PostgreSQL {postgres:.2f} ms, rest {rest:.2f} ms "
        f"({usage.machine:.2f} of {usage.cores} cores busy; at this cost the cores allow "
        f"{ceiling:,.0f}/s = {ceiling / rate if rate else 0:.2f}x this)"
    )
