"""NIP-90 test peers: a nostr-sdk customer (kind 5050 out; 7000, 6050 and DMs back) and the
node's NIP-90 service over a DM test node (:func:`tests.support.nostr_client.start_dm_node`)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import nostr_sdk as ns  # type: ignore[import-untyped]

from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.nostr.nip90_jobs import Nip90Jobs
from nodeprov.nostr.nip90_store import Nip90Store
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.nostr.service import signer
from tests.support.nostr_client import FAST_POOL, DmNode, SdkClient
from tests.support.waiting import until


def tag(event: dict[str, Any], name: str) -> list[str] | None:
    """The first tag ``name`` of an event dict (without its name), or None."""
    for t in event["tags"]:
        if t and t[0] == name:
            return list(t[1:])
    return None


def status(event: dict[str, Any]) -> str | None:
    found = tag(event, "status")
    return found[0] if found else None


class Customer(SdkClient):
    """A NIP-90 customer on nostr-sdk: publishes kind 5050 jobs, reads what the node answers."""

    async def job(self, *tags: list[str], content: str = "") -> str:
        """Publish a kind 5050 request p-tagging the node; its event id."""
        built = [ns.Tag.parse(["p", self.node.to_hex()]), *(ns.Tag.parse(t) for t in tags)]
        event = ns.EventBuilder(ns.Kind(5050), content).tags(built).finalize(self.keys)
        return await self.publish(event)

    def encrypt(self, tags: list[list[str]]) -> str:
        """The NIP-04 content of an ``encrypted`` request holding ``tags``."""
        return str(ns.nip04_encrypt(self.keys.secret_key(), self.node, json.dumps(tags)))

    def decrypt(self, content: str) -> str:
        return str(ns.nip04_decrypt(self.keys.secret_key(), self.node, content))

    async def answers(self, job_id: str) -> list[dict[str, Any]]:
        """Every 7000 and 6050 event of the node about ``job_id`` on the relays, oldest first."""
        f = (
            ns.Filter()
            .kinds([ns.Kind(7000), ns.Kind(6050)])
            .author(self.node)
            .event(ns.EventId.parse(job_id))
        )
        events = await self.client.fetch_events(
            ns.ReqTarget.auto([f]), timeout=timedelta(seconds=2)
        )
        out = [json.loads(e.as_json()) for e in events]
        return sorted(out, key=lambda e: e["created_at"])

    async def wait(self, job_id: str, what: str) -> dict[str, Any]:
        """The first answer to ``job_id`` that is a result (``what="result"``) or a feedback
        of status ``what``."""

        async def found() -> dict[str, Any] | None:
            for event in await self.answers(job_id):
                if (what == "result" and event["kind"] == 6050) or status(event) == what:
                    return event
            return None

        event: dict[str, Any] = await until(found, within=60, what=f"{what} for job {job_id}")
        return event

    async def finished(self, job_id: str) -> dict[str, Any]:
        """The result, or the ``error`` feedback, of ``job_id``."""

        async def found() -> dict[str, Any] | None:
            for event in await self.answers(job_id):
                if event["kind"] == 6050 or status(event) == "error":
                    return event
            return None

        event: dict[str, Any] = await until(found, within=60, what=f"job {job_id} answered")
        return event

    async def dms(self) -> list[str]:
        """Kind 4 DMs from the node to this customer, decrypted."""
        f = ns.Filter().kind(ns.Kind(4)).author(self.node).pubkey(self.keys.public_key())
        events = await self.client.fetch_events(
            ns.ReqTarget.auto([f]), timeout=timedelta(seconds=2)
        )
        return [self.decrypt(e.content()) for e in events]


@dataclass
class Dvm:
    """The node's NIP-90 service over ``node``'s core; stoppable and startable again."""

    node: DmNode
    poll_seconds: float = 0.05
    jobs: Nip90Jobs | None = None
    pool: RelayPool | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def start(self, poll_seconds: float | None = None) -> Dvm:
        if poll_seconds is not None:
            self.poll_seconds = poll_seconds
        node = self.node
        self.pool = RelayPool(node.config.nostr.relays, sign=signer(node.keys), **FAST_POOL)
        funding = LightningFunding(node.core.wallet)
        store = Nip90Store(node.core.ledger.db)
        self.jobs = Nip90Jobs(node.ctx, self.pool, store, funding, poll_seconds=self.poll_seconds)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.jobs.run(self.stop_event))
        await until(lambda: any(r.connected for r in self.pool.relays.values()), what="relay up")
        return self

    async def stop(self, grace: float = 10.0) -> None:
        """Stop the service: running jobs get ``grace`` s, then are cancelled (resumed at the
        next start)."""
        if self.task is None:
            return
        assert self.jobs is not None
        await self.jobs.close(grace)
        self.stop_event.set()
        await self.task
        assert self.pool is not None
        await self.pool.close()
        self.task = None
