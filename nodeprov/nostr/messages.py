"""NIP-01/NIP-42 client<->relay messages as pure functions: build client frames, parse relay frames.

No I/O here; ``relay_pool`` is the asyncio adapter around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AUTH_KIND",
    "Filter",
    "MessageError",
    "RelayAuth",
    "RelayClosed",
    "RelayEose",
    "RelayEvent",
    "RelayLimits",
    "RelayMessage",
    "RelayNotice",
    "RelayOk",
    "auth_message",
    "auth_template",
    "close_message",
    "dumps",
    "event_message",
    "filter_json",
    "parse_relay_message",
    "reason_prefix",
    "req_message",
    "resume_filters",
    "validate_event",
]

AUTH_KIND = 22242
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TAG_KEY = re.compile(r"[A-Za-z]")


class MessageError(ValueError):
    """A relay frame or event that is not well-formed NIP-01."""


def dumps(obj: Any) -> str:
    """Compact JSON, UTF-8 kept as is (what relays measure and what NIP-01 ids use)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------ filters


@dataclass(frozen=True, slots=True)
class Filter:
    """A NIP-01 REQ filter; ``tags`` maps a single letter (no ``#``) to wanted values."""

    ids: Sequence[str] | None = None
    authors: Sequence[str] | None = None
    kinds: Sequence[int] | None = None
    tags: Mapping[str, Sequence[str]] = field(default_factory=dict)
    since: int | None = None
    until: int | None = None
    limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The filter object as it goes on the wire (absent fields omitted)."""
        out: dict[str, Any] = {}
        for name in ("ids", "authors", "kinds"):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value)
        for key, values in self.tags.items():
            if not _TAG_KEY.fullmatch(key):
                raise MessageError(f"tag filter key must be one letter, got {key!r}")
            out[f"#{key}"] = list(values)
        for name in ("since", "until", "limit"):
            value = getattr(self, name)
            if value is not None:
                out[name] = int(value)
        return out


def filter_json(f: Filter | Mapping[str, Any]) -> dict[str, Any]:
    """A filter as a plain dict, whether given as ``Filter`` or as a dict."""
    return f.to_json() if isinstance(f, Filter) else dict(f)


def resume_filters(
    filters: Sequence[Mapping[str, Any]], last_seen: int | None, overlap: int
) -> list[dict[str, Any]]:
    """Filters for a re-subscription: ``since`` moved up to ``last_seen - overlap``."""
    out = [dict(f) for f in filters]
    if last_seen is None:
        return out
    floor = max(0, last_seen - overlap)
    for f in out:
        given = f.get("since")
        f["since"] = floor if not isinstance(given, int) else max(given, floor)
    return out


# ------------------------------------------------------------------------- client messages


def req_message(sub_id: str, filters: Sequence[Filter | Mapping[str, Any]]) -> str:
    """``["REQ", sub_id, filter...]``."""
    if not sub_id:
        raise MessageError("subscription id must not be empty")
    return dumps(["REQ", sub_id, *(filter_json(f) for f in filters)])


def close_message(sub_id: str) -> str:
    """``["CLOSE", sub_id]``."""
    return dumps(["CLOSE", sub_id])


def event_message(event: Mapping[str, Any]) -> str:
    """``["EVENT", event]``."""
    return dumps(["EVENT", dict(event)])


def auth_message(event: Mapping[str, Any]) -> str:
    """``["AUTH", signed_event]`` (NIP-42 client side)."""
    return dumps(["AUTH", dict(event)])


def auth_template(relay_url: str, challenge: str, created_at: int) -> dict[str, Any]:
    """The unsigned kind 22242 event a signer turns into the AUTH reply."""
    return {
        "kind": AUTH_KIND,
        "created_at": created_at,
        "tags": [["relay", relay_url], ["challenge", challenge]],
        "content": "",
    }


# -------------------------------------------------------------------------- relay messages


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """``["EVENT", sub_id, event]``."""

    sub_id: str
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RelayOk:
    """``["OK", event_id, accepted, message]``; ``event_id`` may be "" (nostr-relay quirk)."""

    event_id: str
    accepted: bool
    message: str

    @property
    def prefix(self) -> str:
        return reason_prefix(self.message)


@dataclass(frozen=True, slots=True)
class RelayEose:
    """``["EOSE", sub_id]``."""

    sub_id: str


@dataclass(frozen=True, slots=True)
class RelayClosed:
    """``["CLOSED", sub_id, message]``."""

    sub_id: str
    message: str

    @property
    def prefix(self) -> str:
        return reason_prefix(self.message)


@dataclass(frozen=True, slots=True)
class RelayNotice:
    """``["NOTICE", message]``."""

    message: str


@dataclass(frozen=True, slots=True)
class RelayAuth:
    """``["AUTH", challenge]`` (NIP-42 relay side)."""

    challenge: str


RelayMessage = RelayEvent | RelayOk | RelayEose | RelayClosed | RelayNotice | RelayAuth


def reason_prefix(message: str) -> str:
    """The machine-readable prefix of an OK/CLOSED message (``"auth-required"``, ...) or ""."""
    head, sep, _ = message.partition(":")
    return head.strip() if sep and " " not in head.strip() else ""


def _str(frame: list[Any], index: int, what: str, *, optional: bool = False) -> str:
    if index >= len(frame):
        if optional:
            return ""
        raise MessageError(f"{frame[0]}: missing {what}")
    value = frame[index]
    if not isinstance(value, str):
        raise MessageError(f"{frame[0]}: {what} must be a string")
    return value


def validate_event(obj: Any) -> dict[str, Any]:
    """Check the NIP-01 shape of an event (not its id or signature); return it as a dict."""
    if not isinstance(obj, dict):
        raise MessageError("event must be an object")
    for name, pattern in (("id", _HEX64), ("pubkey", _HEX64), ("sig", _HEX128)):
        value = obj.get(name)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise MessageError(f"event {name} must be lowercase hex of the right length")
    for name in ("created_at", "kind"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MessageError(f"event {name} must be a non-negative integer")
    if obj["kind"] > 65535:
        raise MessageError("event kind out of range")
    tags = obj.get("tags")
    if not isinstance(tags, list) or not all(
        isinstance(t, list) and all(isinstance(x, str) for x in t) for t in tags
    ):
        raise MessageError("event tags must be a list of lists of strings")
    if not isinstance(obj.get("content"), str):
        raise MessageError("event content must be a string")
    return obj


def parse_relay_message(raw: str | bytes) -> RelayMessage:
    """Parse one relay frame; anything malformed or unknown raises ``MessageError``."""
    try:
        frame = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(frame, list) or not frame or not isinstance(frame[0], str):
        raise MessageError("a relay message is a JSON array starting with its type")
    kind = frame[0]
    if kind == "EVENT":
        if len(frame) < 3:
            raise MessageError("EVENT: expected sub_id and event")
        return RelayEvent(_str(frame, 1, "subscription id"), validate_event(frame[2]))
    if kind == "OK":
        event_id = _str(frame, 1, "event id")
        if event_id and not _HEX64.fullmatch(event_id):
            raise MessageError("OK: event id must be 64 lowercase hex or empty")
        if len(frame) < 3 or not isinstance(frame[2], bool):
            raise MessageError("OK: accepted flag must be a boolean")
        return RelayOk(event_id, frame[2], _str(frame, 3, "message", optional=True))
    if kind == "EOSE":
        return RelayEose(_str(frame, 1, "subscription id"))
    if kind == "CLOSED":
        return RelayClosed(
            _str(frame, 1, "subscription id"), _str(frame, 2, "message", optional=True)
        )
    if kind == "NOTICE":
        return RelayNotice(_str(frame, 1, "message", optional=True))
    if kind == "AUTH":
        return RelayAuth(_str(frame, 1, "challenge"))
    raise MessageError(f"unknown relay message type {kind!r}")


# ------------------------------------------------------------------------------------ NIP-11


def _pos_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """The parts of a NIP-11 ``limitation`` section the pool obeys (None: not announced)."""

    max_message_length: int | None = None
    max_subscriptions: int | None = None
    max_content_length: int | None = None
    auth_required: bool = False

    @classmethod
    def from_nip11(cls, doc: Any) -> RelayLimits:
        """Read a NIP-11 document leniently: missing or odd values mean "no limit"."""
        lim = doc.get("limitation") if isinstance(doc, dict) else None
        if not isinstance(lim, dict):
            return cls()
        return cls(
            max_message_length=_pos_int(lim.get("max_message_length")),
            max_subscriptions=_pos_int(lim.get("max_subscriptions")),
            max_content_length=_pos_int(lim.get("max_content_length")),
            auth_required=lim.get("auth_required") is True,
        )

    def refuse_event(self, event: Mapping[str, Any]) -> str | None:
        """Why this relay would refuse ``event`` by its announced limits, or None."""
        content = event.get("content", "")
        limit = self.max_content_length
        if limit is not None and isinstance(content, str) and len(content) > limit:
            return (
                f"refused: content length {len(content)} exceeds the relay's "
                f"max_content_length {limit}"
            )
        if self.max_message_length is not None:
            size = len(event_message(event).encode())
            if size > self.max_message_length:
                return (
                    f"refused: message of {size} bytes exceeds the relay's "
                    f"max_message_length {self.max_message_length}"
                )
        return None
