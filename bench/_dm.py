"""DM job round trips through the node over a real relay, with a nostr-sdk client.

The client subscribes once and is woken by each event as it arrives (no polling), so a round
trip is: encrypt and publish the job, the relay, the node (decrypt, pay from the sender's npub
account, call the upstream, reply), the relay again, decrypt. The baseline beside it is one
DM from the client to a second client through the same relay (one hop: encrypt, relay,
decrypt); a node that cost nothing would answer in two such hops plus the upstream's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import secrets
import time
from datetime import timedelta
from typing import Any

import nostr_sdk as ns  # type: ignore[import-untyped]

NIPS = ("nip17", "nip04")


async def _maybe(value: Any) -> Any:
    """nostr-sdk's bindings made some calls async over versions; accept either."""
    return await value if inspect.isawaitable(value) else value


class DmPeer:
    """A nostr-sdk client with its own key, collecting replies by job ``id`` (or echo text)."""

    def __init__(self, relay: str, node_pubkey: str) -> None:
        self.keys = ns.Keys.generate()
        self.me = self.keys.public_key()
        self.node = ns.PublicKey.parse(node_pubkey)
        self.relay = relay
        self.client = ns.Client()
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.seen: set[str] = set()
        self.reader: asyncio.Task[None] | None = None

    async def connect(self) -> DmPeer:
        await self.client.add_relay(ns.RelayUrl.parse(self.relay))
        await self.client.connect()
        await self.client.try_connect(timedelta(seconds=5))
        stream = await _maybe(self.client.notifications())
        self.reader = asyncio.create_task(self._read(stream))
        f17 = ns.Filter().kind(ns.Kind(1059)).pubkey(self.me)
        f04 = ns.Filter().kind(ns.Kind(4)).pubkey(self.me)
        await self.client.subscribe(ns.ReqTarget.auto([f17, f04]))
        return self

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader
        await self.client.shutdown()

    async def _read(self, stream: Any) -> None:
        while True:
            note = await _maybe(stream.next())
            if note is None:
                return
            if not note.is_new_event():
                continue
            event = note.event
            eid = event.id().to_hex()
            if eid in self.seen:
                continue
            self.seen.add(eid)
            with contextlib.suppress(Exception):  # not ours, or not JSON: ignore
                self._deliver(self._open(event))

    def _open(self, event: Any) -> str:
        if event.kind().as_u16() == 4:
            peer = event.author()
            return str(ns.nip04_decrypt(self.keys.secret_key(), peer, event.content()))
        gift = ns.UnwrappedGift.from_gift_wrap(self.keys, event)
        return str(gift.rumor().content())

    def _deliver(self, text: str) -> None:
        message = json.loads(text)
        if message.get("type") == "part":
            return  # replies here are small; a split reply would be a bug worth seeing
        future = self.waiting.pop(str(message.get("id")), None)
        if future is not None and not future.done():
            future.set_result(message)

    def _event(self, to: Any, text: str, nip: str) -> Any:
        if nip == "nip17":
            return ns.nip17_make_private_msg(self.keys, to, text)
        content = ns.nip04_encrypt(self.keys.secret_key(), to, text)
        tag = ns.Tag.parse(["p", to.to_hex()])
        return ns.EventBuilder(ns.Kind(4), content).tags([tag]).finalize(self.keys)

    async def _ask(
        self, to: Any, message: dict[str, Any], nip: str, inbox: DmPeer | None = None
    ) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        (inbox or self).waiting[message["id"]] = future
        event = await _maybe(self._event(to, json.dumps(message), nip))
        await self.client.send_event(event)
        return await asyncio.wait_for(future, 30)

    async def job(self, message: dict[str, Any], nip: str) -> dict[str, Any]:
        """Send a job DM to the node; the reply with the same ``id``."""
        return await self._ask(self.node, message, nip)

    async def echo(self, other: DmPeer, nip: str) -> None:
        """One DM to ``other`` through the relay, until it has it (the one-hop baseline).

        Not to ourselves: nostr-sdk does not notify a client of the events it sent itself.
        """
        await self._ask(other.me, {"type": "echo", "id": secrets.token_hex(8)}, nip, other)


async def round_trips(
    relay: str, node_pubkey: str, token: str, jobs: int, warmup: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Seconds per job round trip and per one-hop echo, for NIP-17 and NIP-04."""
    peer = await DmPeer(relay, node_pubkey).connect()
    other = await DmPeer(relay, node_pubkey).connect()
    out: dict[str, dict[str, list[float]]] = {}
    try:
        deposit = await peer.job({"type": "deposit", "id": "deposit", "cashu": token}, "nip17")
        if deposit.get("type") != "balance":
            raise RuntimeError(f"the deposit DM was refused: {deposit}")
        for nip in NIPS:
            jobs_s: list[float] = []
            echo_s: list[float] = []
            for i in range(warmup + jobs):
                job = {
                    "type": "request",
                    "id": f"{nip}-{i}-{secrets.token_hex(4)}",
                    "endpoint": "/v1/chat/completions",
                    "body": {"model": "bench-chat", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "hi"}]},
                }  # fmt: skip
                t0 = time.perf_counter()
                reply = await peer.job(job, nip)
                t1 = time.perf_counter()
                if reply.get("type") != "response" or reply.get("status") != 200:
                    raise RuntimeError(f"the {nip} job failed: {reply}")
                await peer.echo(other, nip)
                t2 = time.perf_counter()
                if i >= warmup:
                    jobs_s.append(t1 - t0)
                    echo_s.append(t2 - t1)
            out[nip] = {"job": jobs_s, "echo": echo_s}
    finally:
        await peer.close()
        await other.close()
    return out
