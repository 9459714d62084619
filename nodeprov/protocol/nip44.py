"""NIP-44 version 2 encrypted payloads, sans I/O.

secp256k1 ECDH (unhashed x) -> HKDF-SHA256 extract (salt ``nip44-v2``) = conversation key;
HKDF-expand(nonce) -> ChaCha20 key/nonce + HMAC key; power-of-two padding; ChaCha20 (RFC 8439,
counter 0); HMAC-SHA256 over ``nonce || ciphertext``; base64 of ``02 || nonce || ct || mac``.

Plaintexts of 65536 bytes or more use the extended 6-byte length prefix (``00 00`` + u32) of
the spec copy in ``specs/nips/44.md``. Some deployed implementations (nostr-sdk, and the official
vector file) cap plaintexts at 65535 bytes while others (nostr-tools 2.x) send the extended form,
so this module's default is the standard cap and callers opt in through ``max_plaintext``
(``nip59`` does: it accepts both and sends the standard form whenever it fits).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from coincurve import PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from nodeprov.errors import DecryptionError, InvalidKey
from nodeprov.protocol.nostr_event import secret_key_bytes

VERSION = 2
MIN_PLAINTEXT = 1
MAX_STANDARD_PLAINTEXT = 65535  # the classic u16 limit every deployed client accepts
MAX_EXTENDED_PLAINTEXT = 2**32 - 1
EXTENDED_PREFIX_THRESHOLD = 65536
_SALT = b"nip44-v2"
_MIN_PAYLOAD_CHARS = 132
_MIN_DATA_BYTES = 99


def _check_limit(max_plaintext: int) -> None:
    if not MIN_PLAINTEXT <= max_plaintext <= MAX_EXTENDED_PLAINTEXT:
        raise ValueError(f"max_plaintext must be between 1 and {MAX_EXTENDED_PLAINTEXT}")


def shared_x(secret_key: str, public_key: str) -> bytes:
    """secp256k1 ECDH: the unhashed 32-byte x coordinate of ``secret * lift_x(public_key)``."""
    secret = secret_key_bytes(secret_key)
    try:
        raw = bytes.fromhex(public_key)
    except (ValueError, TypeError):
        raise InvalidKey("public key must be 32 bytes of hex") from None
    if len(raw) != 32:
        raise InvalidKey("public key must be 32 bytes of hex")
    try:
        point = PublicKey(b"\x02" + raw)
    except ValueError:
        raise InvalidKey("public key is not a valid secp256k1 point") from None
    return bytes(point.multiply(secret).format(compressed=True))[1:]


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract with SHA-256 (RFC 5869): ``HMAC-SHA256(salt, ikm)``."""
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand with SHA-256 (RFC 5869) to ``length`` bytes."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def get_conversation_key(secret_key: str, public_key: str) -> bytes:
    """NIP-44 v2 conversation key: HKDF-extract(salt="nip44-v2", IKM=ECDH x); symmetric in A/B."""
    return hkdf_extract(_SALT, shared_x(secret_key, public_key))


def get_message_keys(conversation_key: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    """HKDF-expand(conversation_key, info=nonce, 76) -> (chacha_key, chacha_nonce, hmac_key)."""
    if len(conversation_key) != 32:
        raise ValueError("conversation key must be 32 bytes")
    if len(nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    keys = hkdf_expand(conversation_key, nonce, 76)
    return keys[0:32], keys[32:44], keys[44:76]


def calc_padded_len(unpadded_len: int) -> int:
    """NIP-44 padded length: 32 minimum, then chunks of max(32, next_power_of_two / 8)."""
    if unpadded_len < 1:
        raise ValueError("unpadded length must be at least 1")
    if unpadded_len <= 32:
        return 32
    next_power = 1 << (unpadded_len - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((unpadded_len - 1) // chunk + 1)


def pad(plaintext: str, max_plaintext: int = MAX_STANDARD_PLAINTEXT) -> bytes:
    """UTF-8 encode, prefix the length (u16 BE, or 00 00 + u32 BE from 65536) and zero-pad."""
    _check_limit(max_plaintext)
    raw = plaintext.encode("utf-8")
    n = len(raw)
    if not MIN_PLAINTEXT <= n <= max_plaintext:
        raise ValueError(f"plaintext must be 1 to {max_plaintext} bytes of UTF-8, got {n}")
    if n >= EXTENDED_PREFIX_THRESHOLD:
        prefix = b"\x00\x00" + n.to_bytes(4, "big")
    else:
        prefix = n.to_bytes(2, "big")
    return prefix + raw + bytes(calc_padded_len(n) - n)


def unpad(padded: bytes, max_plaintext: int = MAX_STANDARD_PLAINTEXT) -> str:
    """Inverse of :func:`pad`: check the prefix, the exact padded size and the UTF-8."""
    first_two = int.from_bytes(padded[0:2], "big")
    if first_two == 0:
        if max_plaintext < EXTENDED_PREFIX_THRESHOLD:
            raise DecryptionError("invalid padding (extended length prefix not accepted)")
        n = int.from_bytes(padded[2:6], "big")
        if n < EXTENDED_PREFIX_THRESHOLD:
            raise DecryptionError("invalid padding (extended prefix for a short message)")
        prefix_len = 6
    else:
        n, prefix_len = first_two, 2
    if n > max_plaintext:
        raise DecryptionError(f"plaintext is larger than the accepted {max_plaintext} bytes")
    raw = padded[prefix_len : prefix_len + n]
    if len(raw) != n or len(padded) != prefix_len + calc_padded_len(n):
        raise DecryptionError("invalid padding")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionError("plaintext is not valid UTF-8") from None


def _chacha20(key: bytes, nonce12: bytes, data: bytes) -> bytes:
    # cryptography's ChaCha20 takes a 16-byte nonce: 4-byte little-endian counter || 12-byte nonce.
    cipher = Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce12), mode=None)
    return cipher.encryptor().update(data)


def _hmac_aad(key: bytes, message: bytes, aad: bytes) -> bytes:
    if len(aad) != 32:
        raise ValueError("AAD must be 32 bytes")
    return hmac.new(key, aad + message, hashlib.sha256).digest()


def encrypt(
    plaintext: str,
    conversation_key: bytes,
    nonce: bytes | None = None,
    *,
    max_plaintext: int = MAX_STANDARD_PLAINTEXT,
) -> str:
    """NIP-44 v2 encrypt (ChaCha20 + HMAC-SHA256, padded) to a base64 payload; random nonce."""
    nonce = os.urandom(32) if nonce is None else nonce
    chacha_key, chacha_nonce, hmac_key = get_message_keys(conversation_key, nonce)
    ciphertext = _chacha20(chacha_key, chacha_nonce, pad(plaintext, max_plaintext))
    mac = _hmac_aad(hmac_key, ciphertext, nonce)
    return base64.b64encode(bytes([VERSION]) + nonce + ciphertext + mac).decode("ascii")


def max_payload_chars(max_plaintext: int = MAX_STANDARD_PLAINTEXT) -> int:
    """Length of the largest base64 payload whose plaintext fits ``max_plaintext`` bytes."""
    _check_limit(max_plaintext)
    prefix = 6 if max_plaintext >= EXTENDED_PREFIX_THRESHOLD else 2
    raw = 1 + 32 + prefix + calc_padded_len(max_plaintext) + 32
    return 4 * ((raw + 2) // 3)


def decode_payload(
    payload: str, max_plaintext: int = MAX_STANDARD_PLAINTEXT
) -> tuple[bytes, bytes, bytes]:
    """Split a payload into (nonce, ciphertext, mac), checking version and sizes before decoding."""
    if not isinstance(payload, str):
        raise DecryptionError("payload must be a string")
    if not payload or payload[0] == "#":
        raise DecryptionError("unknown encryption version (not base64 NIP-44)")
    if len(payload) < _MIN_PAYLOAD_CHARS:
        raise DecryptionError(f"invalid payload size: {len(payload)} characters")
    if len(payload) > max_payload_chars(max_plaintext):
        raise DecryptionError(f"invalid payload size: over {max_plaintext} bytes of plaintext")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("invalid base64") from None
    if len(data) < _MIN_DATA_BYTES:
        raise DecryptionError(f"invalid data size: {len(data)} bytes")
    if data[0] != VERSION:
        raise DecryptionError(f"unknown encryption version {data[0]}")
    return data[1:33], data[33:-32], data[-32:]


def decrypt(
    payload: str,
    conversation_key: bytes,
    *,
    max_plaintext: int = MAX_STANDARD_PLAINTEXT,
) -> str:
    """NIP-44 v2 decrypt: check HMAC-SHA256 (constant time), ChaCha20-decrypt, unpad."""
    nonce, ciphertext, mac = decode_payload(payload, max_plaintext)
    chacha_key, chacha_nonce, hmac_key = get_message_keys(conversation_key, nonce)
    if not hmac.compare_digest(_hmac_aad(hmac_key, ciphertext, nonce), mac):
        raise DecryptionError("invalid MAC")
    return unpad(_chacha20(chacha_key, chacha_nonce, ciphertext), max_plaintext)
