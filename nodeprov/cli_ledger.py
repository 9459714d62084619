"""CLI ``ledger copy``: move the books from the SQLite file to PostgreSQL.

The work is :func:`nodeprov.core.ledger_copy.copy_ledger`; this module owns the data dir
while it runs, turns refusals into one ``error:`` line and prints what to set next.
"""

from __future__ import annotations

import click

from nodeprov.cli_common import USAGE_EXIT, fail, load
from nodeprov.core.datadir import DataDirBusy, DataDirLock
from nodeprov.core.db import DATABASE_ERRORS
from nodeprov.core.db_base import url_password, url_without_password
from nodeprov.core.ledger_copy import CopyRefused, CopyReport, copy_ledger
from nodeprov.errors import NodeprovError
from nodeprov.event_loop import run


@click.group()
def ledger() -> None:
    """Move the books (the ledger database) from one engine to another."""


@ledger.command("copy")
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="The empty PostgreSQL database to copy into: postgresql://user@host:port/db. A"
    " password may be in the URL or come from PGPASSWORD or ~/.pgpass.",
)
@click.pass_context
def copy(ctx: click.Context, target: str) -> None:
    """Copy the books from the SQLite ledger file into an empty PostgreSQL database.

    Every table (balances, holds, the transaction log, proofs and the wallet journal, DM
    jobs, refunds, payouts...) is copied in one PostgreSQL transaction and checked before
    it commits: the same rows per table, the same audit, the same operator balance. A
    failure leaves the target empty; the SQLite file is only read, so the way back is to
    point the config at it again.

    Refused (exit 2) while the node runs on this data dir, when the configured ledger is
    not SQLite, and when the target already holds books. Prints the totals and the
    [ledger] url to set next (never the password).
    """
    config = load(ctx, require_upstream=False)
    if config.ledger_on_postgres:
        fail(
            f"the ledger is already on PostgreSQL ({config.ledger_shown}); ledger copy moves"
            " a SQLite ledger: point [ledger] url at the SQLite file to copy it",
            USAGE_EXIT,
        )
    try:
        lock = DataDirLock.acquire(config.node.data_dir, "ledger copy")
    except DataDirBusy as exc:
        if exc.command == "start":
            fail(
                f"the node is running (pid {exc.pid or '?'}, data dir {exc.data_dir}); stop it"
                " first: the books must not change while they are copied",
                USAGE_EXIT,
            )
        fail(f"{exc.message}: `nodeprov {exc.command}`; try again when it ends", USAGE_EXIT)
    except OSError as exc:
        fail(f"cannot use the data dir {config.node.data_dir}: {exc.strerror}", USAGE_EXIT)
    with lock:
        try:
            report = run(copy_ledger(config.ledger_path, target))
        except CopyRefused as exc:
            fail(_scrub(exc.message, target), USAGE_EXIT)
        except NodeprovError as exc:
            fail(_scrub(exc.message, target))
        except DATABASE_ERRORS as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            fail(_scrub(f"the copy failed and nothing was committed: {first}", target))
    _summary(report, had_password=bool(url_password(target)), back=config.ledger.url)


def _scrub(message: str, url: str) -> str:
    """``message`` with the URL's password (if any) masked, wherever a driver quoted it."""
    shown = url_without_password(url)
    message = message.replace(url, shown)
    password = url_password(url)
    return message.replace(password, "***") if password else message


def _summary(report: CopyReport, *, had_password: bool, back: str) -> None:
    audit = report.audit
    click.echo(
        f"copied {len(report.tables)} tables, {report.rows} rows from {report.source}"
        f" to {report.target}"
    )
    click.echo("  " + ", ".join(f"{table.name} {table.rows}" for table in report.tables))
    click.echo(
        f"books: assets {audit.assets_msat} msat, owed {audit.liabilities_msat} msat, operator"
        f" {report.operator_msat} msat; audit {'ok' if audit.ok else 'NOT ok'}, the same on"
        " both sides"
    )
    if not audit.ok:
        click.echo("note: the file's own books do not balance (nodeprov wallet audit)")
    click.echo("next, with the node stopped, point it at PostgreSQL in the config:")
    click.echo(f'  [ledger]\n  url = "{report.target}"')
    click.echo(f"or in the environment: NODEPROV_LEDGER__URL='{report.target}'")
    if had_password:
        click.echo(
            "the password is left out: give it in PGPASSWORD or ~/.pgpass, or put it back"
            " into the URL"
        )
    previous = f'set [ledger] url = "{back}" again' if back else "remove [ledger] url again"
    click.echo(f"the SQLite file is unchanged: to go back, {previous}")
