"""``nodeprov announce`` and ``nodeprov admin set-password``: the node's identity and access.

Registered on the group in :mod:`nodeprov.cli`; shared helpers from :mod:`nodeprov.cli_common`.
"""

from __future__ import annotations

from typing import Any

import click

from nodeprov.admin_password import set_password
from nodeprov.cli_common import emit_json, fail, guarded, load, refuse_placeholders
from nodeprov.core.identity import node_keys
from nodeprov.core.node import build_core
from nodeprov.nostr.announcer import Announcer, build_listing
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.nostr.service import signer

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
KIND_NAMES = {0: "profile", 10050: "dm relays", 38421: "listing", 31990: "handler"}


@click.command()
@JSON_OPTION
@click.pass_context
def announce(ctx: click.Context, as_json: bool) -> None:
    """Publish the node's announcements now and show, per relay, who accepted them.

    Kinds 0 (profile), 10050 (DM relays), 38421 (provider listing: models, msat prices,
    mints, endpoints) and 31990 (handler info). The daemon republishes them by itself
    whenever they change and every 24 h; this is for checking a relay setup.
    """
    config = load(ctx, require_upstream=False)
    refuse_placeholders(config)  # never announce a dead example URL to public relays
    if not config.nostr.relays:
        fail("no relays: set nostr.relays")

    async def publish() -> dict[str, Any]:
        core = await build_core(config)
        keys = node_keys(config)
        pool = RelayPool(config.nostr.relays, sign=signer(keys))
        try:
            announcer = Announcer(
                pool,
                keys,
                lambda: build_listing(config, core.pricer, core.upstreams, keys),
                tuple(config.nostr.dm_relays),
            )
            results = await announcer.publish()
            return {
                "npub": keys.npub,
                "kinds": {
                    str(kind): {
                        "event_id": r.event_id,
                        "accepted": r.accepted,
                        "rejected": r.rejected,
                        "no_answer": r.no_answer,
                    }
                    for kind, r in results.items()
                },
            }
        finally:
            await pool.close()
            await core.close()

    data = guarded(publish())
    if as_json:
        emit_json(data)
        return
    click.echo(f"announced as {data['npub']}")
    for kind, result in data["kinds"].items():
        name = KIND_NAMES.get(int(kind), kind)
        line = f"  kind {kind} ({name}): accepted by {len(result['accepted'])}"
        for url, reason in result["rejected"].items():
            line += f"; rejected by {url}: {reason}"
        if result["no_answer"]:
            line += f"; no answer from {', '.join(result['no_answer'])}"
        click.echo(line)
    if not any(r["accepted"] for r in data["kinds"].values()):
        fail("no relay accepted the announcements")


@click.group()
def admin() -> None:
    """The admin dashboard at /admin."""


@admin.command("set-password")
@click.password_option(help="The new password (asked twice when not given).")
@click.pass_context
def set_password_command(ctx: click.Context, password: str) -> None:
    """Store a new admin password (its scrypt hash, in data_dir/admin_password, 0600).

    admin.password_hash in the config, when set, takes precedence over this file. Restart
    the daemon for the new password to take effect; open sessions end with the restart.
    """
    if len(password) < 8:
        fail("the password needs at least 8 characters")
    config = load(ctx, require_upstream=False)
    set_password(config, password)
    where = config.node.data_dir / "admin_password"
    click.echo(f"stored the new admin password hash in {where}")
    if config.admin.password_hash:
        click.echo("note: admin.password_hash in the config takes precedence over this file")
