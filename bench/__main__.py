"""``make bench``: what the node costs, each measure against a baseline in the same run.

    python -m bench [--quick] [--only latency,throughput,streaming,streams,ledger,dm,scale]
                    [--workers N]
    (or BENCH_QUICK=1, BENCH_ONLY=..., BENCH_WORKERS=N)

Starts a real nutshell mint, the fast upstream (``bench/_upstream.py``) and ``nodeprov start``
as a subprocess pinned to one core; the mint, the upstream, the load generators
(``bench/_load.py``) and this harness run on another. Each measure runs the same load against
the upstream directly and through the node. Prints the table and writes it, with the machine,
versions, commit and command, to ``bench/results/<date>.md`` (``<date>-quick.md`` for a quick
run). Every process it starts is stopped at the end, also on failure or Ctrl-C. ``scale`` runs
the node on PostgreSQL with one worker and with ``--workers N`` (default 2) beside SQLite
(``bench/_scale.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from bench import _measures as m
from bench._load import raise_fd_limit
from bench._procs import Cores, Node, Procs, start_upstream
from bench._report import RunInfo, table, write
from bench._scale import scale
from tests.support.cashu_client import TokenFactory, import_cashu
from tests.support.services import free_port, start_mint, start_relay

MEASURES = ("latency", "throughput", "streaming", "dm", "ledger", "streams", "scale")


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")))
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("BENCH_WORKERS", "2")),
        help="worker processes of the scale measure's PostgreSQL node (default 2)",
    )
    parser.add_argument(
        "--note",
        default=os.environ.get("BENCH_NOTE", ""),
        help="a line for the results file (say what else ran on the machine)",
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(MEASURES)
    unknown = set(chosen) - set(MEASURES)
    if unknown:
        parser.error(f"unknown measures {sorted(unknown)}; choose from {', '.join(MEASURES)}")
    args.measures = [x for x in MEASURES if x in chosen]
    return args


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: the children are stopped


def create_key(node: Node, token: str) -> str:
    response = httpx.post(node.url + "/v1/wallet/create", json={"cashu_token": token}, timeout=30)
    response.raise_for_status()
    key: str = response.json()["api_key"]
    return key


def run(args: argparse.Namespace, workdir: Path, procs: Procs, runner: asyncio.Runner) -> None:
    cores = Cores.pick()
    partial = set(args.measures) != set(MEASURES)
    info = RunInfo.now(cores, args.quick, partial)  # the commit measured, not later changes
    plan = m.Plan.make(args.quick)
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})  # the mint and relay inherit it
    print(f"bench: {', '.join(args.measures)}{' (quick)' if args.quick else ''}; "
          f"{cores.describe()}; work dir {workdir}", flush=True)  # fmt: skip
    mint = start_mint(input_fee_ppk=0, workdir=workdir / "mint")
    relay = start_relay(workdir=workdir / "relay") if "dm" in args.measures else None
    factory = TokenFactory(mint.url, "sat", workdir / "wallet")
    try:
        upstream, _ = start_upstream(procs, cores.load, "--chunks", str(plan.chunks),
                                     "--gap-ms", str(plan.gap_ms))  # fmt: skip
        node = Node(procs, workdir, cores.node, mint.url, upstream, relay.url if relay else None)
        node.start(free_port)
        b = m.Bench(procs, cores, plan, workdir, upstream, node, runner.run)
        api_key = create_key(node, runner.run(factory.token(100_000)))
        steps: dict[str, Callable[[], None]] = {
            "latency": lambda: latency(b, factory, runner, api_key),
            "throughput": lambda: m.throughput(b, api_key),
            "streaming": lambda: m.streaming(b, api_key),
            "dm": lambda: m.dm(b, relay.url if relay else "", runner.run(factory.token(10_000))),
            "ledger": lambda: m.ledger(b),
            "streams": lambda: m.open_streams(b, api_key, lambda: node.restart(free_port)),
            "scale": lambda: scale(
                b, mint.url, lambda: runner.run(factory.token(100_000)), args.workers
            ),
        }
        for name in args.measures:
            print(f"bench: {name} ...", flush=True)
            try:
                steps[name]()
            except Exception as exc:  # one broken measure must not lose the others
                traceback.print_exc()
                b.rows.append(
                    m.Row(f"{name}: FAILED", "-", f"{type(exc).__name__}: {exc}"[:200], "-")
                )
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"the node died during {name}:\n{node.log_tail()}")
        b.notes += [
            "direct = the same requests sent to the upstream itself; added = node - direct.",
            "The load generator and the upstream share one CPU: the direct req/s is their joint "
            "ceiling, far above what the node reaches, so the generator is not the bottleneck.",
        ]
        if args.note:
            b.notes.append(args.note)
        print(table(b.rows), flush=True)
        path = write(b.rows, b.notes, info)
        print(f"bench: wrote {path}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            runner.run(factory.aclose())
        procs.stop_all()
        if relay is not None:
            relay.close()
        mint.close()


def latency(b: m.Bench, factory: TokenFactory, runner: asyncio.Runner, api_key: str) -> None:
    """Mint the tokens measure (1) needs, time bare swaps, then run it."""
    token_key = runner.run(factory.token(100_000))
    tokens = [runner.run(factory.token(1)) for _ in range(b.plan.xcashu_tokens + 2)]
    swaps = runner.run(time_swaps(factory, b.plan.swaps))
    m.latency(b, api_key, token_key, tokens, swaps)


async def time_swaps(factory: TokenFactory, n: int) -> list[float]:
    """Seconds per bare swap of a fresh 1-sat token at the mint: the cashu wallet's POST /v1/swap
    and its answer, without the wallet's bookkeeping around it (nor the new HTTP client it
    builds for every call)."""
    import_cashu()
    from cashu.wallet.v1_api import LedgerAPI

    tokens = [await factory.token(1) for _ in range(n + 2)]
    out: list[float] = []
    original = LedgerAPI._request

    async def timed(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original(self, method, path, *args, **kwargs)
        finally:
            if path.endswith("swap"):
                out.append(time.perf_counter() - t0)

    LedgerAPI._request = timed
    try:
        for token in tokens:
            await factory.redeem(token)
    finally:
        LedgerAPI._request = original
    return out[2:]


def main() -> int:
    args = options()
    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C interrupts the run even when started from a shell that ignores SIGINT (`... &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="nodeprov-bench-"))
    procs = Procs()
    try:
        with asyncio.Runner() as runner:
            run(args, workdir, procs, runner)
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            print(f"bench: work directory kept at {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
