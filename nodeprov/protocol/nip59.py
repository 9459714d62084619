"""NIP-59 gift wraps (rumor -> kind 13 seal -> kind 1059 wrap) and NIP-17 private DMs; sans I/O.

Both layers are NIP-44 v2 encrypted. :func:`unwrap` verifies both signatures and refuses a seal
whose signer differs from the rumor's pubkey (the NIP-17 impersonation check).

Sizes: both NIP-44 encodings are accepted on receive (nostr-tools seals a rumor over ~40 KB
with the extended length prefix); on send the standard u16 prefix is used whenever a layer's
plaintext fits 65535 bytes, the extended one only when it does not (``nip44.pad`` decides).
Pass ``max_plaintext=nip44.MAX_STANDARD_PLAINTEXT`` to refuse the extended form.
"""

from __future__ import annotations

import secrets
import time
from typing import NamedTuple

from nodeprov.errors import DecryptionError, InvalidEvent
from nodeprov.protocol import nip44
from nodeprov.protocol.nostr_event import (
    Event,
    EventTemplate,
    Keys,
    Tags,
    UnsignedEvent,
    sign_event,
    verify_event,
)

SEAL_KIND = 13
GIFT_WRAP_KIND = 1059
EPHEMERAL_GIFT_WRAP_KIND = 21059
DM_KIND = 14
DM_RELAYS_KIND = 10050
TWO_DAYS = 2 * 24 * 60 * 60
# Largest rumor JSON (bytes) that still fits a standard (<= 65535-byte) NIP-44 seal payload:
# the seal JSON carries the rumor's base64 payload, and padding rounds to 8192-byte buckets.
MAX_RUMOR_JSON_BYTES = 40960


class Unwrapped(NamedTuple):
    """A verified rumor and the pubkey that sealed it (its real author)."""

    rumor: UnsignedEvent
    sender_pubkey: str


def random_past(now: int | None = None, window: int = TWO_DAYS) -> int:
    """A timestamp uniformly up to ``window`` seconds before ``now`` (NIP-59 time tweaking)."""
    now = int(time.time()) if now is None else now
    return now - secrets.randbelow(window)


def make_rumor(
    author_pubkey: str, kind: int, content: str, tags: Tags = (), created_at: int | None = None
) -> UnsignedEvent:
    """An unsigned event (rumor) by ``author_pubkey``, timestamped now unless given."""
    when = int(time.time()) if created_at is None else created_at
    return UnsignedEvent(author_pubkey, when, kind, tags, content)


def seal(
    rumor: UnsignedEvent,
    author: Keys,
    recipient_pubkey: str,
    *,
    now: int | None = None,
    max_plaintext: int = nip44.MAX_EXTENDED_PLAINTEXT,
) -> Event:
    """Kind 13: NIP-44(rumor JSON, conv(author, recipient)), no tags, signed by the author."""
    if rumor.pubkey != author.public_key:
        raise InvalidEvent("the rumor's pubkey must be the sealing author's")
    key = nip44.get_conversation_key(author.secret_key, recipient_pubkey)
    try:
        content = nip44.encrypt(rumor.to_json(), key, max_plaintext=max_plaintext)
    except ValueError as exc:
        raise InvalidEvent(f"rumor too large to seal: {exc}") from None
    template = EventTemplate(SEAL_KIND, (), content)
    return sign_event(template, author.secret_key, random_past(now))


def gift_wrap(
    sealed: Event,
    recipient_pubkey: str,
    *,
    now: int | None = None,
    wrapper: Keys | None = None,
    kind: int = GIFT_WRAP_KIND,
    relay_hint: str | None = None,
    max_plaintext: int = nip44.MAX_EXTENDED_PLAINTEXT,
) -> Event:
    """Kind 1059 (or 21059): NIP-44(seal JSON) under a one-time key, ``p``-tagged to recipient."""
    if kind not in (GIFT_WRAP_KIND, EPHEMERAL_GIFT_WRAP_KIND):
        raise ValueError(f"gift wrap kind must be {GIFT_WRAP_KIND} or {EPHEMERAL_GIFT_WRAP_KIND}")
    wrapper = Keys.generate() if wrapper is None else wrapper
    key = nip44.get_conversation_key(wrapper.secret_key, recipient_pubkey)
    try:
        content = nip44.encrypt(sealed.to_json(), key, max_plaintext=max_plaintext)
    except ValueError as exc:
        raise InvalidEvent(f"seal too large to wrap: {exc}") from None
    p_tag = ("p", recipient_pubkey) if relay_hint is None else ("p", recipient_pubkey, relay_hint)
    return sign_event(EventTemplate(kind, (p_tag,), content), wrapper.secret_key, random_past(now))


def wrap(
    rumor: UnsignedEvent,
    author: Keys,
    recipient_pubkey: str,
    *,
    now: int | None = None,
    max_plaintext: int = nip44.MAX_EXTENDED_PLAINTEXT,
) -> Event:
    """Seal ``rumor`` with ``author`` and gift-wrap it to ``recipient_pubkey`` (kind 1059)."""
    sealed = seal(rumor, author, recipient_pubkey, now=now, max_plaintext=max_plaintext)
    return gift_wrap(sealed, recipient_pubkey, now=now, max_plaintext=max_plaintext)


def unwrap(
    wrapped: Event,
    recipient: Keys,
    *,
    max_plaintext: int = nip44.MAX_EXTENDED_PLAINTEXT,
) -> Unwrapped:
    """Verify and open a gift wrap: wrap sig, seal kind/sig, rumor pubkey == seal pubkey."""
    if wrapped.kind not in (GIFT_WRAP_KIND, EPHEMERAL_GIFT_WRAP_KIND):
        raise InvalidEvent(f"not a gift wrap: kind {wrapped.kind}")
    if not verify_event(wrapped):
        raise InvalidEvent("gift wrap id or signature is invalid")
    key = nip44.get_conversation_key(recipient.secret_key, wrapped.pubkey)
    # The layers are bounded by the payload that carried them (already in memory), not by
    # the cap on events read off the wire: a DM too large to handle is refused with a reply.
    try:
        text = nip44.decrypt(wrapped.content, key, max_plaintext=max_plaintext)
        sealed = Event.from_json(text, max_chars=len(text))
    except DecryptionError as exc:
        raise DecryptionError(f"gift wrap does not decrypt: {exc.message}") from None
    except InvalidEvent as exc:
        raise InvalidEvent(f"gift wrap does not contain a valid seal: {exc.message}") from None
    if sealed.kind != SEAL_KIND:
        raise InvalidEvent(f"gift wrap contains kind {sealed.kind}, not a kind {SEAL_KIND} seal")
    if not verify_event(sealed):
        raise InvalidEvent("seal id or signature is invalid")
    key = nip44.get_conversation_key(recipient.secret_key, sealed.pubkey)
    try:
        text = nip44.decrypt(sealed.content, key, max_plaintext=max_plaintext)
        rumor = UnsignedEvent.from_json(text, max_chars=len(text))
    except DecryptionError as exc:
        raise DecryptionError(f"seal does not decrypt: {exc.message}") from None
    except InvalidEvent as exc:
        raise InvalidEvent(f"seal does not contain a valid rumor: {exc.message}") from None
    if rumor.pubkey != sealed.pubkey:
        raise InvalidEvent("rumor pubkey differs from the seal's signer (impersonation attempt)")
    return Unwrapped(rumor, sealed.pubkey)


# --- NIP-17 ---------------------------------------------------------------------------


def build_dm_rumor(
    sender_pubkey: str,
    recipient_pubkey: str,
    text: str,
    reply_to: str | None = None,
    created_at: int | None = None,
) -> UnsignedEvent:
    """A NIP-17 kind 14 chat rumor: ``p`` tag for the recipient, ``e`` tag for the parent."""
    tags: list[tuple[str, ...]] = [("p", recipient_pubkey)]
    if reply_to is not None:
        tags.append(("e", reply_to))
    return make_rumor(sender_pubkey, DM_KIND, text, tuple(tags), created_at)


def build_dm(
    sender: Keys,
    recipient_pubkey: str,
    text: str,
    reply_to: str | None = None,
    *,
    self_copy: bool = True,
    created_at: int | None = None,
    max_plaintext: int = nip44.MAX_EXTENDED_PLAINTEXT,
) -> list[Event]:
    """NIP-17 DM: gift wraps of one kind 14 rumor to the recipient, then (optionally) to self."""
    rumor = build_dm_rumor(sender.public_key, recipient_pubkey, text, reply_to, created_at)
    targets = [recipient_pubkey]
    if self_copy and sender.public_key != recipient_pubkey:
        targets.append(sender.public_key)
    return [wrap(rumor, sender, t, now=created_at, max_plaintext=max_plaintext) for t in targets]


def dm_relays_from_10050(event: Event) -> list[str]:
    """The ``relay`` tag URLs (ws:// or wss://, de-duplicated, in order) of a kind 10050 event."""
    if event.kind != DM_RELAYS_KIND:
        raise InvalidEvent(f"expected a kind {DM_RELAYS_KIND} event, got kind {event.kind}")
    relays: list[str] = []
    for url in event.tag_values("relay"):
        url = url.strip()
        if url.lower().startswith(("wss://", "ws://")) and len(url) > 6 and url not in relays:
            relays.append(url)
    return relays
