"""``nodeprov start --dev``: the dev stack, then the daemon beside it, then a banner to copy from.

The daemon runs its default services (HTTP and Nostr channels included); the stack is
stopped whatever happens (normal stop, SIGINT/SIGTERM, a crashing service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nodeprov.config import Config
from nodeprov.core.node import Core, Service
from nodeprov.daemon import default_services, run
from nodeprov.devstack.processes import DevStack, Say, StackPlan, listening
from nodeprov.devstack.tokens import mint_token
from nodeprov.errors import NodeprovError
from nodeprov.protocol.nostr_event import Keys

log = logging.getLogger(__name__)

READY = "nodeprov dev node ready"
DEMO_TOKEN_SAT = 1000


def _channel_of(service: Service) -> str | None:
    module = str(getattr(service, "__module__", ""))
    return next((c for c in ("http", "nostr") if module.startswith(f"nodeprov.{c}")), None)


def http_base(config: Config) -> str:
    """The node's public HTTP URL (``node.http_url``, else host:port), without a slash."""
    return (config.node.http_url or f"http://{config.http.host}:{config.http.port}").rstrip("/")


def node_npub(core: Any, config: Config) -> str | None:
    """The node's npub: from the core if it carries one, else from the key file."""
    npub = getattr(core, "npub", None)
    if isinstance(npub, str) and npub:
        return npub
    with contextlib.suppress(OSError, NodeprovError, ValueError):
        return Keys.parse(config.nostr_key_path.read_text().split()[0]).npub
    return None


async def run_dev(
    config: Config,
    *,
    say: Say = print,
    services: Sequence[Service] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start the dev stack, run the daemon until ``stop`` or SIGINT/SIGTERM, stop the stack."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    stack = DevStack(StackPlan.from_config(config), say)
    try:
        await stack.start(stop)
        if stop.is_set():
            return
        chosen = list(default_services() if services is None else services)
        channels = {c for s in chosen if (c := _channel_of(s))}

        async def watch_stack(core: Core, stop: asyncio.Event) -> None:
            await stack.watch(stop)

        async def banner(core: Core, stop: asyncio.Event) -> None:
            await _banner(core, config, stack, channels, say)

        say("dev stack: starting the daemon ...")
        await run(config, stop, services=[*chosen, watch_stack, banner], handle_signals=False)
    finally:
        try:
            await stack.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def _path_hint() -> list[str]:
    """How to type ``nodeprov`` when the one running is not on PATH (as after ``make run``)."""
    here = Path(sys.argv[0]).resolve()
    found = shutil.which("nodeprov")
    if here.name != "nodeprov" or (found and Path(found).resolve() == here):
        return []
    activate = here.parent / "activate"
    if activate.is_file():
        return [f"(`source {activate}` puts `nodeprov` on your PATH; or run {here})"]
    return [f"(`nodeprov` is {here}; it is not on your PATH)"]


async def _wait_for(check: Callable[[], bool], seconds: float) -> bool:
    for _ in range(int(seconds / 0.1)):
        if check():
            return True
        await asyncio.sleep(0.1)
    return check()


async def _banner(
    core: Core, config: Config, stack: DevStack, channels: set[str], say: Say
) -> None:
    """Mint a demo token and print where everything is and what to paste."""
    plan = stack.plan
    base = http_base(config)
    token: str | None = None
    if plan.mint_url:
        try:
            token = await mint_token(core.wallet, plan.mint_url, DEMO_TOKEN_SAT, "sat")
        except (NodeprovError, OSError) as exc:
            say(f"demo token: could not mint one at {plan.mint_url}: {exc}")
    if "http" in channels:
        await _wait_for(lambda: listening(config.http.port), 10.0)
    npub = None
    if "nostr" in channels:
        for _ in range(50):
            if (npub := node_npub(core, config)) is not None:
                break
            await asyncio.sleep(0.1)
    model = config.nostr.default_model or next(iter(config.models), "demo-chat")
    lines = [
        "",
        f"=== {config.node.name}: dev node (FakeWallet mint: tokens are free test money;"
        " the demo upstream gives canned answers) ===",
        f"  HTTP API  {base}/v1"
        + ("" if "http" in channels else "  (HTTP channel not wired in yet)"),
        f"  npub      {npub or '(Nostr channel not wired in yet)'}",
        f"  mint      {plan.mint_url or '-'}",
        f"  relay     {plan.relay_url or '-'}",
        f"  upstream  {plan.upstream_url or '-'}  (demo)",
        f"  data      {config.node.data_dir}",
    ]
    if token:
        lines += ["", f"A fresh demo token ({DEMO_TOKEN_SAT} sat):", f"  export TOKEN={token}"]
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
    lines += [
        "",
        'curl (token as API key; or -H "X-Cashu: $TOKEN" to pay per request and get change):',
        f'  curl -s {base}/v1/chat/completions -H "Authorization: Bearer $TOKEN" \\',
        f"    -H 'Content-Type: application/json' -d {shlex.quote(body)}",
        "openai SDK (python):",
        "  from openai import OpenAI; import os",
        f'  client = OpenAI(base_url="{base}/v1", api_key=os.environ["TOKEN"])',
        f'  print(client.chat.completions.create(model="{model}",'
        ' messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)',
        f"Nostr: send a NIP-17 DM to {npub or 'the npub'} via {plan.relay_url or 'a relay'}:",
        '  plain text "Hello $TOKEN", or JSON {"type": "request", "id": "1",'
        f' "endpoint": "/v1/chat/completions", "body": {body}, "cashu": "$TOKEN"}}',
        "Guided tour of all of this: nodeprov demo",
        *_path_hint(),
        "",
        f"{READY} (pid {os.getpid()}); stop with Ctrl+C or `kill -TERM {os.getpid()}`.",
    ]
    for line in lines:
        say(line)
