"""What the paid proxy adds to a request on the API-key path, against the bare upstream.

    .venv/bin/python bench/http_overhead.py [--requests N] [--concurrency C]

Starts a real mint, the test upstream and the node's HTTP app on loopback, funds an API key,
then drives the same chat request at the upstream directly (the baseline) and through the
node, from a separate load process. Prints p50/p90 and requests/s for both, the p50 the node
adds and the throughput ratio. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.cashu_client import TokenFactory  # noqa: E402
from tests.support.http_node import UPSTREAM_KEY, start_node  # noqa: E402
from tests.support.services import start_mint  # noqa: E402


@contextlib.contextmanager
def upstream_process() -> Iterator[SimpleNamespace]:
    """The test upstream in its own process; yields an object with its ``url``."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_upstream.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield SimpleNamespace(url=proc.stdout.readline().strip())
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=10)


def load(url: str, key: str, requests: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "_load.py"),
            url,
            key,
            str(requests),
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mint = start_mint(input_fee_ppk=0, workdir=Path(tmp) / "mint")
        try:
            with upstream_process() as upstream:
                node = await start_node(Path(tmp), [mint.url], upstream)  # type: ignore[arg-type]
                try:
                    factory = TokenFactory(mint.url, "sat", Path(tmp) / "wallet")
                    token = await factory.token(1_000_000)
                    key, _ = await node.core.payments.create_key(token)
                    await factory.aclose()
                    runs = {}
                    for name, url, credential in (
                        ("upstream", upstream.url + "/chat/completions", UPSTREAM_KEY),
                        ("node", node.base + "/chat/completions", key),
                    ):
                        runs[name] = await asyncio.to_thread(
                            load, url, credential, args.requests, args.concurrency
                        )
                        r = runs[name]
                        print(
                            f"{name:<9} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:7.3f} ms"
                            f"   p90 {r['p90_ms']:7.3f} ms"
                        )
                    added = runs["node"]["p50_ms"] - runs["upstream"]["p50_ms"]
                    ratio = runs["node"]["rps"] / runs["upstream"]["rps"]
                    print(f"node adds p50 {added:.3f} ms; throughput ratio {ratio:.2f}")
                    report = await node.core.ledger.audit()
                    print(f"books audit: {'ok' if report.ok else report}")
                finally:
                    await node.stop()
        finally:
            mint.close()


if __name__ == "__main__":
    asyncio.run(main())
