"""Cashu tokens (NUT-00 V3 ``cashuA`` and V4 ``cashuB``) with NUT-12 DLEQ proofs, sans I/O.

Parsing is strict about shape and types and turns every defect into :class:`InvalidToken`
with a message a user can act on; it never contacts a mint (spent-ness and keyset checks
belong to the wallet).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

from nodeprov.errors import InvalidToken

MAX_TOKEN_CHARS = 200_000
# Amounts must fit the ledger's signed 64-bit integers even after summing a few of them.
MAX_PROOF_AMOUNT = 2**53

_B64_BODY = re.compile(r"[A-Za-z0-9_\-+/]*")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
# A token starts where no base64 character precedes it, so words like "xcashuB" are skipped;
# the minimum body length keeps ordinary words such as "cashuBot" out of chat matches.
_TOKEN_IN_TEXT = re.compile(r"(?<![A-Za-z0-9_\-+/])cashu[AB][A-Za-z0-9_\-+/]{32,}=*")


def _is_text(value: object) -> bool:
    """A str that survives UTF-8 encoding (JSON may smuggle lone surrogates in; CBOR cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_hex(value: object, nbytes: int | None = None) -> bool:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        return False
    return nbytes is None or len(value) == 2 * nbytes


@dataclass(frozen=True, slots=True)
class Dleq:
    """NUT-12 DLEQ proof carried in a Proof: challenge ``e``, response ``s``, blinding ``r``."""

    e: str
    s: str
    r: str

    def __post_init__(self) -> None:
        for name in ("e", "s", "r"):
            if not _is_hex(getattr(self, name), 32):
                raise InvalidToken(f"proof DLEQ field '{name}' must be 32 bytes of hex")

    def to_wire(self) -> dict[str, str]:
        """The NUT-12 JSON object ``{"e", "s", "r"}``."""
        return {"e": self.e, "s": self.s, "r": self.r}


@dataclass(frozen=True, slots=True)
class Proof:
    """One ecash proof as in NUT-00, validated on construction."""

    amount: int
    keyset_id: str
    secret: str
    C: str
    dleq: Dleq | None = None
    witness: str | None = None

    def __post_init__(self) -> None:
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise InvalidToken("proof amount must be an integer")
        if not 0 < amount <= MAX_PROOF_AMOUNT:
            raise InvalidToken(f"proof amount must be positive and at most {MAX_PROOF_AMOUNT}")
        if not _is_hex(self.keyset_id):
            raise InvalidToken("proof keyset id must be hex")
        if not _is_text(self.secret) or not self.secret:
            raise InvalidToken("proof secret must be a non-empty string")
        if not _is_hex(self.C, 33) or self.C[:2] not in ("02", "03"):
            raise InvalidToken("proof signature C must be a 33-byte compressed point in hex")
        if self.dleq is not None and not isinstance(self.dleq, Dleq):
            raise InvalidToken("proof DLEQ must be an object")
        if self.witness is not None and not _is_text(self.witness):
            raise InvalidToken("proof witness must be a string")

    def to_wire(self) -> dict[str, Any]:
        """The NUT-00 JSON proof: ``amount``, ``id``, ``secret``, ``C``, ``dleq``?, ``witness``?."""
        wire: dict[str, Any] = {
            "amount": self.amount,
            "id": self.keyset_id,
            "secret": self.secret,
            "C": self.C,
        }
        if self.dleq is not None:
            wire["dleq"] = self.dleq.to_wire()
        if self.witness is not None:
            wire["witness"] = self.witness
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Proof:
        """Validate a NUT-00 JSON proof object; unknown fields are ignored, as the spec asks."""
        if not isinstance(obj, Mapping):
            raise InvalidToken("each proof must be a JSON object")
        for key in ("amount", "id", "secret", "C"):
            if key not in obj:
                raise InvalidToken(f"proof is missing '{key}'")
        return cls(
            amount=obj["amount"],
            keyset_id=obj["id"],
            secret=obj["secret"],
            C=obj["C"],
            dleq=_dleq_from_wire(obj.get("dleq"), lambda v: v),
            witness=_witness(obj.get("witness")),
        )


def _witness(value: object) -> str | None:
    # Some wallets send the witness as a JSON object rather than its string form.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, separators=(",", ":"))
    raise InvalidToken("proof witness must be a string")


def _dleq_from_wire(obj: object, conv: Any) -> Dleq | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        raise InvalidToken("proof DLEQ must be an object")
    if obj.get("r") is None:
        # Without the blinding factor a receiver cannot check the DLEQ, so it carries nothing.
        return None
    try:
        return Dleq(e=conv(obj["e"]), s=conv(obj["s"]), r=conv(obj["r"]))
    except KeyError as exc:
        raise InvalidToken(f"proof DLEQ is missing '{exc.args[0]}'") from None


@dataclass(frozen=True, slots=True)
class Token:
    """Proofs from one mint in one unit; ``mint`` has no trailing slash (NUT-00)."""

    mint: str
    unit: str
    proofs: tuple[Proof, ...]
    memo: str | None = None

    def __post_init__(self) -> None:
        if not _is_text(self.mint) or not self.mint:
            raise InvalidToken("token has no mint URL")
        if not _is_text(self.unit) or not self.unit:
            raise InvalidToken("token has no unit")
        if not isinstance(self.proofs, tuple) or not self.proofs:
            raise InvalidToken("token has no proofs")
        if not all(isinstance(p, Proof) for p in self.proofs):
            raise InvalidToken("token proofs must be Proof objects")
        if self.memo is not None and not _is_text(self.memo):
            raise InvalidToken("token memo must be a string")

    @property
    def amount(self) -> int:
        """Sum of the proof amounts, in ``unit``."""
        return sum(p.amount for p in self.proofs)


def _b64decode(body: str) -> bytes:
    """Decode url-safe or standard base64, with or without padding."""
    body = body.rstrip("=")
    if not body:
        raise InvalidToken("token is truncated: nothing after the prefix")
    if not _B64_BODY.fullmatch(body):
        raise InvalidToken("token contains characters that are not base64")
    if len(body) % 4 == 1:
        raise InvalidToken("token is truncated or corrupted (invalid base64 length)")
    body = body.replace("+", "-").replace("/", "_")
    try:
        return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("token is not valid base64") from None


def _b64encode(raw: bytes, *, pad: bool) -> str:
    text = base64.urlsafe_b64encode(raw).decode("ascii")
    return text if pad else text.rstrip("=")


def _normalize_mint(mint: object) -> str:
    if not isinstance(mint, str) or not mint.strip():
        raise InvalidToken("token has no mint URL")
    return mint.strip().rstrip("/")


def _optional_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidToken(f"token {what} must be a string")


def _parse_v3(raw: bytes) -> Token:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidToken("token is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Unterminated") or exc.pos >= len(exc.doc.rstrip()):
            raise InvalidToken("token is truncated") from None
        raise InvalidToken(f"token is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InvalidToken("token JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise InvalidToken("token JSON must be an object")
    entries = obj.get("token")
    if not isinstance(entries, list) or not entries:
        raise InvalidToken("token has no 'token' entries")
    mints: list[str] = []
    proofs: list[Proof] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidToken("each token entry must be an object")
        mint = _normalize_mint(entry.get("mint"))
        if mint not in mints:
            mints.append(mint)
        entry_proofs = entry.get("proofs")
        if not isinstance(entry_proofs, list):
            raise InvalidToken("token entry has no 'proofs' list")
        proofs.extend(Proof.from_wire(p) for p in entry_proofs)
    if len(mints) > 1:
        raise InvalidToken("token has proofs from several mints; send one token per mint")
    unit = obj.get("unit", "sat")  # NUT-00: V3 tokens without a unit are sat
    if unit is None:
        unit = "sat"
    if not isinstance(unit, str) or not unit:
        raise InvalidToken("token unit must be a non-empty string")
    memo = _optional_str(obj.get("memo"), "memo")
    return Token(mint=mints[0], unit=unit, proofs=tuple(proofs), memo=memo)


def _hex_of(value: object, what: str) -> str:
    if not isinstance(value, bytes) or not value:
        raise InvalidToken(f"token {what} must be a CBOR byte string")
    return value.hex()


def _parse_v4(raw: bytes) -> Token:
    stream = io.BytesIO(raw)
    try:
        obj = cbor2.CBORDecoder(stream).decode()
    except cbor2.CBORDecodeEOF:
        raise InvalidToken("token is truncated") from None
    except (cbor2.CBORDecodeError, RecursionError, ValueError, TypeError, OverflowError):
        raise InvalidToken("token is not valid CBOR") from None
    except Exception:  # cbor2's tag hooks can raise nearly anything on hostile input
        raise InvalidToken("token is not valid CBOR") from None
    if stream.tell() != len(raw):
        raise InvalidToken("token has trailing data after its CBOR body")
    if not isinstance(obj, dict):
        raise InvalidToken("token CBOR must be a map")
    mint = _normalize_mint(obj.get("m"))
    unit = obj.get("u")
    if not isinstance(unit, str) or not unit:
        raise InvalidToken("token has no unit")
    memo = _optional_str(obj.get("d"), "memo")
    groups = obj.get("t")
    if not isinstance(groups, list):
        raise InvalidToken("token has no 't' proof groups")
    proofs: list[Proof] = []
    for group in groups:
        if not isinstance(group, dict):
            raise InvalidToken("token proof group must be a map")
        # Short (8-byte) ids stay short here; the wallet resolves them against the mint's keysets.
        keyset_id = _hex_of(group.get("i"), "keyset id")
        items = group.get("p")
        if not isinstance(items, list):
            raise InvalidToken("token proof group has no 'p' list")
        for item in items:
            if not isinstance(item, dict):
                raise InvalidToken("each proof must be a map")
            for key in ("a", "s", "c"):
                if key not in item:
                    raise InvalidToken(f"proof is missing '{key}'")
            proofs.append(
                Proof(
                    amount=item["a"],
                    keyset_id=keyset_id,
                    secret=item["s"],
                    C=_hex_of(item["c"], "proof signature"),
                    dleq=_dleq_from_wire(item.get("d"), lambda v: _hex_of(v, "DLEQ field")),
                    witness=_witness(item.get("w")),
                )
            )
    return Token(mint=mint, unit=unit, proofs=tuple(proofs), memo=memo)


def parse_token(text: str) -> Token:
    """Parse a ``cashuA``/``cashuB`` token (optionally ``cashu:``-prefixed); raise InvalidToken."""
    if not isinstance(text, str):
        raise InvalidToken("token must be a string")
    if len(text) > MAX_TOKEN_CHARS:
        raise InvalidToken(f"token is too large (over {MAX_TOKEN_CHARS // 1000} kB)")
    text = text.strip()
    if text[:6].lower() == "cashu:":
        text = text[6:].lstrip("/")
    if not text.startswith("cashu") or len(text) < 6:
        raise InvalidToken("not a Cashu token: expected cashuA or cashuB prefix")
    version, body = text[5], text[6:]
    if version not in "AB":
        raise InvalidToken(f"unsupported Cashu token version '{version}' (expected A or B)")
    raw = _b64decode(body)
    try:
        return _parse_v3(raw) if version == "A" else _parse_v4(raw)
    except InvalidToken:
        raise
    except Exception as exc:  # a last guard: garbage must never escape as anything else
        raise InvalidToken(f"token is malformed ({type(exc).__name__})") from None


def serialize_token(token: Token, version: int = 4) -> str:
    """Serialize as ``cashuB`` (version 4, CBOR, unpadded) or ``cashuA`` (version 3, JSON)."""
    if version == 3:
        v3: dict[str, Any] = {
            "token": [{"mint": token.mint, "proofs": [p.to_wire() for p in token.proofs]}],
            "unit": token.unit,
        }
        if token.memo is not None:
            v3["memo"] = token.memo
        raw = json.dumps(v3, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Padded like the reference wallet's V3 output, for old decoders that insist on it.
        return "cashuA" + _b64encode(raw, pad=True)
    if version != 4:
        raise ValueError(f"unsupported token version {version}")
    groups: dict[str, list[dict[str, Any]]] = {}
    for p in token.proofs:
        item: dict[str, Any] = {"a": p.amount, "s": p.secret, "c": bytes.fromhex(p.C)}
        if p.dleq is not None:
            item["d"] = {k: bytes.fromhex(v) for k, v in p.dleq.to_wire().items()}
        if p.witness is not None:
            item["w"] = p.witness
        groups.setdefault(p.keyset_id.lower(), []).append(item)
    # Key order follows the NUT-00 vectors (t, d, m, u) so the output is byte-identical to them.
    v4: dict[str, Any] = {"t": [{"i": bytes.fromhex(k), "p": ps} for k, ps in groups.items()]}
    if token.memo is not None:
        v4["d"] = token.memo
    v4["m"] = token.mint
    v4["u"] = token.unit
    return "cashuB" + _b64encode(cbor2.dumps(v4), pad=False)


def secrets_fingerprint(secrets: Iterable[str]) -> str:
    """sha256 hex of the JSON array of the sorted secrets; see :func:`token_fingerprint`."""
    canonical = json.dumps(sorted(secrets), separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def proof_ids(secrets: Iterable[str]) -> tuple[str, ...]:
    """One id per proof: sha256 hex of its secret. Like the mint's ``Y = hash_to_curve(secret)``
    it names the proof whatever token carries it, at a fraction of the cost."""
    return tuple(hashlib.sha256(s.encode()).hexdigest() for s in secrets)


def token_fingerprint(token: Token) -> str:
    """Identity of a token's proofs, independent of encoding, order, memo and mint URL form."""
    return secrets_fingerprint(p.secret for p in token.proofs)


def find_tokens(text: str) -> list[str]:
    """All ``cashuA…``/``cashuB…`` strings embedded in free text, in order (unvalidated)."""
    return _TOKEN_IN_TEXT.findall(text)
