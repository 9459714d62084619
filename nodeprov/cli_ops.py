"""CLI commands that act on the books: ``keys list|show|children|revoke``, ``wallet
withdraw|payout``.

Registered on the group in :mod:`nodeprov.cli`; the shared helpers come from
:mod:`nodeprov.cli_common`. Safe while the daemon runs: every change is one ledger
transaction.
"""

from __future__ import annotations

import datetime
from typing import Any

import click

from nodeprov.cli_common import USAGE_EXIT, emit_json, fail, guarded, load, own_data_dir
from nodeprov.config import Config
from nodeprov.core.accounts_admin import (
    AccountLookupError,
    account_view,
    find_account,
    list_accounts,
    revoke,
)
from nodeprov.core.child_keys import ChildKey, ChildKeyNotFound, ChildKeys
from nodeprov.core.ledger import OPERATOR, Ledger, now
from nodeprov.core.node import build_core, open_books
from nodeprov.payouts import PayoutError, payout_now

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _when(epoch: int | None) -> str:
    if not epoch:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _config(ctx: click.Context) -> Config:
    return load(ctx, require_upstream=False)


# --- keys --------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """List, inspect and revoke user accounts (API keys, tokens used as keys, npubs)."""


@keys.command("list")
@click.option("--kind", help="Only this kind: api_key, token, request, npub.")
@click.option("--revoked/--active", default=None, help="Only revoked, or only active, accounts.")
@click.option("--min-balance-msat", type=click.IntRange(min=0), help="Only balances >= this.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@JSON_OPTION
@click.pass_context
def keys_list(
    ctx: click.Context,
    kind: str | None,
    revoked: bool | None,
    min_balance_msat: int | None,
    limit: int,
    as_json: bool,
) -> None:
    """List accounts, most recently used first (the operator account is not listed)."""

    async def query(config: Config) -> list[dict[str, Any]]:
        ledger, _, client = await open_books(config)
        try:
            found = await list_accounts(
                ledger, kind=kind, revoked=revoked, min_balance_msat=min_balance_msat, limit=limit
            )
            return [account_view(a) for a in found]
        finally:
            await client.aclose()
            await ledger.db.close()

    rows = guarded(query(_config(ctx)))
    if as_json:
        emit_json({"accounts": rows})
        return
    if not rows:
        click.echo("no accounts")
        return
    click.echo(f"{'id':<24}{'kind':<9}{'balance msat':>14}{'spent msat':>14}  last used         ")
    for row in rows:
        mark = "  revoked" if row["revoked"] else ""
        click.echo(
            f"{row['id'][:22]:<24}{row['kind']:<9}{row['balance_msat']:>14}"
            f"{row['total_spent_msat']:>14}  {_when(row['last_used_at'])}{mark}"
        )


async def _child_named(ledger: Ledger, prefix: str) -> ChildKey | None:
    """The child key PREFIX names (its ``ck_`` id, its key or masked key), when it names one
    and no account; a ``ck_`` id that names none is an error."""
    if prefix.strip().startswith("ck_"):
        child = await ChildKeys(ledger).find(prefix)
        if child is None:
            raise ChildKeyNotFound(f"no child key {prefix.strip()!r}")
        return child
    try:
        await find_account(ledger, prefix)
    except AccountLookupError:
        child = await ChildKeys(ledger).find(prefix)
        if child is None:
            raise
        return child
    return None


def _child_line(row: dict[str, Any]) -> str:
    limit = "-" if row["balance_limit"] is None else str(row["balance_limit"])
    state = "revoked" if row["revoked"] else "expired" if row["expired"] else "active"
    return (
        f"{row['id']:<20}{row['parent_id'][:22]:<24}{(row['label'] or '-')[:16]:<18}"
        f"{limit:>14}{row['total_spent']:>14}  {_when(row['validity_date']):<17} {state}"
    )


CHILD_HEADER = f"{'child':<20}{'parent':<24}{'label':<18}{'limit msat':>14}{'spent msat':>14}"


@keys.command("children")
@click.argument("parent", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True)
@JSON_OPTION
@click.pass_context
def keys_children(ctx: click.Context, parent: str | None, limit: int, as_json: bool) -> None:
    """List child keys (of PARENT, named as ``keys show`` takes it): parent, limit, spent."""

    async def query(config: Config) -> list[dict[str, Any]]:
        ledger, _, client = await open_books(config)
        try:
            children = ChildKeys(ledger)
            if parent is None:
                found = await children.all(limit)
            else:
                found = await children.of_parent((await find_account(ledger, parent)).id)
            return [c.operator_view(now()) for c in found]
        finally:
            await client.aclose()
            await ledger.db.close()

    rows = guarded(query(_config(ctx)))
    if as_json:
        emit_json({"children": rows})
        return
    if not rows:
        click.echo("no child keys")
        return
    click.echo(f"{CHILD_HEADER}  expires")
    for row in rows:
        click.echo(_child_line(row))


@keys.command("show")
@click.argument("prefix")
@click.option("--transactions", "n_tx", type=click.IntRange(min=0), default=10, show_default=True)
@JSON_OPTION
@click.pass_context
def keys_show(ctx: click.Context, prefix: str, n_tx: int, as_json: bool) -> None:
    """Show one account and its latest transactions: PREFIX is a prefix of its id, the
    user's API key (sk-…) or its masked form from /v1/wallet/balance (sk-xNKv…9f2Q), a
    token used as a key, or an npub. A child key (its ck_… id or key) shows its parent."""

    async def query(config: Config) -> dict[str, Any]:
        ledger, _, client = await open_books(config)
        try:
            child = await _child_named(ledger, prefix)
            if child is not None:
                return {"child": True, **child.operator_view(now())}
            account = await find_account(ledger, prefix)
            view = account_view(account)
            view["transactions"] = await ledger.transactions(account.id, limit=n_tx)
            children = await ChildKeys(ledger).of_parent(account.id)
            view["children"] = [c.operator_view(now()) for c in children]
            return view
        finally:
            await client.aclose()
            await ledger.db.close()

    view = guarded(query(_config(ctx)))
    if as_json:
        view.pop("child", None)
        emit_json(view)
        return
    if view.pop("child", False):
        click.echo(f"{'child key:':<22}{view['id']}  {view['api_key'] or ''}")
        click.echo(f"{'parent:':<22}{view['parent_id']}")
        for key in ("label", "balance_limit", "total_spent", "reserved"):
            click.echo(f"{key + ':':<22}{'-' if view[key] is None else view[key]}")
        click.echo(f"{'expires:':<22}{_when(view['validity_date'])}")
        click.echo(f"{'status:':<22}{_child_line(view).rsplit(' ', 1)[1]}")
        return
    click.echo(f"{'id:':<22}{view['id']}")
    if view["key_hint"]:
        click.echo(f"{'key:':<22}{view['key_hint']}")
    for key in ("kind", "balance_msat", "reserved_msat", "total_deposited_msat"):
        click.echo(f"{key + ':':<22}{view[key]}")
    click.echo(f"{'total_spent_msat:':<22}{view['total_spent_msat']}")
    click.echo(f"{'created:':<22}{_when(view['created_at'])}")
    click.echo(f"{'last used:':<22}{_when(view['last_used_at'])}")
    click.echo(f"{'expires:':<22}{_when(view['expires_at'])}")
    click.echo(f"{'status:':<22}{'revoked' if view['revoked'] else 'active'}")
    for tx in view["transactions"]:
        click.echo(f"  {_when(tx['at'])}  {tx['kind']:<16}{tx['delta_msat']:>+14} msat")
    for row in view["children"]:
        click.echo(f"  child {_child_line(row)}")


@keys.command("revoke")
@click.argument("prefix")
@JSON_OPTION
@click.pass_context
def keys_revoke(ctx: click.Context, prefix: str, as_json: bool) -> None:
    """Revoke an account (by a prefix of its id): it can no longer pay; its balance stays.
    A child key (its ck_… id or key) is revoked alone; revoking a parent stops its children."""

    async def change(config: Config) -> tuple[dict[str, Any], bool]:
        ledger, _, client = await open_books(config)
        try:
            child = await _child_named(ledger, prefix)
            if child is not None:
                revoked, changed = await ChildKeys(ledger).revoke(child.id, parent_id=None)
                return {"child": True, **revoked.operator_view(now())}, changed
            account, changed = await revoke(ledger, prefix)
            return account_view(account), changed
        finally:
            await client.aclose()
            await ledger.db.close()

    view, changed = guarded(change(_config(ctx)))
    if as_json:
        emit_json({"account": view, "changed": changed})
        return
    if view.pop("child", False):
        state = "revoked" if changed else "was already revoked"
        click.echo(f"child key {view['id']} of {view['parent_id']} {state}")
        return
    state = "revoked" if changed else "was already revoked"
    click.echo(f"{view['id']} {state} (balance {view['balance_msat']} msat kept)")


# --- wallet withdraw / payout ------------------------------------------------------------


@click.command()
@click.option("--amount-msat", type=click.IntRange(min=1), help="Default: all earnings.")
@click.option("--mint", "mint_url", help="Pay out from this trusted mint (default: any).")
@click.option("--unit", type=click.Choice(["sat", "msat"]), help="Token unit (default: any).")
@JSON_OPTION
@click.pass_context
def withdraw(
    ctx: click.Context,
    amount_msat: int | None,
    mint_url: str | None,
    unit: str | None,
    as_json: bool,
) -> None:
    """Withdraw operator earnings as a Cashu token, printed once: store it right away.

    A sat token carries whole sats; the msat remainder stays as earnings. Refused (exit
    2) while the daemon runs: withdraw from the admin page then.
    """

    async def send(config: Config) -> dict[str, Any]:
        core = await build_core(config)
        try:
            operator = await core.ledger.account(OPERATOR)
            if operator is None or operator.available_msat <= 0:
                raise PayoutError("there are no earnings to withdraw")
            sent = await core.payments.withdraw(OPERATOR, amount_msat, mint_url=mint_url, unit=unit)
            return {
                "token": sent.token,
                "amount": sent.amount,
                "unit": sent.unit,
                "mint": sent.mint_url,
                "fee": sent.fee,
                "debited_msat": sent.debited_msat,
            }
        finally:
            await core.close()

    config = _config(ctx)
    if mint_url is not None and mint_url.rstrip("/") not in {
        m.rstrip("/") for m in config.wallet.mints
    }:
        fail(f"{mint_url} is not one of the configured wallet.mints")
    # A money move beside the running daemon would race its recovery of wallet ops.
    with own_data_dir(config, "wallet withdraw"):
        data = guarded(send(config))
    if as_json:
        emit_json(data)
        return
    click.echo(
        f"withdrew {data['debited_msat']} msat of earnings: {data['amount']} {data['unit']}"
        f" at {data['mint']} (mint fee {data['fee']} {data['unit']})",
        err=True,
    )
    click.echo("the token below is shown only once; keep it safe:", err=True)
    click.echo(data["token"])


@click.command()
@click.option(
    "--address", help="Lightning address user@domain (default: payouts.lightning_address)."
)
@click.option("--amount-msat", type=click.IntRange(min=1), help="Budget incl. fees (default: all).")
@click.option("--mint", "mint_url", help="Melt at this trusted mint (default: the fullest).")
@JSON_OPTION
@click.pass_context
def payout(
    ctx: click.Context,
    address: str | None,
    amount_msat: int | None,
    mint_url: str | None,
    as_json: bool,
) -> None:
    """Pay operator earnings to a Lightning address now (LNURL-pay, melted at a mint).

    The invoice is sized so that amount + Lightning fee reserve + mint input fee fits the
    budget; the unused reserve comes back as earnings. Refused (exit 2) while the daemon
    runs: pay out from the admin page then.
    """
    config = _config(ctx)
    target = address or config.payouts.lightning_address
    if not target:
        fail("no Lightning address: pass --address or set payouts.lightning_address", USAGE_EXIT)

    async def pay() -> dict[str, Any]:
        core = await build_core(config)
        try:
            result = await payout_now(core, target, amount_msat, mint_url=mint_url)
            return {
                "id": result.id,
                "address": result.address,
                "state": result.state,
                "amount_msat": result.amount_msat,
                "fee_msat": result.fee_msat,
                "cost_msat": result.cost_msat,
                "mint": result.mint_url,
                "unit": result.unit,
                "quote": result.quote,
            }
        finally:
            await core.close()

    with own_data_dir(config, "wallet payout"):
        data = guarded(pay())
    if as_json:
        emit_json(data)
        return
    click.echo(
        f"payout #{data['id']} to {data['address']}: {data['state']}; amount"
        f" {data['amount_msat']} msat, fee {data['fee_msat']} msat via {data['mint']}"
    )
    if data["state"] == "pending":
        click.echo("the mint has not settled it yet; the daemon checks it on its next recovery")
