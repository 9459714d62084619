"""Announcements: kinds 0, 10050, 38421 and 31990, published at start, whenever the listing's
content hash changes (models, prices, mints, endpoints), and every 24 h.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nodeprov import __version__
from nodeprov.config import Config
from nodeprov.core.capabilities import node_capabilities
from nodeprov.core.pricing import Pricer
from nodeprov.errors import NodeprovError
from nodeprov.nostr.relay_pool import PublishResult, RelayPool
from nodeprov.protocol import announcements as ann
from nodeprov.protocol.nostr_event import EventTemplate, Keys, sign_event
from nodeprov.upstream import Upstreams

log = logging.getLogger(__name__)

REFRESH_SECONDS = 24 * 3600
CHECK_SECONDS = 300.0


def build_listing(
    config: Config, pricer: Pricer, upstreams: Upstreams, keys: Keys, version: str = __version__
) -> ann.NodeListing:
    """What this node announces, from its config, prices and routable models."""
    models: list[ann.ModelListing] = []
    for name in upstreams.models():
        target = upstreams.route(name).model
        try:
            prices = pricer.prices_msat(target)
        except NodeprovError:  # no exchange rate right now: not announced until there is one
            continue
        price = pricer.price(target)
        extra = {"context_length": price.context_tokens}
        models.append(ann.ModelListing(name, prices, extra))
    node = config.node
    return ann.NodeListing(
        name=node.name,
        about=node.description,
        version=version,
        http_url=node.http_url or None,
        onion_url=node.onion_url or None,
        relays=tuple(config.nostr.relays),
        mints=tuple(m.rstrip("/") for m in config.wallet.mints),
        units=tuple(config.wallet.units),
        models=tuple(models),
        identifier=keys.npub,
        capabilities=node_capabilities(config),
    )


class Announcer:
    """Signs and publishes the four announcements; ``run`` keeps them current."""

    def __init__(
        self,
        pool: RelayPool,
        keys: Keys,
        listing: Callable[[], ann.NodeListing],
        dm_relays: tuple[str, ...] = (),
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.listing = listing
        self.dm_relays = dm_relays
        self.published_hash: str | None = None
        self.published_at = 0.0
        self._last_created = 0

    def _created_at(self) -> int:
        """Now, but always after the previous announcement (replaceable events need newer)."""
        self._last_created = max(int(time.time()), self._last_created + 1)
        return self._last_created

    def templates(self, listing: ann.NodeListing) -> dict[int, EventTemplate]:
        relays = self.dm_relays or listing.relays
        out = {ann.PROFILE_KIND: ann.profile_event(listing)}
        if relays:
            out[ann.DM_RELAYS_KIND] = ann.dm_relays_event(relays)
        out[ann.LISTING_KIND] = ann.listing_event(listing)
        out[ann.HANDLER_KIND] = ann.handler_event(listing)
        return out

    async def publish(self) -> dict[int, PublishResult]:
        """Publish all four now; per kind, which relays accepted."""
        listing = self.listing()
        created = self._created_at()
        results: dict[int, PublishResult] = {}
        for kind, template in self.templates(listing).items():
            event = sign_event(template, self.keys.secret_key, created)
            results[kind] = await self.pool.publish(event.to_dict())
        if all(r.ok for r in results.values()):
            self.published_hash = ann.content_hash(listing)
            self.published_at = time.monotonic()
        else:
            failed = [k for k, r in results.items() if not r.ok]
            log.warning("announcements of kinds %s were not accepted by any relay", failed)
        return results

    def due(self) -> bool:
        """Whether the listing changed since the last publish, or 24 h passed."""
        if self.published_hash != ann.content_hash(self.listing()):
            return True
        return time.monotonic() - self.published_at >= REFRESH_SECONDS

    async def run(self, stop: asyncio.Event, check_seconds: float = CHECK_SECONDS) -> None:
        """Publish at start, then whenever :meth:`due`, until ``stop``."""
        while not stop.is_set():
            try:
                if self.due():
                    results = await self.publish()
                    accepted = {k: len(r.accepted) for k, r in results.items()}
                    log.info("announced (relays accepting per kind: %s)", accepted)
            except Exception:
                log.exception("announcing failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), check_seconds)
