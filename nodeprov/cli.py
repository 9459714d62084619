"""The ``nodeprov`` command: init, start, demo, status; the other groups from ``cli_*``.

Errors a user can fix (bad config, missing file) are one ``error: …`` line on stderr
with exit code 2; other failures exit 1. No command prints a traceback for them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tomllib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from nodeprov import __version__
from nodeprov.cli_client import client
from nodeprov.cli_common import (
    DEFAULT_CONFIG,
    DEV_CONFIG,
    USAGE_EXIT,
    Options,
    accept_config_after,
    emit_json,
    fail,
    guarded,
    load,
    own_data_dir,
    refuse_placeholders,
)
from nodeprov.cli_ledger import ledger
from nodeprov.cli_models import models
from nodeprov.cli_node import admin, announce
from nodeprov.cli_ops import keys
from nodeprov.cli_wallet import wallet
from nodeprov.cli_workers import (
    refuse_workers_on_sqlite,
    run_worker,
    start_workers,
    where,
)
from nodeprov.config import Config
from nodeprov.core.identity import load_or_create_keys
from nodeprov.core.node import Core, open_books
from nodeprov.daemon import books, run
from nodeprov.event_loop import LOOP_CHOICES, LoopChoice
from nodeprov.logging_setup import setup_logging
from nodeprov.workers import LISTEN_FD_OPTION, PARENT_OPTION, READY_FD_OPTION

# Package data, so that `init` works wherever nodeprov is installed (config/ links to it).
EXAMPLE_CONFIG = Path(__file__).resolve().parent / "nodeprov.example.toml"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="NODEPROV_CONFIG",
    help="Config file (TOML). Default: $NODEPROV_CONFIG, else ./nodeprov.toml if present.",
)
@click.option("--log-json", is_flag=True, help="Log JSON lines to stderr instead of plain text.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Least severe log level shown.",
)
@click.version_option(__version__, prog_name="nodeprov")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_json: bool, log_level: str) -> None:
    """nodeprov: sell LLM access for Cashu eCash over HTTP and Nostr.

    Settings come from the config file, overridden by NODEPROV_<SECTION>__<KEY>
    environment variables (see docs/configuration.md).
    """
    source = ctx.get_parameter_source("config_path")
    ctx.obj = Options(config_path, source == ParameterSource.COMMANDLINE)
    setup_logging(json_lines=log_json, level=log_level)


# --- init --------------------------------------------------------------------------------


@main.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def init(ctx: click.Context, path: Path | None) -> None:
    """Write a commented config to PATH (default: --config, else ./nodeprov.toml).

    The file is a copy of config/nodeprov.example.toml listing every option; an existing
    file is never overwritten. Edit wallet.mints, [[upstreams]] and [models] before
    `nodeprov start`. Also generates the provider's Nostr key into data_dir/nostr.key
    (mode 0600; kept if it exists) and prints its npub.
    """
    options = ctx.find_object(Options)
    target = path or (options.config_path if options else None) or DEFAULT_CONFIG
    try:
        example = EXAMPLE_CONFIG.read_bytes()
    except OSError:
        fail(f"the example config {EXAMPLE_CONFIG} is missing; reinstall nodeprov")
    try:
        # O_EXCL: refusing to overwrite is decided by the OS, not by a racy exists() check.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{target} already exists; not overwriting it")
    except OSError as exc:
        fail(f"cannot create {target}: {exc.strerror}")
    with os.fdopen(fd, "wb") as file:
        file.write(example)
    keys = load_or_create_keys(_key_path(target))
    click.echo(f"wrote {target}; edit it, then run: nodeprov --config {target} start")
    click.echo(f"Nostr identity {keys.npub} (key in {_key_path(target)})")


def _key_path(config_file: Path) -> Path:
    """Where the config at ``config_file`` keeps the Nostr key (data_dir/key_file)."""
    raw = tomllib.loads(config_file.read_text())
    data_dir = Path(raw.get("node", {}).get("data_dir", "./data")).expanduser()
    key_file = str(raw.get("nostr", {}).get("key_file", "nostr.key"))
    base = data_dir if data_dir.is_absolute() else config_file.resolve().parent / data_dir
    return base / key_file


# --- start -------------------------------------------------------------------------------


@main.command()
@click.option(
    "--dev",
    is_flag=True,
    help="Use config/dev.toml and start the embedded dev stack beside the daemon: a local"
    " mint (FakeWallet), a local relay and a demo upstream (canned answers).",
)
@click.option(
    "--loop",
    type=click.Choice(LOOP_CHOICES),
    default="auto",
    show_default=True,
    help="The event loop: uvloop's when installed (auto), or Python's own (asyncio).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes serving the one HTTP port (more than 1 needs the ledger on"
    " PostgreSQL: [ledger] url); one of them at a time leads (Nostr, payouts, sweeps).",
)
@click.option(LISTEN_FD_OPTION, "listen_fd", type=int, hidden=True)
@click.option(PARENT_OPTION, "worker_of", type=int, hidden=True)
@click.option(READY_FD_OPTION, "ready_fd", type=int, hidden=True)
@click.pass_context
def start(
    ctx: click.Context,
    dev: bool,
    loop: LoopChoice,
    workers: int,
    listen_fd: int | None,
    worker_of: int | None,
    ready_fd: int | None,
) -> None:
    """Run the daemon until Ctrl+C or SIGTERM.

    Runs the core (ledger, wallet, pricing, payments, recovery, housekeeping) and the
    channels that are built in. With --dev it first starts the embedded dev stack at the
    addresses config/dev.toml names (mint 127.0.0.1:3338, relay :7777, demo upstream
    :8088, data in config/data/dev), then prints the HTTP URL, the npub, a fresh demo
    token and examples to paste. Move it with the usual overrides, e.g.
    NODEPROV_WALLET__MINTS='["http://127.0.0.1:4338"]', NODEPROV_NOSTR__RELAYS='["ws://
    127.0.0.1:8777"]', NODEPROV_UPSTREAMS__0__BASE_URL=http://127.0.0.1:9088/v1,
    NODEPROV_HTTP__PORT=9000. A service already running at one of those addresses is
    reused; the stack's processes are stopped when the daemon stops.

    One process owns a data dir: a second start on the same data dir exits at once with
    code 2 ("already running (pid N, data dir D)") and changes nothing.

    --workers N runs a supervisor that binds the port and owns the data dir, and N worker
    processes that serve it; a worker that dies is restarted (README "Workers and
    leadership").
    """
    if listen_fd is not None:
        run_worker(ctx, listen_fd, worker_of, ready_fd, loop)
        return
    options = ctx.find_object(Options)
    path = None
    if dev and workers > 1:
        fail("--dev runs one process; drop --workers or run your own config", USAGE_EXIT)
    if dev:
        if options and options.config_on_command_line:
            fail(
                "give --dev or --config, not both: --dev runs the dev stack on config/dev.toml;"
                " change it with NODEPROV_* overrides (e.g. NODEPROV_HTTP__PORT=9000 nodeprov"
                " start --dev), or run your own config without --dev",
                USAGE_EXIT,
            )
        if not DEV_CONFIG.is_file():
            fail(f"--dev needs {DEV_CONFIG} from a source checkout; use --config FILE", USAGE_EXIT)
        path = DEV_CONFIG
    config = load(ctx, path)
    refuse_placeholders(config)
    refuse_workers_on_sqlite(config, workers)
    # Before anything else (ledger, dev-stack children, banner): one owner per data dir.
    owner = own_data_dir(config, "start")
    try:
        if workers > 1:
            start_workers(ctx, config, workers, loop)
        else:
            _start(config, dev, loop)
    finally:
        owner.release()


def _start(config: Config, dev: bool, loop: LoopChoice) -> None:
    if dev:
        from nodeprov.devstack.runner import run_dev

        guarded(run_dev(config, say=_say), loop)
        click.echo("nodeprov stopped.")
        return

    def ready(core: Core) -> None:
        # Everything allocated at start (modules, config, the core) leaves the collector's
        # view: a full collection then scans only what requests allocate, so it stays short
        # instead of stalling the requests behind it (p99 at 32 clients: 52 -> 36 ms).
        gc.collect()
        gc.freeze()
        pid = os.getpid()
        models = len(core.config.models)
        click.echo(
            f"{config.node.name} running (pid {pid}): ledger {config.ledger_shown},"
            f" {len(core.wallet.mints)} mint(s), {models} priced model(s)."
        )
        for line in where(core.config, core.npub):
            click.echo(line)
        click.echo(f"Stop with Ctrl+C or `kill -TERM {pid}`.")

    guarded(run(config, asyncio.Event(), on_ready=ready), loop)
    click.echo("nodeprov stopped.")


def _say(line: str) -> None:
    click.echo(line)


# --- demo --------------------------------------------------------------------------------


@main.command()
@click.option(
    "--amount",
    default=2000,
    show_default=True,
    type=click.IntRange(min=100),
    help="Sat to mint for the tour (from the dev mint's FakeWallet: free test money).",
)
@click.pass_context
def demo(ctx: click.Context, amount: int) -> None:
    """Run a scripted tour against the running dev node (`nodeprov start --dev`).

    Mints demo tokens from the local FakeWallet mint, then: creates an API key from a
    token, pays a streamed chat with it, pays one request with X-Cashu and shows the
    change, pays a job by NIP-17 DM, reads the node's announcements back from the relay,
    and prints the final balances and the audit. Every step prints its amounts; a step
    whose channel is not running prints "skipped: <why>". Uses config/dev.toml (plus
    NODEPROV_* overrides) unless --config is given.
    """
    from nodeprov.devstack.demo import run_demo

    options = ctx.find_object(Options)
    on_command_line = bool(options and options.config_on_command_line)
    config = load(ctx, None if on_command_line or not DEV_CONFIG.is_file() else DEV_CONFIG)
    ok = guarded(run_demo(config, amount=amount, say=_say))
    if not ok:
        raise click.exceptions.Exit(1)


# --- status ------------------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show the configuration and the ledger's totals (read-only; safe while running)."""
    config = load(ctx, require_upstream=False)
    summary: dict[str, Any] = {
        "name": config.node.name,
        "data_dir": str(config.node.data_dir),
        "http": f"{config.http.host}:{config.http.port}",
        "relays": list(config.nostr.relays),
        "mints": list(config.wallet.mints),
        "units": list(config.wallet.units),
        "upstreams": [u.name for u in config.upstreams],
        "models": sorted(config.models),
        "fee_multiplier": str(config.pricing.fee_multiplier),
        "ledger": None,
    }
    if config.ledger_on_postgres or config.ledger_path.exists():
        summary["ledger"] = guarded(_ledger_status(config))
    if as_json:
        emit_json(summary)
        return
    for key in ("name", "data_dir", "http", "relays", "mints", "units", "upstreams", "models"):
        value = summary[key]
        shown = ", ".join(value) if isinstance(value, list) else value
        click.echo(f"{key + ':':<15}{shown or '-'}")
    click.echo(f"{'fee:':<15}x{summary['fee_multiplier']}")
    ledger = summary["ledger"]
    if ledger is None:
        click.echo(f"{'ledger:':<15}not created yet ({config.ledger_shown})")
        return
    click.echo(f"{'ledger:':<15}{config.ledger_shown}")
    accounts = ", ".join(f"{k} {n}" for k, n in ledger["accounts"].items()) or "none"
    click.echo(f"{'accounts:':<15}{accounts}")
    click.echo(f"{'users:':<15}{ledger['users_msat']} msat ({ledger['held_msat']} msat held)")
    click.echo(f"{'operator:':<15}{ledger['operator_msat']} msat")
    click.echo(f"{'pending ops:':<15}{ledger['pending_ops']}")
    if ledger["failed_ops"]:
        click.echo(f"{'failed ops:':<15}{ledger['failed_ops']} (the mint refused to settle them)")
        for op in ledger["failures"]:
            click.echo(f"{'':<15}op {op['id']} {op['kind']} at {op['mint_url']}: {op['error']}")
    click.echo(
        f"{'audit:':<15}{'ok' if ledger['audit_ok'] else 'MISMATCH (nodeprov wallet audit)'}"
    )


async def _ledger_status(config: Config) -> dict[str, Any]:
    ledger, _, client = await open_books(config)
    try:
        totals = asdict(await books(ledger))
        totals["audit_ok"] = (await ledger.audit()).ok
        return totals
    finally:
        await client.aclose()
        await ledger.db.close()


main.add_command(keys)
main.add_command(models)
main.add_command(client)
main.add_command(announce)
main.add_command(admin)
main.add_command(ledger)
main.add_command(wallet)


# People type `nodeprov start -c FILE` as often as `nodeprov -c FILE start`. The user's
# side (`client`) keeps its own wallet and reads no node config.
for _command in main.commands.values():
    if _command is not client:
        accept_config_after(_command)
