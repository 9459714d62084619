"""``nodeprov start``'s banner and its multi-process side: the supervisor and one worker.

Its own module so that :mod:`nodeprov.cli` stays the command group; the process mechanics
(binding once, restarting workers, dying with the supervisor) live in :mod:`nodeprov.workers`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from dataclasses import replace

import click

from nodeprov.admin_password import load_or_create as load_or_create_admin_password
from nodeprov.cli_common import USAGE_EXIT, Options, fail, guarded, load
from nodeprov.config import Config
from nodeprov.core.identity import node_keys
from nodeprov.core.key_secret import node_secret
from nodeprov.core.node import Core
from nodeprov.daemon import run
from nodeprov.errors import ConfigError
from nodeprov.event_loop import LoopChoice
from nodeprov.http.server import bind
from nodeprov.limits import raise_open_files_limit
from nodeprov.workers import (
    die_with_parent,
    say_ready,
    supervise,
    worker_command,
    worker_sockets,
)


def where(config: Config, npub: str | None) -> list[str]:
    """The banner's addresses: the API, the dashboard and the node's Nostr identity."""
    http = config.http
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(http.host, http.host)
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    base = f"http://{host}:{http.port}"
    public = config.node.http_url
    lines = [
        f"  API       {base}/v1" + (f"   (public: {public.rstrip('/')}/v1)" if public else ""),
        f"  admin     {base}/admin/",
    ]
    relays = len(config.nostr.relays)
    if npub:
        lines.append(f"  Nostr     {npub} on {relays} relay(s)")
    else:
        lines.append("  Nostr     off (no relays in nostr.relays)")
    return lines


def refuse_workers_on_sqlite(config: Config, count: int) -> None:
    """Exit 2 when ``count`` workers would share a SQLite ledger (one process only)."""
    if count > 1 and not config.ledger_on_postgres:
        fail(
            f"--workers {count} needs the ledger on PostgreSQL: set [ledger] url ="
            ' "postgresql://user@host:port/db" (or NODEPROV_LEDGER__URL); a SQLite ledger'
            " serves one process",
            USAGE_EXIT,
        )


def start_workers(ctx: click.Context, config: Config, count: int, loop: LoopChoice) -> None:
    """Bind the port, print the banner, run ``count`` workers until SIGTERM/SIGINT."""
    raise_open_files_limit()
    try:
        # Shared with the workers, beside one listening socket of each's own (workers.py).
        sock = bind(config.http.host, config.http.port, shared=True)
    except ConfigError as exc:
        fail(exc.message, USAGE_EXIT)
    try:
        # Made here, once, before any worker runs: workers racing to create them would each
        # show (and keep) a different first admin password or API-key secret.
        npub = node_keys(config).npub if config.nostr.relays else None
        node_secret(config.node.api_key_secret, config.api_key_secret_path)
        _, password = load_or_create_admin_password(config)
        pid = os.getpid()
        click.echo(
            f"{config.node.name} running (supervisor pid {pid}, {count} workers):"
            f" ledger {config.ledger_shown}, {len(config.wallet.mints)} mint(s),"
            f" {len(config.models)} priced model(s)."
        )
        # The port bound (http.port 0: a free one the kernel picked).
        shown = replace(config, http=replace(config.http, port=sock.getsockname()[1]))
        for line in where(shown, npub):
            click.echo(line)
        click.echo(f"Stop with Ctrl+C or `kill -TERM {pid}`.")
        if password is not None:
            click.echo(
                f"\n  Admin dashboard password (shown once, stored hashed): {password}\n"
                "  Change it with `nodeprov admin set-password`.\n",
                err=True,
            )
        code = supervise(sock, count, worker_command(root_args(ctx), ["--loop", loop]))
    finally:
        sock.close()
    click.echo("nodeprov stopped.")
    if code:
        raise click.exceptions.Exit(code)


def root_args(ctx: click.Context) -> list[str]:
    """The group's options as given, for a worker's command line."""
    root = ctx.find_root()
    options = ctx.find_object(Options)
    args = ["--log-level", str(root.params.get("log_level", "info"))]
    if root.params.get("log_json"):
        args.append("--log-json")
    if options and options.config_path is not None:
        args += ["--config", str(options.config_path.resolve())]
    return args


def run_worker(
    ctx: click.Context, fd: int, parent: int | None, ready_fd: int | None, loop: LoopChoice
) -> None:
    """One worker under ``start --workers``: serve the inherited socket until SIGTERM."""
    if parent is not None:
        die_with_parent(parent, lambda: os.kill(os.getpid(), signal.SIGTERM))
    config = load(ctx)  # the supervisor owns the data dir: no lock here

    def ready(core: Core) -> None:
        gc.collect()
        gc.freeze()  # as for one process: collections scan only what requests allocate
        if ready_fd is not None:
            say_ready(ready_fd)

    guarded(run(config, asyncio.Event(), on_ready=ready, listen=worker_sockets(fd)), loop)
