"""A process that runs one wallet operation so a test can kill -9 it mid-way.

    python -m tests.support.crash_worker DB MINT_URL PROXY_URL receive TOKEN ACCOUNT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL send AMOUNT_MSAT ACCOUNT UNIT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL melt BOLT11 ACCOUNT

It prints ``ready`` once the wallet has loaded the mint's keysets, waits for a line on
stdin, runs the operation and prints ``done``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from nodeprov.core.melt import Melter
from tests.support.core import build_core


async def main(argv: list[str]) -> None:
    db, mint_url, proxy_url, action, *args = argv
    core = await build_core(Path(db), [mint_url], mint_timeout=60.0, routes={mint_url: proxy_url})
    quote = None
    if action == "melt":  # quoted before the crash window: the window is the payment itself
        quote = await Melter(core.wallet).quote(args[0], mint_url=mint_url, unit="sat")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    if action == "receive":
        await core.wallet.receive(args[0], args[1], "api_key")
    elif quote is not None:
        await Melter(core.wallet).pay(args[1], quote)
    else:
        await core.wallet.send(args[1], int(args[0]), mint_url=mint_url, unit=args[2])
    print("done", flush=True)
    await core.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
