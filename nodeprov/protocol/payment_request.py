"""NUT-18 payment requests (``creqA`` + base64url CBOR) and the ``PaymentRequestPayload`` JSON.

A malformed request raises :class:`InvalidRequest`; a malformed payload (money offered by a
client) raises :class:`InvalidToken`, like a malformed token would.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from nodeprov.errors import InvalidRequest, InvalidToken
from nodeprov.protocol.cashu_token import Proof, Token

PREFIX = "creqA"
MAX_REQUEST_CHARS = 64_000
MAX_PAYLOAD_BYTES = 200_000

_B64_BODY = re.compile(r"[A-Za-z0-9_\-+/]*")


def _absent(value: object) -> bool:
    # The NUT-18 vectors encode missing optional fields as CBOR `undefined`, not by omission.
    return value is None or value is cbor2.undefined


def _opt_str(value: object, what: str) -> str | None:
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"payment request field '{what}' must be a string")
    return value


def _tags(value: object, what: str) -> tuple[tuple[str, ...], ...]:
    if _absent(value):
        return ()
    if not isinstance(value, list | tuple):
        raise InvalidRequest(f"payment request {what} must be a list of tags")
    out: list[tuple[str, ...]] = []
    for tag in value:
        if not isinstance(tag, list | tuple) or not tag or not all(isinstance(x, str) for x in tag):
            raise InvalidRequest(f"payment request {what} must be lists of strings")
        out.append(tuple(tag))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Transport:
    """Where the payer sends the payload: ``type`` ``nostr``/``post``, ``target``, ``tags``."""

    type: str
    target: str
    tags: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.type, str) or not self.type:
            raise InvalidRequest("payment request transport has no type")
        if not isinstance(self.target, str) or not self.target:
            raise InvalidRequest("payment request transport has no target")
        _tags(self.tags, "transport tags")

    def to_wire(self) -> dict[str, Any]:
        """The NUT-18 transport map ``{t, a, g?}``."""
        wire: dict[str, Any] = {"t": self.type, "a": self.target}
        if self.tags:
            wire["g"] = [list(t) for t in self.tags]
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Transport:
        """Validate a NUT-18 transport map."""
        if not isinstance(obj, Mapping):
            raise InvalidRequest("payment request transport must be a map")
        return cls(
            type=obj.get("t"),  # type: ignore[arg-type]  # validated in __post_init__
            target=obj.get("a"),  # type: ignore[arg-type]
            tags=_tags(obj.get("g"), "transport tags"),
        )


@dataclass(frozen=True, slots=True)
class Nut10Option:
    """The NUT-10 locking condition a payee requires: ``kind`` (e.g. P2PK), ``data``, ``tags``."""

    kind: str
    data: str
    tags: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise InvalidRequest("payment request nut10 has no kind")
        if not isinstance(self.data, str):
            raise InvalidRequest("payment request nut10 data must be a string")
        _tags(self.tags, "nut10 tags")

    def to_wire(self) -> dict[str, Any]:
        """The NUT-18 ``NUT10Option`` map ``{k, d, t?}``."""
        wire: dict[str, Any] = {"k": self.kind, "d": self.data}
        if self.tags:
            wire["t"] = [list(t) for t in self.tags]
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Nut10Option:
        """Validate a NUT-18 ``NUT10Option`` map."""
        if not isinstance(obj, Mapping):
            raise InvalidRequest("payment request nut10 must be a map")
        return cls(
            kind=obj.get("k"),  # type: ignore[arg-type]  # validated in __post_init__
            data=obj.get("d"),  # type: ignore[arg-type]
            tags=_tags(obj.get("t"), "nut10 tags"),
        )


@dataclass(frozen=True, slots=True)
class PaymentRequest:
    """A NUT-18 request; empty ``mints`` means any mint, empty ``transports`` means in-band."""

    id: str | None = None  # i
    amount: int | None = None  # a
    unit: str | None = None  # u
    single_use: bool | None = None  # s
    mints: tuple[str, ...] = ()  # m
    description: str | None = None  # d
    transports: tuple[Transport, ...] = ()  # t
    nut10: Nut10Option | None = None

    def __post_init__(self) -> None:
        a = self.amount
        if a is not None and (isinstance(a, bool) or not isinstance(a, int) or a <= 0):
            raise InvalidRequest("payment request amount must be a positive integer")
        if a is not None and self.unit is None:
            raise InvalidRequest("payment request has an amount but no unit")
        for name in ("id", "unit", "description"):
            _opt_str(getattr(self, name), name)
        if self.single_use is not None and not isinstance(self.single_use, bool):
            raise InvalidRequest("payment request field 's' must be a boolean")
        if not isinstance(self.mints, tuple) or not all(
            isinstance(m, str) and m for m in self.mints
        ):
            raise InvalidRequest("payment request mints must be a list of URLs")
        if not isinstance(self.transports, tuple) or not all(
            isinstance(t, Transport) for t in self.transports
        ):
            raise InvalidRequest("payment request transports must be Transport objects")
        if self.nut10 is not None and not isinstance(self.nut10, Nut10Option):
            raise InvalidRequest("payment request nut10 must be a Nut10Option")

    def to_wire(self) -> dict[str, Any]:
        """The CBOR map, keys in the order the NUT-18 vectors use (t, i, a, u, m, d, s, nut10)."""
        wire: dict[str, Any] = {}
        if self.transports:
            wire["t"] = [t.to_wire() for t in self.transports]
        for key, value in (("i", self.id), ("a", self.amount), ("u", self.unit)):
            if value is not None:
                wire[key] = value
        if self.mints:
            wire["m"] = list(self.mints)
        if self.description is not None:
            wire["d"] = self.description
        if self.single_use is not None:
            wire["s"] = self.single_use
        if self.nut10 is not None:
            wire["nut10"] = self.nut10.to_wire()
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> PaymentRequest:
        """Validate a decoded NUT-18 map; unknown keys are ignored."""
        if not isinstance(obj, Mapping):
            raise InvalidRequest("payment request must be a CBOR map")
        mints = obj.get("m")
        if _absent(mints):
            mints = []
        if not isinstance(mints, list):
            raise InvalidRequest("payment request mints must be a list of URLs")
        transports = obj.get("t")
        if _absent(transports):
            transports = []
        if not isinstance(transports, list):
            raise InvalidRequest("payment request transports must be a list")
        nut10 = obj.get("nut10")
        amount = obj.get("a")
        single_use = obj.get("s")
        return cls(
            id=_opt_str(obj.get("i"), "i"),
            amount=None if _absent(amount) else amount,
            unit=_opt_str(obj.get("u"), "u"),
            single_use=None if _absent(single_use) else single_use,
            mints=tuple(mints),
            description=_opt_str(obj.get("d"), "d"),
            transports=tuple(Transport.from_wire(t) for t in transports),
            nut10=None if _absent(nut10) else Nut10Option.from_wire(nut10),
        )


def encode_payment_request(req: PaymentRequest) -> str:
    """``creqA`` + padded base64url(CBOR), byte-identical to the NUT-18 reference encoder."""
    return PREFIX + base64.urlsafe_b64encode(cbor2.dumps(req.to_wire())).decode("ascii")


def decode_payment_request(text: str) -> PaymentRequest:
    """Parse a ``creqA…`` string (padding optional); raise InvalidRequest on anything malformed."""
    if not isinstance(text, str):
        raise InvalidRequest("payment request must be a string")
    if len(text) > MAX_REQUEST_CHARS:
        raise InvalidRequest(f"payment request is too large (over {MAX_REQUEST_CHARS} chars)")
    text = text.strip()
    if not text.startswith(PREFIX):
        raise InvalidRequest("not a Cashu payment request: expected creqA prefix")
    body = text[len(PREFIX) :].rstrip("=")
    if not body or not _B64_BODY.fullmatch(body) or len(body) % 4 == 1:
        raise InvalidRequest("payment request is truncated or not base64")
    body = body.replace("+", "-").replace("/", "_")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InvalidRequest("payment request is not valid base64") from None
    stream = io.BytesIO(raw)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except cbor2.CBORDecodeEOF:
        raise InvalidRequest("payment request is truncated") from None
    except Exception:  # cbor2 can raise many types on hostile input; all mean "malformed"
        raise InvalidRequest("payment request is not valid CBOR") from None
    if stream.tell() != len(raw):
        raise InvalidRequest("payment request has trailing data after its CBOR body")
    try:
        return PaymentRequest.from_wire(obj)
    except InvalidRequest:
        raise
    except Exception as exc:  # a last guard: garbage must never escape as anything else
        raise InvalidRequest(f"payment request is malformed ({type(exc).__name__})") from None


@dataclass(frozen=True, slots=True)
class PaymentRequestPayload:
    """What a payer sends to a NUT-18 transport: proofs from one mint plus the request id."""

    mint: str
    unit: str
    proofs: tuple[Proof, ...]
    id: str | None = None
    memo: str | None = None

    def __post_init__(self) -> None:
        # Token's own validation covers mint, unit, proofs and memo.
        self.to_token()
        if self.id is not None and not isinstance(self.id, str):
            raise InvalidToken("payment payload id must be a string")

    @property
    def amount(self) -> int:
        """Sum of the proof amounts, in ``unit``."""
        return sum(p.amount for p in self.proofs)

    def to_token(self) -> Token:
        """The same proofs as a Token, so payments take the one token pipeline."""
        return Token(mint=self.mint, unit=self.unit, proofs=self.proofs, memo=self.memo)

    def to_wire(self) -> dict[str, Any]:
        """The NUT-18 ``PaymentRequestPayload`` JSON object."""
        wire: dict[str, Any] = {}
        if self.id is not None:
            wire["id"] = self.id
        if self.memo is not None:
            wire["memo"] = self.memo
        wire["mint"] = self.mint
        wire["unit"] = self.unit
        wire["proofs"] = [p.to_wire() for p in self.proofs]
        return wire


def build_payment_payload(payload: PaymentRequestPayload) -> str:
    """Serialize a payload as compact JSON (the body of a POST or a NIP-17 DM)."""
    return json.dumps(payload.to_wire(), separators=(",", ":"), ensure_ascii=False)


def parse_payment_payload(data: str | bytes | Mapping[str, Any]) -> PaymentRequestPayload:
    """Parse a payload from JSON text/bytes or an already decoded object; raise InvalidToken."""
    try:
        return _parse_payload(data)
    except InvalidToken:
        raise
    except Exception as exc:  # a last guard: garbage must never escape as anything else
        raise InvalidToken(f"payment payload is malformed ({type(exc).__name__})") from None


def _parse_payload(data: str | bytes | Mapping[str, Any]) -> PaymentRequestPayload:
    obj: object = data
    if isinstance(data, str | bytes):
        if len(data) > MAX_PAYLOAD_BYTES:
            raise InvalidToken("payment payload is too large")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidToken("payment payload is not valid JSON") from None
    if not isinstance(obj, Mapping):
        raise InvalidToken("payment payload must be a JSON object")
    mint = obj.get("mint")
    if not isinstance(mint, str) or not mint.strip():
        raise InvalidToken("payment payload has no mint URL")
    proofs = obj.get("proofs")
    if not isinstance(proofs, list):
        raise InvalidToken("payment payload has no 'proofs' list")
    return PaymentRequestPayload(
        id=obj.get("id"),
        memo=obj.get("memo"),
        mint=mint.strip().rstrip("/"),
        unit=obj.get("unit"),  # type: ignore[arg-type]  # validated by Token
        proofs=tuple(Proof.from_wire(p) for p in proofs),
    )
