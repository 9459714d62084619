"""The Nostr clients' operations: DM jobs (NIP-17 and NIP-04), deposits, withdrawals,
balance queries and plain-text chat, each client a nostr-sdk peer with its own key.

Replies are collected by one poller per client and matched by job id. A reply that does not
come within the wait is not a failure by itself (the node may be down, the relay restarting):
the books widen, and the end waits for late replies before it counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from datetime import timedelta
from typing import Any

import nostr_sdk as ns  # type: ignore[import-untyped]

from nodeprov.protocol.dm_jobs import join_parts, parse_part
from tests.soak.faucet import token_msat
from tests.soak.http_ops import ChatAnswer, check_cost, check_unpaid
from tests.soak.world import World, XCashuPayment, max_cost

REPLY_WAIT = 30.0
PLAIN_COST = re.compile(r"— cost ([0-9.]+) sat")


def _msat(sats: str) -> int:
    whole, _, frac = sats.partition(".")
    return int(whole) * 1000 + int((frac + "000")[:3])


class DmClient:
    """One npub talking to the node over the relay."""

    def __init__(self, relay: str, node_pubkey: str) -> None:
        self.keys = ns.Keys.generate()
        self.node = ns.PublicKey.parse(node_pubkey)
        self.relay = relay
        self.client = ns.Client()
        self.seen: set[str] = set()
        self.parts: dict[str, list[str]] = {}
        self.replies: dict[str, list[dict[str, Any]]] = {}  # job id -> replies (JSON)
        self.plain: list[str] = []
        self.arrived = asyncio.Event()
        # Messages whose reply did not come in time: (kind, job id, what was sent); the end
        # waits for their replies. A lost plain-text reply would pair the next question
        # with the wrong answer, so that client stops chatting in plain text.
        self.late: list[tuple[str, Any, Any]] = []
        self.plain_lost = False
        self.unsent = 0  # DMs no relay accepted within 30 s
        self._poller: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return "npub:" + str(self.keys.public_key().to_hex())[:12]

    async def connect(self) -> DmClient:
        await self.client.add_relay(ns.RelayUrl.parse(self.relay))
        await self.client.connect()
        await self.client.try_connect(timedelta(seconds=5))
        self._poller = asyncio.create_task(self._poll())
        return self

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        with contextlib.suppress(Exception):
            await self.client.shutdown()

    async def send(self, text: str, nip: str) -> None:
        """Publish a DM, again until the relay accepts it (as a client app would retry)."""
        if nip == "nip17":
            event = ns.nip17_make_private_msg(self.keys, self.node, text)
        else:
            content = ns.nip04_encrypt(self.keys.secret_key(), self.node, text)
            tag = ns.Tag.parse(["p", self.node.to_hex()])
            event = ns.EventBuilder(ns.Kind(4), content).tags([tag]).finalize(self.keys)
        for _ in range(60):
            with contextlib.suppress(Exception):
                output = await self.client.send_event(event)
                if output.success:
                    return
            await asyncio.sleep(0.5)
        self.unsent += 1

    async def _poll(self) -> None:
        me = self.keys.public_key()
        filters = [
            ns.Filter().kind(ns.Kind(1059)).pubkey(me),
            ns.Filter().kind(ns.Kind(4)).pubkey(me).author(self.node),
        ]
        while True:
            try:
                events = await self.client.fetch_events(
                    ns.ReqTarget.auto(filters), timeout=timedelta(seconds=3)
                )
                for event in events:
                    self._take(event)
            except Exception:  # the relay restarting: poll again
                pass
            await asyncio.sleep(0.5)

    def _take(self, event: Any) -> None:
        eid = event.id().to_hex()
        if eid in self.seen:
            return
        self.seen.add(eid)
        if event.kind().as_u16() == 4:
            text = ns.nip04_decrypt(self.keys.secret_key(), self.node, event.content())
        else:
            gift = ns.UnwrappedGift.from_gift_wrap(self.keys, event)
            if gift.sender().to_hex() != self.node.to_hex():
                return
            text = gift.rumor().content()
        part = parse_part(text)
        if part is not None:
            got = self.parts.setdefault(part.id, [])
            got.append(text)
            if len(got) < part.of:
                return
            text = join_parts(got)
        try:
            reply = json.loads(text)
        except ValueError:
            self.plain.append(text)
        else:
            self.replies.setdefault(str(reply.get("id")), []).append(reply)
        self.arrived.set()

    async def ask(self, message: dict[str, Any], nip: str, wait: float = REPLY_WAIT) -> Any:
        """Send a job message; its first reply, or None if none came within ``wait``."""
        await self.send(json.dumps(message), nip)
        return await self.reply_to(message["id"], wait)

    async def reply_to(self, ident: str, wait: float) -> Any:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while ident not in self.replies:
                    self.arrived.clear()
                    await self.arrived.wait()
        got = self.replies.get(ident)
        return got[0] if got else None


def _nip(world: World) -> str:
    return world.rng.choice(("nip17", "nip04"))


async def dm_deposit(world: World, client: DmClient) -> None:
    token = await world.token(world.rng.randint(20, 200))
    msat = world.books.hand_over(token)
    account = world.books.account(client.name)
    ident = secrets.token_hex(6)
    reply = await client.ask({"type": "deposit", "id": ident, "cashu": token}, _nip(world))
    if reply is None:
        account.credit(msat, certain=False)
        client.late.append(("deposit", ident, (token, msat)))
    elif reply["type"] == "balance":
        world.books.taken_by_node(token, "DM deposit answered")
        account.credit(msat)
    elif reply.get("refund"):
        world.books.taken_by_node(token, "DM deposit refunded")
        world.books.receive(reply["refund"], token_msat(reply["refund"]), "DM deposit refund")
    elif reply["error"].get("code") in ("mint_unavailable", "mint_error"):
        account.credit(msat, certain=False)  # a swap may have reached the mint
    else:
        world.books.violation("dm_deposit_failed", json.dumps(reply)[:300])


async def dm_job(world: World, client: DmClient, paid_by_token: bool) -> None:
    body = world.chat_body(stream=False)
    ident = secrets.token_hex(6)
    message: dict[str, Any] = {"type": "request", "id": ident,
                               "endpoint": "/v1/chat/completions", "body": body}  # fmt: skip
    payment: XCashuPayment | None = None
    if paid_by_token:
        unit = world.rng.choice(("sat", "msat"))
        amount = world.rng.randint(3, 12)
        token = await world.token(amount * 1000 if unit == "msat" else amount, unit)
        payment = XCashuPayment(token, world.books.hand_over(token), unit)
        message["cashu"] = token
    account = world.books.account(client.name)
    reply = await client.ask(message, _nip(world))
    if reply is None:
        if payment is None:
            account.debit(0, certain=False, at_most=max_cost(body))
        else:
            # The node may have taken the token and answered late: wait for it at the end.
            client.late.append(("job", ident, (payment, body)))
        return
    settle_dm_job(world, client, body, reply, payment)


def settle_dm_job(world: World, client: DmClient, body: dict[str, Any], reply: dict[str, Any],
                  payment: XCashuPayment | None) -> None:  # fmt: skip
    """Write a DM job's reply into the books."""
    account = world.books.account(client.name)
    if reply["type"] == "response":
        answer = ChatAnswer(200, reply.get("cost_msat"), reply.get("change"),
                            (reply.get("body") or {}).get("usage"), True)  # fmt: skip
        cost = check_cost(world, "DM job", body, answer)
        if payment is None:
            account.debit(cost)
            return
        world.books.taken_by_node(payment.token, "DM job answered")
        change = token_msat(answer.change) if answer.change else 0
        if answer.change:
            world.books.receive(answer.change, change, "DM job change")
        world.books.check_payment("DM job", payment.msat, change, cost, payment.unit)
        return
    check_unpaid(world, "DM job", ChatAnswer(0, reply.get("cost_msat"), None, None, False))
    if payment is None:
        return
    refund = reply.get("refund")
    if refund:
        world.books.taken_by_node(payment.token, "DM job refunded")
        world.books.receive(refund, token_msat(refund), "DM job refund")
        if token_msat(refund) != payment.msat:
            world.books.violation("dm_refund_short", f"{payment.msat} -> {token_msat(refund)}")
    # else: refused before the token was taken, or taken with the refund still owed; the
    # end tells which (the token is unspent, or the node still owes it on its books).


async def dm_withdraw(world: World, client: DmClient) -> None:
    amount = world.rng.choice((None, world.rng.randint(1, 40) * 1000))
    message: dict[str, Any] = {"type": "withdraw", "id": secrets.token_hex(6)}
    if amount is not None:
        message["amount_msat"] = amount
    reply = await client.ask(message, _nip(world))
    if reply is None:
        account = world.books.account(client.name)
        account.debit(0, certain=False, at_most=amount if amount is not None else account.hi)
        client.late.append(("withdraw", message["id"], None))
        return
    settle_dm_withdraw(world, client, reply)


def settle_dm_withdraw(world: World, client: DmClient, reply: dict[str, Any]) -> None:
    if reply["type"] == "withdrawal":
        got = token_msat(reply["cashu"])
        world.books.receive(reply["cashu"], got, "DM withdrawal")
        world.books.account(client.name).debit(reply["amount_msat"])
        if got != reply["amount_msat"]:
            world.books.violation("dm_withdrawal_short", json.dumps(reply)[:200])


async def dm_balance(world: World, client: DmClient) -> None:
    await client.ask({"type": "balance", "id": secrets.token_hex(6)}, _nip(world))


async def dm_plain_chat(world: World, client: DmClient) -> None:
    """A person in an ordinary Nostr client typing a question (paid from the npub account)."""
    before = len(client.plain)
    await client.send("what does the node sell " + secrets.token_hex(3), _nip(world))
    account = world.books.account(client.name)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(REPLY_WAIT):
            while len(client.plain) == before:
                client.arrived.clear()
                await client.arrived.wait()
    if len(client.plain) == before:
        account.debit(0, certain=False, at_most=20_000)
        client.plain_lost = True
        return
    found = PLAIN_COST.search(client.plain[before])
    if found:
        account.debit(_msat(found[1]))
        world.books.answered += 1
        world.books.charged_msat += _msat(found[1])
