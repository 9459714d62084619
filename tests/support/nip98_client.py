"""A NIP-98 HTTP client for tests, signing with nostr-sdk (an implementation nobody here wrote).

:class:`Nip98Client` signs one kind 27235 event per request (``u``, ``method`` and, with a
body, ``payload`` = SHA-256 of the exact bytes sent) and sends it as
``Authorization: Nostr <base64>``; :meth:`Nip98Client.header` makes one to tamper with.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import httpx
import nostr_sdk as ns  # type: ignore[import-untyped]

HTTP_AUTH = ns.Kind.from_std(ns.KindStandard.HTTP_AUTH)  # 27235, as nostr-sdk names it


def encode_body(body: Any) -> bytes:
    """The bytes a JSON body is sent as (and hashed over)."""
    return json.dumps(body, separators=(",", ":")).encode()


class Nip98Client:
    """One Nostr key paying a node over HTTP with NIP-98 headers."""

    def __init__(self, http: httpx.AsyncClient, keys: ns.Keys | None = None) -> None:
        self.http = http
        self.keys = keys or ns.Keys.generate()

    @property
    def pubkey(self) -> str:
        return str(self.keys.public_key().to_hex())

    @property
    def secret_hex(self) -> str:
        return str(self.keys.secret_key().to_hex())

    def header(
        self,
        method: str,
        url: str,
        body: bytes = b"",
        *,
        at: int | None = None,
        payload: str | None = None,
    ) -> dict[str, str]:
        """``Authorization: Nostr …`` for ``method url`` with ``body`` (its hash unless
        ``payload`` is given; "" leaves the tag out), made at ``at`` (default now)."""
        tags = [ns.Tag.parse(["u", url]), ns.Tag.parse(["method", method])]
        digest = hashlib.sha256(body).hexdigest() if body and payload is None else payload
        if digest:
            tags.append(ns.Tag.parse(["payload", digest]))
        builder = ns.EventBuilder(HTTP_AUTH, "").tags(tags)
        builder = builder.custom_created_at(ns.Timestamp.from_secs(at or int(time.time())))
        event = builder.finalize(self.keys)
        return {"Authorization": "Nostr " + base64.b64encode(event.as_json().encode()).decode()}

    async def post(self, url: str, body: Any, **sign: Any) -> httpx.Response:
        """POST ``body`` as JSON, signed for exactly these bytes."""
        raw = encode_body(body)
        headers = {"Content-Type": "application/json", **self.header("POST", url, raw, **sign)}
        return await self.http.post(url, content=raw, headers=headers)

    async def get(self, url: str) -> httpx.Response:
        return await self.http.get(url, headers=self.header("GET", url))

    async def balance(self, base: str) -> int:
        """The available msat the node shows this key (``/v1/wallet/balance``)."""
        r = await self.get(base + "/wallet/balance")
        assert r.status_code == 200, r.text
        return int(r.json()["available"])
