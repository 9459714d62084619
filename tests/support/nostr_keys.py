"""Test-only Nostr keys: NIP-01 event ids and BIP-340 signatures with coincurve.

Independent of ``nodeprov.protocol.nostr_event`` on purpose, so tests can sign before (and check
against) the project's own implementation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import coincurve

__all__ = ["Keys", "event_id", "verify_event"]


def _serialize(event: dict[str, Any]) -> bytes:
    body = [0, event["pubkey"], event["created_at"], event["kind"], event["tags"], event["content"]]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def event_id(event: dict[str, Any]) -> str:
    """sha256 of the NIP-01 serialization, hex."""
    return hashlib.sha256(_serialize(event)).hexdigest()


def verify_event(event: dict[str, Any]) -> bool:
    """True if the id matches the content and the Schnorr signature is valid."""
    try:
        if event_id(event) != event["id"]:
            return False
        key = coincurve.PublicKeyXOnly(bytes.fromhex(event["pubkey"]))
        return bool(key.verify(bytes.fromhex(event["sig"]), bytes.fromhex(event["id"])))
    except (KeyError, TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Keys:
    """A secp256k1 key pair that signs Nostr events."""

    secret: bytes

    @classmethod
    def generate(cls) -> Keys:
        return cls(os.urandom(32))

    @property
    def pubkey(self) -> str:
        return coincurve.PrivateKey(self.secret).public_key_xonly.format().hex()

    def sign(self, template: dict[str, Any]) -> dict[str, Any]:
        """Fill pubkey (and created_at if missing), id and sig into a copy of ``template``."""
        event = {
            "pubkey": self.pubkey,
            "created_at": int(template.get("created_at") or time.time()),
            "kind": int(template["kind"]),
            "tags": [list(t) for t in template.get("tags", [])],
            "content": template.get("content", ""),
        }
        event["id"] = event_id(event)
        sig = coincurve.PrivateKey(self.secret).sign_schnorr(bytes.fromhex(event["id"]))
        event["sig"] = sig.hex()
        return event

    async def async_sign(self, template: dict[str, Any]) -> dict[str, Any]:
        """The ``sign`` callback shape ``RelayPool`` wants."""
        return self.sign(template)

    def event(
        self,
        content: str = "",
        kind: int = 1,
        tags: list[list[str]] | None = None,
        created_at: int | None = None,
    ) -> dict[str, Any]:
        """A signed event (defaults: kind 1, now)."""
        return self.sign(
            {"kind": kind, "content": content, "tags": tags or [], "created_at": created_at}
        )
