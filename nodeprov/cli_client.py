"""``nodeprov client``: the user's side: wallet, local paying proxy, ``ask`` and ``discover``.

The wallet lives in ``--data-dir`` (else ``$NODEPROV_CLIENT_DIR``, else ``~/.nodeprov-client``).
Errors are one ``error: …`` line on stderr (exit 1); ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
import httpx

from nodeprov import event_loop
from nodeprov.client.ask import ask_http, ask_nostr, chat_body, client_keys
from nodeprov.client.discover import discover
from nodeprov.client.pay import DEFAULT_CAP_MSAT, PayingClient
from nodeprov.client.provider import DEFAULT_RELAYS, announced, is_url, resolve
from nodeprov.client.proxy import run_proxy
from nodeprov.client.wallet import ENV_DATA_DIR, ClientWallet
from nodeprov.core.money import check_unit, format_msat, to_msat
from nodeprov.errors import NodeprovError

T = TypeVar("T")

data_dir_option = click.option(
    "--data-dir", envvar=ENV_DATA_DIR, type=click.Path(file_okay=False),
    help=f"Client wallet folder (env {ENV_DATA_DIR}; default ~/.nodeprov-client).",
)  # fmt: skip
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
relay_option = click.option(
    "--relay", "relays", multiple=True, help="Relay URL (repeatable); default: public relays."
)


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; expected failures become one error line."""
    try:
        return event_loop.run(coro)
    except NodeprovError as exc:
        fail(exc.message)
    except (OSError, sqlite3.Error, httpx.HTTPError) as exc:
        fail(str(exc) or type(exc).__name__)


async def with_wallet(data_dir: str | None, work: Callable[[ClientWallet], Awaitable[T]]) -> T:
    wallet = await ClientWallet.open(data_dir)
    try:
        return await work(wallet)
    finally:
        await wallet.close()


def emit(as_json: bool, data: Any, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def client() -> None:
    """Use a node: a local Cashu wallet, a paying OpenAI proxy, ask and discover."""


@client.group()
def wallet() -> None:
    """The local client wallet: fund, balance, send, receive."""


@wallet.command()
@click.argument("token", required=False)
@click.option("--amount", type=int, help="Mint this amount from --mint via a Lightning quote.")
@click.option("--mint", "mint_url", help="Mint URL for --amount.")
@click.option("--unit", type=click.Choice(["sat", "msat"]), default="sat", show_default=True)
@click.option("--wait", type=float, default=120.0, show_default=True, help="Seconds to wait.")
@data_dir_option
@json_option
def fund(
    token: str | None, amount: int | None, mint_url: str | None, unit: str, wait: float,
    data_dir: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Fund the wallet with TOKEN, or mint --amount at --mint (bolt11 quote)."""
    if (token is None) == (amount is None):
        fail("give a TOKEN or --amount N --mint URL")
    if amount is not None and not mint_url:
        fail("--amount needs --mint URL")

    _fund(token, amount, mint_url, unit, wait, data_dir, as_json)


def _fund(
    token: str | None, amount: int | None, mint_url: str | None, unit: str, wait: float,
    data_dir: str | None, as_json: bool,
) -> None:  # fmt: skip
    async def work(w: ClientWallet) -> dict[str, Any]:
        if token is not None:
            got = await w.receive_token(token)
        else:
            assert amount is not None and mint_url is not None
            got = await w.fund_amount(mint_url, amount, unit, wait=wait)
        return {"credited_msat": got.credited_msat, "fee": got.fee, "mint": got.mint_url,
                "unit": got.unit, "balance_msat": await w.balance_msat()}  # fmt: skip

    out = run(with_wallet(data_dir, work))
    credited, total = format_msat(out["credited_msat"]), format_msat(out["balance_msat"])
    emit(as_json, out, f"credited {credited}; balance {total}")


@wallet.command()
@data_dir_option
@json_option
def balance(data_dir: str | None, as_json: bool) -> None:
    """Show the balance, per mint and unit."""

    async def work(w: ClientWallet) -> dict[str, Any]:
        return {"balance_msat": await w.balance_msat(), "pools": await w.holdings(),
                "audit_ok": await w.audit_ok()}  # fmt: skip

    out = run(with_wallet(data_dir, work))
    lines = [f"balance: {format_msat(out['balance_msat'])}"]
    lines += [f"  {p['mint']} {p['amount']} {p['unit']}" for p in out["pools"]]
    if not out["audit_ok"]:
        lines.append("warning: the wallet's books and proofs disagree")
    emit(as_json, out, "\n".join(lines))


@wallet.command()
@click.argument("amount", type=int)
@click.option("--unit", type=click.Choice(["sat", "msat"]), default="sat", show_default=True)
@click.option("--mint", "mint_url", help="Send from this mint (default: any holding enough).")
@data_dir_option
@json_option
def send(amount: int, unit: str, mint_url: str | None, data_dir: str | None, as_json: bool) -> None:
    """Print a token worth AMOUNT (in --unit) taken from the wallet."""
    if amount <= 0:
        fail("AMOUNT must be positive")

    async def work(w: ClientWallet) -> dict[str, Any]:
        sent = await w.send_amount(to_msat(amount, check_unit(unit)), mint_url=mint_url, unit=unit)
        return {"token": sent.token, "amount": sent.amount, "unit": sent.unit,
                "mint": sent.mint_url, "fee": sent.fee}  # fmt: skip

    out = run(with_wallet(data_dir, work))
    emit(as_json, out, out["token"])


@wallet.command()
@click.argument("token")
@data_dir_option
@json_option
def receive(token: str, data_dir: str | None, as_json: bool) -> None:
    """Receive TOKEN into the wallet (its mint is remembered)."""
    _fund(token, None, None, "sat", 0.0, data_dir, as_json)


def _payer(w: ClientWallet, http: httpx.AsyncClient, provider: Any, cap: int) -> PayingClient:
    return PayingClient(w, provider, http, cap_msat=cap)


cap_option = click.option(
    "--cap-msat", type=int, default=DEFAULT_CAP_MSAT, show_default=True,
    help="Never pay more than this per request.",
)  # fmt: skip


@client.command()
@click.option("--provider", "target", required=True, help="Provider URL or npub.")
@click.option("--port", type=int, default=8402, show_default=True, help="Local port (0: any).")
@relay_option
@cap_option
@data_dir_option
def proxy(
    target: str, port: int, relays: tuple[str, ...], cap_msat: int, data_dir: str | None
) -> None:
    """Serve an OpenAI-compatible API on 127.0.0.1 that pays PROVIDER per request."""

    async def work(w: ClientWallet) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            provider = await resolve(target, http, relays)
            ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            where = f"proxy for {provider.base_url} at http://127.0.0.1:{{}}/v1 (Ctrl+C stops)"
            ready.add_done_callback(lambda f: click.echo(where.format(f.result()), err=True))
            await run_proxy(_payer(w, http, provider, cap_msat), port, ready=ready)

    with contextlib.suppress(KeyboardInterrupt):
        run(with_wallet(data_dir, work))


@client.command()
@click.argument("prompt")
@click.option("--provider", "target", required=True, help="Provider npub or URL.")
@click.option("--via", type=click.Choice(["nostr", "http"]), help="Default: nostr for an npub.")
@click.option("--model", default=None, help="Model id (default: the provider's first).")
@click.option("--max-tokens", type=int, default=None, help="Output token limit.")
@click.option("--wait", type=float, default=60.0, show_default=True, help="Seconds for a reply.")
@relay_option
@cap_option
@data_dir_option
@json_option
def ask(
    prompt: str, target: str, via: str | None, model: str | None, max_tokens: int | None,
    wait: float, relays: tuple[str, ...], cap_msat: int, data_dir: str | None, as_json: bool,
) -> None:  # fmt: skip
    """Ask PROMPT once, paid from the wallet (NIP-17 DM job, or HTTP with X-Cashu)."""
    mode = via or ("http" if is_url(target) else "nostr")
    if mode == "nostr" and is_url(target):
        fail("--via nostr needs an npub provider")

    async def work(w: ClientWallet) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=max(wait, 10)) as http:
            if mode == "http":
                provider = await resolve(target, http, relays)
            else:
                provider = await announced(target, relays)
            chosen = model or (provider.models[0] if provider.models else None)
            if chosen is None:
                fail("the provider lists no models; pass --model")
            payer = _payer(w, http, provider, cap_msat)
            body = chat_body(prompt, chosen, max_tokens)
            if mode == "http":
                answer = await ask_http(payer, body)
            else:
                use = relays or provider.relays or DEFAULT_RELAYS
                answer = await ask_nostr(payer, body, client_keys(w.dir or _no_dir()),
                                         tuple(use), wait=wait)  # fmt: skip
        out = answer.to_json()
        out["balance_msat"] = await w.balance_msat()
        return out

    out = run(with_wallet(data_dir, work))
    for problem in out["problems"]:
        click.echo(f"warning: {problem}", err=True)
    note = (
        f"[paid {out['paid_msat']} msat, {out['change_msat']} msat back as change,"
        f" cost {out['cost_msat']} msat; balance {format_msat(out['balance_msat'])}]"
    )
    emit(as_json, out, f"{out['answer']}\n{note}")


def _no_dir() -> NoReturn:
    fail("the wallet has no folder")


@client.command(name="discover")
@click.option("--model", default=None, help="Only providers offering this model.")
@click.option("--wait", type=float, default=5.0, show_default=True, help="Seconds per relay.")
@relay_option
@json_option
def discover_cmd(model: str | None, wait: float, relays: tuple[str, ...], as_json: bool) -> None:
    """List announced providers (kinds 38421/31990) with models and prices, cheapest first."""
    found = run(discover(relays or DEFAULT_RELAYS, model=model, wait=wait))
    data = [f.to_json(model) for f in found]
    lines = []
    for f in found:
        state = "ok" if f.reachable else f"down ({f.error})"
        cost = f.cost(model)
        lines.append(f"{f.name or '?'}  {f.url or '-'}  {f.npub}  {state}  ref {cost} msat")
        lines += [f"    {m}: {p}" for m, p in sorted(f.models.items())]
        lines += [f"    warning: {w}" for w in f.warnings]
    emit(as_json, data, "\n".join(lines) or "no providers found")
