"""DM envelopes: open incoming NIP-17 gift wraps and NIP-04 events, send replies the same way.

NIP-17 replies go to the sender's kind 10050 relays when published (else to ours); replies
are already split into parts that fit one gift wrap (or one kind 4 event) each, so every reply
uses NIP-44's standard encoding. Incoming gift wraps may use either encoding, and no DM is
dropped for its size before it is opened: the listener answers one over
``nostr.max_content_bytes`` with ``request_too_large``, which needs the sender (inside).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeprov.errors import NodeprovError
from nodeprov.nostr.dm_store import Nip
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol import nip04, nip59
from nodeprov.protocol.dm_jobs import split_parts
from nodeprov.protocol.nostr_event import Event, Keys, verify_event

log = logging.getLogger(__name__)

MAX_AGE_SECONDS = 24 * 3600  # older DMs (by their own or their rumor's time) are replays
FUTURE_SKEW_SECONDS = 15 * 60
RUMOR_OVERHEAD_BYTES = 1024  # id, pubkey, p and e tags, field names of a reply rumor
NIP04_MAX_TEXT_BYTES = 30_000  # about 40 KB of base64 in a kind 4 event
DM_RELAYS_TTL_SECONDS = 600.0
# The largest relay frame a connection reads (``relay_conn``'s cap): anything a relay delivers
# is opened, so an oversized request is answered rather than ignored.
MAX_EVENT_CHARS = 16 * 1024 * 1024


class Dropped(Exception):
    """An event that gets no reply (bad signature, not for us, undecryptable, replayed)."""


@dataclass(frozen=True)
class Incoming:
    """A verified, decrypted DM: dedup id (the event's own), sender, NIP, text, id to reply to."""

    event_id: str
    sender: str
    nip: Nip
    text: str
    reply_to: str
    created_at: int


def _fresh(created_at: int, now: int, what: str, max_age: int) -> None:
    if created_at > now + FUTURE_SKEW_SECONDS:
        raise Dropped(f"{what} is dated in the future ({created_at - now} s ahead)")
    if created_at < now - max_age:
        raise Dropped(f"{what} is stale ({now - created_at} s old)")


def _escaped_bytes(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def split_for(nip: Nip, text: str) -> list[str]:
    """Split a JSON reply into ``part`` messages that fit one DM of ``nip`` each."""
    if nip == "nip04":
        return split_parts(text, NIP04_MAX_TEXT_BYTES)
    budget = nip59.MAX_RUMOR_JSON_BYTES - RUMOR_OVERHEAD_BYTES
    size = budget
    while True:
        parts = split_parts(text, size)
        if all(_escaped_bytes(p) <= budget for p in parts):
            return parts
        size = size * 3 // 4


def split_plain(nip: Nip, text: str) -> list[str]:
    """Split plain text into messages that fit one DM each (by characters, in order)."""
    limit = NIP04_MAX_TEXT_BYTES if nip == "nip04" else nip59.MAX_RUMOR_JSON_BYTES // 2
    out: list[str] = []
    while len(text.encode("utf-8")) > limit or _escaped_bytes(text) > 2 * limit:
        cut = limit // 4
        out.append(text[:cut])
        text = text[cut:]
    return [*out, text]


class DmTransport:
    """Opens DMs addressed to ``keys`` and sends replies through ``pool`` (or the peer's relays)."""

    def __init__(
        self,
        pool: RelayPool,
        keys: Keys,
        *,
        accept_nip04: bool = True,
        max_event_chars: int = MAX_EVENT_CHARS,
        max_age: int = MAX_AGE_SECONDS,
    ) -> None:
        self.pool = pool
        self.keys = keys
        self.accept_nip04 = accept_nip04
        self.max_event_chars = max_event_chars
        self.max_age = max_age
        self._dm_relays: dict[str, tuple[float, list[str]]] = {}

    def open(self, raw: Mapping[str, Any], now: int | None = None) -> Incoming:
        """Verify and decrypt one event; raises :class:`Dropped` when no reply makes sense."""
        now = int(time.time()) if now is None else now
        try:
            event = Event.from_dict(raw)
        except NodeprovError as exc:
            raise Dropped(f"malformed event: {exc.message}") from None
        if len(event.content) > self.max_event_chars:
            raise Dropped(f"event content of {len(event.content)} chars is too large")
        if self.keys.public_key not in event.tag_values("p"):
            raise Dropped("event is not addressed to this node")
        try:
            if event.kind == nip59.GIFT_WRAP_KIND:
                # Gift wraps are back-dated up to two days on purpose; the rumor is checked.
                _fresh(event.created_at, now, "gift wrap", nip59.TWO_DAYS + self.max_age)
                opened = nip59.unwrap(event, self.keys)  # both NIP-44 encodings
                rumor = opened.rumor
                if rumor.kind != nip59.DM_KIND:
                    raise Dropped(f"gift wrap holds kind {rumor.kind}, not a kind 14 DM")
                _fresh(rumor.created_at, now, "DM rumor", self.max_age)
                return Incoming(
                    event.id, opened.sender_pubkey, "nip17", rumor.content, rumor.id,
                    rumor.created_at,
                )  # fmt: skip
            if event.kind == nip04.KIND and self.accept_nip04:
                _fresh(event.created_at, now, "kind 4 DM", self.max_age)
                text, peer = nip04.open_dm(event, self.keys)
                if peer == self.keys.public_key:
                    raise Dropped("kind 4 DM from ourselves")
                return Incoming(event.id, peer, "nip04", text, event.id, event.created_at)
        except NodeprovError as exc:
            raise Dropped(f"{exc.code}: {exc.message}") from None
        raise Dropped(f"unexpected kind {event.kind}")

    async def dm_relays(self, pubkey: str, timeout: float = 3.0) -> list[str]:  # noqa: ASYNC109
        """The peer's NIP-17 inbox relays (kind 10050), cached; empty if none is published."""
        cached = self._dm_relays.get(pubkey)
        if cached is not None and time.monotonic() - cached[0] < DM_RELAYS_TTL_SECONDS:
            return cached[1]
        sub = self.pool.subscribe([{"kinds": [nip59.DM_RELAYS_KIND], "authors": [pubkey]}])
        newest: Event | None = None
        try:
            await sub.wait_eose(timeout)
            while len(sub):
                _, raw = await anext(sub)
                try:
                    event = Event.from_dict(raw)
                except NodeprovError:
                    continue
                if verify_event(event) and (newest is None or event.created_at > newest.created_at):
                    newest = event
        finally:
            await sub.close()
        relays = nip59.dm_relays_from_10050(newest) if newest is not None else []
        self._dm_relays[pubkey] = (time.monotonic(), relays)
        return relays

    async def send(self, nip: Nip, recipient: str, texts: list[str], reply_to: str) -> bool:
        """Publish each text as its own DM; True if every one was accepted by some relay."""
        events: list[Event] = []
        for text in texts:
            if nip == "nip04":
                events.append(nip04.build_dm(self.keys, recipient, text, reply_to))
            else:
                events += nip59.build_dm(self.keys, recipient, text, reply_to, self_copy=False)
        pool, own = self.pool, True
        if nip == "nip17":
            theirs = await self.dm_relays(recipient)
            if theirs and not set(theirs) <= set(self.pool.relays):
                pool, own = RelayPool(theirs, sign=self.pool.sign), False
        try:
            ok = True
            for event in events:
                result = await pool.publish(event.to_dict())
                if not result.ok:
                    log.warning("reply %s to %s not accepted: %s", event.id[:12], recipient[:12],
                                result.relays)  # fmt: skip
                    ok = False
            return ok
        finally:
            if not own:
                await pool.close()
