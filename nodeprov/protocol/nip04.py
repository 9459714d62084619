"""NIP-04 (legacy) encrypted direct messages, kind 4; sans I/O.

AES-256-CBC with PKCS#7 padding, keyed by the unhashed ECDH x coordinate; the content is
``base64(ciphertext) + "?iv=" + base64(iv)``. Kept for older clients; NIP-17 is preferred.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nodeprov.errors import DecryptionError, InvalidEvent
from nodeprov.protocol.nip44 import shared_x
from nodeprov.protocol.nostr_event import Event, EventTemplate, Keys, sign_event, verify_event

KIND = 4
# As large as the largest relay frame the node reads (16 MiB): a DM is never dropped for size
# before its sender can be told it is too large.
MAX_CONTENT_CHARS = 16 * 1024 * 1024


def encrypt(plaintext: str, secret_key: str, public_key: str, iv: bytes | None = None) -> str:
    """AES-256-CBC/PKCS#7 with key = ECDH x(secret, public); returns ``ct_b64?iv=iv_b64``."""
    iv = os.urandom(16) if iv is None else iv
    if len(iv) != 16:
        raise ValueError("NIP-04 iv must be 16 bytes")
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    enc = Cipher(algorithms.AES(shared_x(secret_key, public_key)), modes.CBC(iv)).encryptor()
    ciphertext = enc.update(padded) + enc.finalize()
    return base64.b64encode(ciphertext).decode() + "?iv=" + base64.b64encode(iv).decode()


def decrypt(content: str, secret_key: str, public_key: str) -> str:
    """Inverse of :func:`encrypt` (AES-256-CBC/PKCS#7); raises DecryptionError on any defect."""
    if not isinstance(content, str) or len(content) > MAX_CONTENT_CHARS:
        raise DecryptionError("NIP-04 content must be a string of reasonable size")
    body, sep, iv_b64 = content.partition("?iv=")
    if not sep:
        raise DecryptionError("NIP-04 content has no '?iv=' part")
    try:
        ciphertext = base64.b64decode(body, validate=True)
        iv = base64.b64decode(iv_b64, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("NIP-04 content is not valid base64") from None
    if len(iv) != 16 or not ciphertext or len(ciphertext) % 16:
        raise DecryptionError("NIP-04 iv or ciphertext has the wrong length")
    dec = Cipher(algorithms.AES(shared_x(secret_key, public_key)), modes.CBC(iv)).decryptor()
    padded = dec.update(ciphertext) + dec.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        raw = unpadder.update(padded) + unpadder.finalize()
        return raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise DecryptionError("NIP-04 message does not decrypt (wrong key or corrupted)") from None


def build_dm(
    sender: Keys,
    recipient_pubkey: str,
    text: str,
    reply_to: str | None = None,
    created_at: int | None = None,
) -> Event:
    """A signed kind-4 event to ``recipient_pubkey`` (``p`` tag; ``e`` tag when replying)."""
    tags: list[tuple[str, ...]] = [("p", recipient_pubkey)]
    if reply_to is not None:
        tags.append(("e", reply_to))
    content = encrypt(text, sender.secret_key, recipient_pubkey)
    return sign_event(EventTemplate(KIND, tuple(tags), content), sender.secret_key, created_at)


def open_dm(event: Event, keys: Keys) -> tuple[str, str]:
    """Verify a kind-4 event and decrypt it; returns ``(text, counterparty_pubkey)``."""
    if event.kind != KIND:
        raise InvalidEvent(f"expected a kind {KIND} event, got kind {event.kind}")
    if not verify_event(event):
        raise InvalidEvent("event id or signature is invalid")
    recipients = event.tag_values("p")
    if event.pubkey == keys.public_key:
        if not recipients:
            raise InvalidEvent("kind 4 event has no 'p' tag")
        peer = recipients[0]  # our own sent message: the peer is the recipient
    elif keys.public_key in recipients:
        peer = event.pubkey
    else:
        raise InvalidEvent("kind 4 event is not addressed to us")
    return decrypt(event.content, keys.secret_key, peer), peer
