"""NIP-01 events and keys: serialization, ids, BIP-340 signatures, strict JSON parsing; sans I/O.

Signing and verification use libsecp256k1 through ``coincurve``. Parsing turns every defect
into :class:`InvalidEvent` (or :class:`InvalidKey` for keys) with a message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coincurve import PrivateKey, PublicKeyXOnly

from nodeprov.errors import InvalidEvent, InvalidKey
from nodeprov.protocol import nip19

MAX_EVENT_JSON_CHARS = 1_000_000
MAX_TAGS = 2000
MAX_TAG_ITEMS = 64
MAX_TIMESTAMP = 2**40  # far beyond any real date; keeps created_at a sane integer

_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{128}")
_HEX32_ANYCASE = re.compile(r"[0-9a-fA-F]{64}")

Tags = tuple[tuple[str, ...], ...]


def _utf8_ok(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_tags(tags: object) -> Tags:
    if not isinstance(tags, list | tuple):
        raise InvalidEvent("event tags must be a list of lists of strings")
    if len(tags) > MAX_TAGS:
        raise InvalidEvent(f"event has more than {MAX_TAGS} tags")
    out: list[tuple[str, ...]] = []
    for tag in tags:
        if not isinstance(tag, list | tuple) or not all(isinstance(x, str) for x in tag):
            raise InvalidEvent("each event tag must be a list of strings")
        if len(tag) > MAX_TAG_ITEMS:
            raise InvalidEvent(f"an event tag has more than {MAX_TAG_ITEMS} items")
        if not all(_utf8_ok(x) for x in tag):
            raise InvalidEvent("event tag contains text that is not valid UTF-8")
        out.append(tuple(tag))
    return tuple(out)


def _check_fields(pubkey: object, created_at: object, kind: object, content: object) -> None:
    if not isinstance(pubkey, str) or not _HEX32.fullmatch(pubkey):
        raise InvalidEvent("event pubkey must be 32 bytes of lowercase hex")
    if isinstance(created_at, bool) or not isinstance(created_at, int):
        raise InvalidEvent("event created_at must be an integer")
    if not 0 <= created_at < MAX_TIMESTAMP:
        raise InvalidEvent("event created_at is out of range")
    if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 65535:
        raise InvalidEvent("event kind must be an integer between 0 and 65535")
    if not isinstance(content, str) or not _utf8_ok(content):
        raise InvalidEvent("event content must be a UTF-8 string")


def serialize_for_id(pubkey: str, created_at: int, kind: int, tags: Tags, content: str) -> bytes:
    """The NIP-01 commitment ``[0,pubkey,created_at,kind,tags,content]`` as compact UTF-8 JSON."""
    data = [0, pubkey, created_at, kind, [list(t) for t in tags], content]
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def event_id(pubkey: str, created_at: int, kind: int, tags: Tags, content: str) -> str:
    """NIP-01 event id: SHA-256 of the serialized commitment, lowercase hex."""
    return hashlib.sha256(serialize_for_id(pubkey, created_at, kind, tags, content)).hexdigest()


def _loads_object(text: object, what: str, max_chars: int = MAX_EVENT_JSON_CHARS) -> dict[str, Any]:
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidEvent(f"{what} is not valid UTF-8") from None
    if not isinstance(text, str):
        raise InvalidEvent(f"{what} must be a JSON string")
    if len(text) > max_chars:
        raise InvalidEvent(f"{what} is larger than {max_chars} characters")
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise InvalidEvent(f"{what} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"{what} must be a JSON object")
    return obj


@dataclass(frozen=True, slots=True)
class EventTemplate:
    """What an author decides: kind, tags, content (pubkey and time are added when signing)."""

    kind: int
    tags: Tags = ()
    content: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _check_tags(self.tags))
        _check_fields("0" * 64, 0, self.kind, self.content)


@dataclass(frozen=True, slots=True)
class UnsignedEvent:
    """An event without a signature; NIP-59 calls it a rumor. ``id`` is derived, never stored."""

    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _check_tags(self.tags))
        _check_fields(self.pubkey, self.created_at, self.kind, self.content)

    @property
    def id(self) -> str:
        """The NIP-01 id of this event."""
        return event_id(self.pubkey, self.created_at, self.kind, self.tags, self.content)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object with ``id`` and without ``sig`` (the rumor form)."""
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(t) for t in self.tags],
            "content": self.content,
        }

    def to_json(self) -> str:
        """Compact UTF-8 JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> UnsignedEvent:
        """Validate a rumor object; an ``id``, if present, must match; a ``sig`` is refused."""
        if "sig" in obj:
            raise InvalidEvent("a rumor must not carry a signature")
        for key in ("pubkey", "created_at", "kind", "tags", "content"):
            if key not in obj:
                raise InvalidEvent(f"event is missing '{key}'")
        event = cls(obj["pubkey"], obj["created_at"], obj["kind"], obj["tags"], obj["content"])
        if "id" in obj and obj["id"] != event.id:
            raise InvalidEvent("rumor id does not match its contents")
        return event

    @classmethod
    def from_json(cls, text: str | bytes, max_chars: int = MAX_EVENT_JSON_CHARS) -> UnsignedEvent:
        """Parse a rumor from JSON text of at most ``max_chars`` characters."""
        return cls.from_dict(_loads_object(text, "rumor", max_chars))


@dataclass(frozen=True, slots=True)
class Event:
    """A signed NIP-01 event. Construction checks shape only; use :func:`verify_event` too."""

    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", _check_tags(self.tags))
        _check_fields(self.pubkey, self.created_at, self.kind, self.content)
        if not isinstance(self.id, str) or not _HEX32.fullmatch(self.id):
            raise InvalidEvent("event id must be 32 bytes of lowercase hex")
        if not isinstance(self.sig, str) or not _HEX64.fullmatch(self.sig):
            raise InvalidEvent("event sig must be 64 bytes of lowercase hex")

    @property
    def unsigned(self) -> UnsignedEvent:
        """The event without its signature."""
        return UnsignedEvent(self.pubkey, self.created_at, self.kind, self.tags, self.content)

    def tag_values(self, name: str) -> list[str]:
        """The second item of every tag called ``name``, in order."""
        return [t[1] for t in self.tags if len(t) >= 2 and t[0] == name]

    def to_dict(self) -> dict[str, Any]:
        """The NIP-01 JSON object."""
        return {
            "id": self.id,
            "pubkey": self.pubkey,
            "created_at": self.created_at,
            "kind": self.kind,
            "tags": [list(t) for t in self.tags],
            "content": self.content,
            "sig": self.sig,
        }

    def to_json(self) -> str:
        """Compact UTF-8 JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Event:
        """Validate an event object's shape (not its id or signature); unknown keys are ignored."""
        for key in ("id", "pubkey", "created_at", "kind", "tags", "content", "sig"):
            if key not in obj:
                raise InvalidEvent(f"event is missing '{key}'")
        return cls(
            id=obj["id"],
            pubkey=obj["pubkey"],
            created_at=obj["created_at"],
            kind=obj["kind"],
            tags=obj["tags"],
            content=obj["content"],
            sig=obj["sig"],
        )

    @classmethod
    def from_json(cls, text: str | bytes, max_chars: int = MAX_EVENT_JSON_CHARS) -> Event:
        """Parse an event from JSON text (shape only; call :func:`verify_event`)."""
        return cls.from_dict(_loads_object(text, "event", max_chars))


def secret_key_bytes(secret_key: str) -> bytes:
    """The 32 bytes of a hex secp256k1 secret key, checked to be in ``[1, n-1]``."""
    if not isinstance(secret_key, str) or not _HEX32_ANYCASE.fullmatch(secret_key):
        raise InvalidKey("secret key must be 32 bytes of hex")
    raw = bytes.fromhex(secret_key)
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    if not 0 < int.from_bytes(raw, "big") < n:
        raise InvalidKey("secret key is out of range for secp256k1")
    return raw


def public_key_of(secret_key: str) -> str:
    """secp256k1: the BIP-340 x-only public key (hex) of a hex secret key."""
    return bytes(PublicKeyXOnly.from_secret(secret_key_bytes(secret_key)).format()).hex()


@dataclass(frozen=True, slots=True)
class Keys:
    """A secp256k1 key pair: hex secret key and its x-only public key (BIP-340)."""

    secret_key: str = field(repr=False)
    public_key: str = field(init=False)

    def __post_init__(self) -> None:
        public_key = public_key_of(self.secret_key)  # validates first
        object.__setattr__(self, "secret_key", self.secret_key.lower())
        object.__setattr__(self, "public_key", public_key)

    @classmethod
    def generate(cls) -> Keys:
        """A fresh random key pair from the OS CSPRNG."""
        while True:
            candidate = os.urandom(32).hex()
            try:
                return cls(candidate)
            except InvalidKey:  # pragma: no cover - probability ~2^-128
                continue

    @classmethod
    def parse(cls, text: str) -> Keys:
        """Keys from a hex secret key or an ``nsec1…`` string."""
        text = text.strip()
        return cls(nip19.nsec_decode(text) if text.lower().startswith("nsec1") else text)

    @property
    def npub(self) -> str:
        """The public key as ``npub1…``."""
        return nip19.npub_encode(self.public_key)

    @property
    def nsec(self) -> str:
        """The secret key as ``nsec1…``."""
        return nip19.nsec_encode(self.secret_key)


def sign_event(
    unsigned: UnsignedEvent | EventTemplate,
    secret_key: str,
    created_at: int | None = None,
) -> Event:
    """Sign with BIP-340 Schnorr over secp256k1 (fresh aux randomness) the NIP-01 id."""
    pubkey = public_key_of(secret_key)
    if isinstance(unsigned, EventTemplate):
        when = int(time.time()) if created_at is None else created_at
        unsigned = UnsignedEvent(pubkey, when, unsigned.kind, unsigned.tags, unsigned.content)
    elif unsigned.pubkey != pubkey:
        raise InvalidKey("the secret key does not belong to the event's pubkey")
    eid = unsigned.id
    sig = PrivateKey(secret_key_bytes(secret_key)).sign_schnorr(bytes.fromhex(eid), os.urandom(32))
    return Event(
        eid,
        unsigned.pubkey,
        unsigned.created_at,
        unsigned.kind,
        unsigned.tags,
        unsigned.content,
        bytes(sig).hex(),
    )


def verify_event(event: Event) -> bool:
    """True if the id is the NIP-01 hash and ``sig`` a valid BIP-340 Schnorr signature of it."""
    if event.unsigned.id != event.id:
        return False
    try:
        key = PublicKeyXOnly(bytes.fromhex(event.pubkey))
        return bool(key.verify(bytes.fromhex(event.sig), bytes.fromhex(event.id)))
    except (ValueError, TypeError):
        return False


def parse_verified(text: str | bytes, kinds: Iterable[int] | None = None) -> Event:
    """Parse an event and require a valid id and signature (and, if given, one of ``kinds``)."""
    event = Event.from_json(text)
    if kinds is not None and event.kind not in set(kinds):
        raise InvalidEvent(f"unexpected event kind {event.kind}")
    if not verify_event(event):
        raise InvalidEvent("event id or signature is invalid")
    return event


def tags_of(pairs: Sequence[Sequence[str]]) -> Tags:
    """Tags from any sequence of sequences of strings, validated."""
    return _check_tags(list(pairs))
