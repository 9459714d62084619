"""NIP-19 bech32 entities: ``npub``, ``nsec``, ``note`` and the TLV ``nprofile``, sans I/O.

Bech32 (BIP-173, not bech32m) is implemented here because NIP-19 strings may exceed BIP-173's
90-character limit (an ``nprofile`` with relays does); NIP-19 suggests 5000 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeprov.errors import InvalidKey

MAX_BECH32_CHARS = 5000
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHARSET_REV = {c: i for i, c in enumerate(_CHARSET)}
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_HEX_CHARS = frozenset("0123456789abcdef")


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            if (top >> i) & 1:
                chk ^= _GEN[i]
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: bytes | list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out: list[int] = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad:
        if bits:
            out.append((acc << (tobits - bits)) & maxv)
    elif bits >= frombits or (acc << (tobits - bits)) & maxv:
        raise InvalidKey("bech32 data has invalid padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Encode bytes as BIP-173 bech32 (checksum constant 1) under the human-readable part."""
    words = _convertbits(data, 8, 5, pad=True)
    values = _hrp_expand(hrp) + words
    polymod = _polymod([*values, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[w] for w in words + checksum)


def bech32_decode(text: str) -> tuple[str, bytes]:
    """Decode a BIP-173 bech32 string (up to 5000 chars) into ``(hrp, bytes)``; raise InvalidKey."""
    if not isinstance(text, str) or not text:
        raise InvalidKey("bech32 string is empty")
    if len(text) > MAX_BECH32_CHARS:
        raise InvalidKey(f"bech32 string is longer than {MAX_BECH32_CHARS} characters")
    if text.lower() != text and text.upper() != text:
        raise InvalidKey("bech32 string mixes upper and lower case")
    text = text.lower()
    pos = text.rfind("1")
    if pos < 1 or pos + 7 > len(text):
        raise InvalidKey("bech32 string has no separator or is too short")
    hrp, body = text[:pos], text[pos + 1 :]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise InvalidKey("bech32 prefix has invalid characters")
    try:
        words = [_CHARSET_REV[c] for c in body]
    except KeyError:
        raise InvalidKey("bech32 string has characters outside the bech32 alphabet") from None
    if _polymod(_hrp_expand(hrp) + words) != 1:
        raise InvalidKey("bech32 checksum is wrong (typo or truncated string?)")
    return hrp, bytes(_convertbits(words[:-6], 5, 8, pad=False))


def _encode32(hrp: str, hex_value: str, what: str) -> str:
    if not isinstance(hex_value, str) or len(hex_value) != 64 or not set(hex_value) <= _HEX_CHARS:
        raise InvalidKey(f"{what} must be 32 bytes of lowercase hex")
    return bech32_encode(hrp, bytes.fromhex(hex_value))


def _decode32(text: str, hrp: str) -> str:
    got, data = bech32_decode(text)
    if got != hrp:
        raise InvalidKey(f"expected a '{hrp}' string, got '{got}'")
    if len(data) != 32:
        raise InvalidKey(f"'{hrp}' must carry 32 bytes, got {len(data)}")
    return data.hex()


def npub_encode(pubkey_hex: str) -> str:
    """Hex x-only public key -> ``npub1…``."""
    return _encode32("npub", pubkey_hex, "public key")


def npub_decode(npub: str) -> str:
    """``npub1…`` -> hex public key."""
    return _decode32(npub, "npub")


def nsec_encode(secret_hex: str) -> str:
    """Hex secret key -> ``nsec1…``."""
    return _encode32("nsec", secret_hex, "secret key")


def nsec_decode(nsec: str) -> str:
    """``nsec1…`` -> hex secret key."""
    return _decode32(nsec, "nsec")


def note_encode(event_id_hex: str) -> str:
    """Hex event id -> ``note1…``."""
    return _encode32("note", event_id_hex, "event id")


def note_decode(note: str) -> str:
    """``note1…`` -> hex event id."""
    return _decode32(note, "note")


@dataclass(frozen=True, slots=True)
class Profile:
    """An ``nprofile``: a hex public key and relay hints."""

    pubkey: str
    relays: tuple[str, ...] = ()


def nprofile_encode(profile: Profile) -> str:
    """Profile -> ``nprofile1…`` (TLV: 0 = pubkey, 1 = relay, each ASCII)."""
    pk = profile.pubkey
    if not isinstance(pk, str) or len(pk) != 64 or not set(pk) <= _HEX_CHARS:
        raise InvalidKey("public key must be 32 bytes of lowercase hex")
    tlv = bytearray([0, 32]) + bytes.fromhex(pk)
    for relay in profile.relays:
        try:
            raw = relay.encode("ascii")
        except (UnicodeEncodeError, AttributeError):
            raise InvalidKey("nprofile relay must be an ASCII string") from None
        if not 0 < len(raw) <= 255:
            raise InvalidKey("nprofile relay must be 1 to 255 bytes")
        tlv += bytes([1, len(raw)]) + raw
    return bech32_encode("nprofile", bytes(tlv))


def nprofile_decode(text: str) -> Profile:
    """``nprofile1…`` -> Profile; unknown TLV types are ignored, as NIP-19 asks."""
    hrp, data = bech32_decode(text)
    if hrp != "nprofile":
        raise InvalidKey(f"expected an 'nprofile' string, got '{hrp}'")
    pubkey: str | None = None
    relays: list[str] = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise InvalidKey("nprofile TLV is truncated")
        t, length = data[i], data[i + 1]
        value = data[i + 2 : i + 2 + length]
        if len(value) != length:
            raise InvalidKey("nprofile TLV is truncated")
        i += 2 + length
        if t == 0:
            if length != 32:
                raise InvalidKey("nprofile public key must be 32 bytes")
            pubkey = pubkey or value.hex()
        elif t == 1:
            try:
                relays.append(value.decode("ascii"))
            except UnicodeDecodeError:
                raise InvalidKey("nprofile relay is not ASCII") from None
    if pubkey is None:
        raise InvalidKey("nprofile has no public key")
    return Profile(pubkey=pubkey, relays=tuple(relays))


def decode_pubkey(text: str) -> str:
    """Accept a hex public key, ``npub1…`` or ``nprofile1…`` and return lowercase hex."""
    if not isinstance(text, str):
        raise InvalidKey("public key must be a string")
    text = text.strip()
    if text.lower().startswith("nostr:"):
        text = text[6:]
    low = text.lower()
    if low.startswith("npub1"):
        return npub_decode(text)
    if low.startswith("nprofile1"):
        return nprofile_decode(text).pubkey
    if len(text) == 64 and set(low) <= _HEX_CHARS:
        return low
    raise InvalidKey("public key must be 64 hex characters, an npub or an nprofile")
