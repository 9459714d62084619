"""``nodeprov wallet``: the node's proofs and books (``balance``, ``audit``), and the
commands that move earnings out (``withdraw``, ``payout``: :mod:`nodeprov.cli_ops`).

Registered on the group in :mod:`nodeprov.cli`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from nodeprov.cli_common import emit_json, guarded, load
from nodeprov.cli_ops import payout, withdraw
from nodeprov.config import Config
from nodeprov.core.ledger import AuditReport
from nodeprov.core.node import open_books
from nodeprov.daemon import books

# --- wallet ------------------------------------------------------------------------------


@click.group()
def wallet() -> None:
    """The node's proofs and books (safe while running); withdraw or pay out earnings.

    withdraw and payout move money, so they need the data dir to themselves: while the
    daemon runs they refuse (exit 2); use the admin page then.
    """


wallet.add_command(withdraw)
wallet.add_command(payout)


@wallet.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def balance(ctx: click.Context, as_json: bool) -> None:
    """Show proofs held per mint and unit, and the books: users, holds, operator earnings."""
    config = load(ctx, require_upstream=False)
    data = guarded(_balance(config))
    if as_json:
        emit_json(data)
        return
    click.echo("proofs held:")
    for row in data["proofs"]:
        click.echo(f"  {row['mint']}  {row['amount']} {row['unit']} ({row['msat']} msat)")
    b = data["books"]
    accounts = ", ".join(f"{k} {n}" for k, n in b["accounts"].items()) or "no accounts"
    click.echo("books:")
    click.echo(f"  users     {b['users_msat']} msat ({accounts})")
    click.echo(f"  holds     {b['held_msat']} msat in {b['holds']} running job(s)")
    click.echo(f"  operator  {b['operator_msat']} msat earned")
    if b["pending_ops"]:
        click.echo(f"  {b['pending_ops']} wallet operation(s) pending at a mint")
    if b["failed_ops"]:
        click.echo(f"  {b['failed_ops']} wallet operation(s) failed: the mint refused them")


async def _balance(config: Config) -> dict[str, Any]:
    ledger, node_wallet, client = await open_books(config)
    try:
        held = await node_wallet.balances()
        totals = await books(ledger)
    finally:
        await client.aclose()
        await ledger.db.close()
    # Configured mints are listed even when empty, so a fresh node shows what it accepts.
    keys = {(m, u) for m in config.wallet.mints for u in config.wallet.units} | set(held)
    proofs = []
    for mint, unit in sorted(keys):
        amount = held.get((mint, unit), 0)
        msat = amount * (1000 if unit == "sat" else 1)
        proofs.append({"mint": mint, "unit": unit, "amount": amount, "msat": msat})
    return {"proofs": proofs, "books": asdict(totals)}


@wallet.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def audit(ctx: click.Context, as_json: bool) -> None:
    """Check that the proofs held match the books; exit code 1 if they do not.

    Per mint and unit the recorded assets must equal the proofs in the store, all assets
    must equal all balances owed (users + operator), and every balance must equal the sum
    of its transaction log. Local check only: the mints are not asked.
    """
    config = load(ctx, require_upstream=False)
    report, pending = guarded(_audit(config))
    if as_json:
        emit_json(
            {
                "ok": report.ok,
                "lines": [asdict(line) | {"ok": line.ok} for line in report.lines],
                "assets_msat": report.assets_msat,
                "liabilities_msat": report.liabilities_msat,
                "log_mismatches": list(report.log_mismatches),
                "pending_ops": pending,
            }
        )
    else:
        for line in report.lines:
            mark = "ok" if line.ok else "MISMATCH"
            click.echo(
                f"{mark:<9}{line.mint_url} {line.unit}: books {line.books_msat} msat,"
                f" proofs {line.proofs_msat} msat"
            )
        same = report.assets_msat == report.liabilities_msat
        click.echo(
            f"{'ok' if same else 'MISMATCH':<9}assets {report.assets_msat} msat,"
            f" owed {report.liabilities_msat} msat"
        )
        for mismatch in report.log_mismatches:
            click.echo(f"{'MISMATCH':<9}{mismatch}")
        click.echo("books balance" if report.ok else "books do NOT balance")
        if not report.ok and pending:
            click.echo(f"note: {pending} wallet operation(s) are in flight at a mint")
    if not report.ok:
        raise click.exceptions.Exit(1)


async def _audit(config: Config) -> tuple[AuditReport, int]:
    ledger, _, client = await open_books(config)
    try:
        return await ledger.audit(), (await books(ledger)).pending_ops
    finally:
        await client.aclose()
        await ledger.db.close()
