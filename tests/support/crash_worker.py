"""A process that runs one wallet operation so a test can kill -9 it mid-way.

    python -m tests.support.crash_worker DB MINT_URL PROXY_URL receive TOKEN ACCOUNT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL send AMOUNT_MSAT ACCOUNT UNIT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL melt BOLT11 ACCOUNT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL dm UPSTREAM SENDER EVENT_ID TEXT
    python -m tests.support.crash_worker DB MINT_URL PROXY_URL create TOKEN

It prints ``ready`` once the wallet has loaded the mint's keysets, waits for a line on
stdin, runs the operation and prints ``done``. ``dm`` handles one DM the way the listener
does (accepted -> handled -> done), printing ``settled`` and waiting for another line
between the handler's return and the ``done`` record: the window a kill -9 aims at.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nodeprov.core.melt import Melter
from nodeprov.nostr.chat import ChatSessions, handle_plain
from nodeprov.nostr.dm_handlers import DmContext, handle_json
from nodeprov.nostr.dm_store import DmStore
from nodeprov.protocol import dm_jobs
from nodeprov.protocol.nostr_event import Keys
from nodeprov.upstream import Upstreams
from tests.support.core import Core, build_core
from tests.support.ledger_backends import use_from_env


async def dm_context(
    db: Path, mint_url: str, upstream_url: str, proxy_url: str | None = None
) -> tuple[Core, DmContext]:
    """A core and DM context like the listener's, over the fake upstream at ``upstream_url``
    (the mint's traffic through ``proxy_url`` when given)."""
    from tests.support.nostr_client import node_config

    upstream: Any = SimpleNamespace(url=upstream_url)
    config = node_config([], [mint_url], upstream)
    routes = {mint_url: proxy_url} if proxy_url and proxy_url != mint_url else None
    core = await build_core(
        db, [mint_url], models=dict(config.models), mint_timeout=60.0, routes=routes
    )
    store = DmStore(core.ledger.db)
    ctx = DmContext(config, core.payments, Upstreams.from_config(config), Keys.generate(), store)
    return core, ctx


async def dm_reply(ctx: DmContext, sender: str, text: str, event_id: str, resumed: bool) -> str:
    """The reply the listener would store for one DM (JSON job or plain text)."""
    msg = dm_jobs.parse_client_message(text)
    if isinstance(msg, dm_jobs.PlainText):
        return await handle_plain(ctx, ChatSessions(0), sender, msg.text, event_id, resumed)
    return await handle_json(ctx, sender, msg, event_id, resumed)


async def dm_job(db: Path, mint_url: str, proxy_url: str, args: list[str]) -> None:
    upstream_url, sender, event_id, text = args
    core, ctx = await dm_context(db, mint_url, upstream_url, proxy_url)
    await ctx.store.accept(event_id, sender, "nip17", "")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    reply = await dm_reply(ctx, sender, text, event_id, resumed=False)
    print("settled", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await ctx.store.done(event_id, [reply])
    print("done", flush=True)
    await ctx.upstreams.aclose()
    await core.close()


async def main(argv: list[str]) -> None:
    db, mint_url, proxy_url, action, *args = argv
    use_from_env()
    if action == "dm":
        await dm_job(Path(db), mint_url, proxy_url, args)
        return
    core = await build_core(Path(db), [mint_url], mint_timeout=60.0, routes={mint_url: proxy_url})
    quote = None
    if action == "melt":  # quoted before the crash window: the window is the payment itself
        quote = await Melter(core.wallet).quote(args[0], mint_url=mint_url, unit="sat")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    if action == "receive":
        await core.wallet.receive(args[0], args[1], "api_key")
    elif action == "create":  # POST /v1/wallet/create's work: a key funded by the token
        await core.payments.create_key(args[0])
    elif quote is not None:
        await Melter(core.wallet).pay(args[1], quote)
    else:
        await core.wallet.send(args[1], int(args[0]), mint_url=mint_url, unit=args[2])
    print("done", flush=True)
    await core.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
