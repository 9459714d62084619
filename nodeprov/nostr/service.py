"""The daemon's Nostr service: key, relay pool, announcer, DM listener and NIP-90 jobs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nodeprov.core.identity import node_keys
from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.core.node import Core
from nodeprov.nostr.announcer import Announcer, build_listing
from nodeprov.nostr.dm_handlers import DmContext
from nodeprov.nostr.dm_listener import DmListener
from nodeprov.nostr.dm_store import DmStore
from nodeprov.nostr.dm_transport import DmTransport
from nodeprov.nostr.nip90_jobs import Nip90Jobs
from nodeprov.nostr.nip90_store import Nip90Store
from nodeprov.nostr.relay_pool import RelayPool, Signer
from nodeprov.protocol.nostr_event import EventTemplate, Keys, sign_event, tags_of

log = logging.getLogger(__name__)


def signer(keys: Keys) -> Signer:
    """The pool's NIP-42 AUTH callback: sign a template dict with the node's key."""

    async def sign(template: dict[str, Any]) -> dict[str, Any]:
        unsigned = EventTemplate(
            int(template["kind"]), tags_of(template.get("tags", [])), template.get("content", "")
        )
        return sign_event(unsigned, keys.secret_key, template.get("created_at")).to_dict()

    return sign


async def nostr_service(core: Core, stop: asyncio.Event) -> None:
    """Run announcer and DM listener until ``stop`` (idle when no relays are configured)."""
    config = core.config
    if not config.nostr.relays:
        log.info("no Nostr relays configured; the Nostr channel is off")
        await stop.wait()
        return
    keys = node_keys(config)
    log.info("Nostr identity %s", keys.npub)
    upstreams = core.upstreams
    pool = RelayPool(config.nostr.relays, sign=signer(keys))
    core.relay_status = pool.status
    try:
        store = DmStore(core.ledger.db)
        ctx = DmContext(config, core.payments, upstreams, keys, store)
        transport = DmTransport(pool, keys, accept_nip04=config.nostr.accept_nip04)
        announcer = Announcer(
            pool,
            keys,
            lambda: build_listing(config, core.pricer, upstreams, keys),
            tuple(config.nostr.dm_relays),
        )
        listener = DmListener(ctx, pool, transport)
        funding = LightningFunding(
            core.wallet,
            max_sat=config.wallet.lightning_max_sat,
            max_open=config.wallet.lightning_max_open_quotes,
        )
        jobs = Nip90Jobs(ctx, pool, Nip90Store(core.ledger.db), funding)
        await asyncio.gather(announcer.run(stop), listener.run(stop), jobs.run(stop))
    finally:
        core.relay_status = None
        await pool.close()
