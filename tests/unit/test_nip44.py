"""NIP-44 v2 against the official vectors and the extended-length table of the spec copy.

Vectors: tests/vectors/nip44.vectors.json, copied from /work/shared/vectors/nip44.vectors.json
(upstream: github.com/paulmillr/nip44, checksum published in NIP-44).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nodeprov.errors import DecryptionError, InvalidKey
from nodeprov.protocol import nip44
from nodeprov.protocol.nostr_event import public_key_of

VECTORS_PATH = Path(__file__).parent.parent / "vectors" / "nip44.vectors.json"
VECTORS_SHA256 = "269ed0f69e4c192512cc779e78c555090cebc7c785b609e338a62afc3ce25040"
V2: dict[str, Any] = json.loads(VECTORS_PATH.read_text())["v2"]
EXT = nip44.MAX_EXTENDED_PLAINTEXT


def test_vector_file_is_the_published_one() -> None:
    assert hashlib.sha256(VECTORS_PATH.read_bytes()).hexdigest() == VECTORS_SHA256


@pytest.mark.parametrize("v", V2["valid"]["get_conversation_key"])
def test_get_conversation_key(v: dict[str, str]) -> None:
    assert nip44.get_conversation_key(v["sec1"], v["pub2"]).hex() == v["conversation_key"]


@pytest.mark.parametrize("v", V2["valid"]["get_message_keys"]["keys"])
def test_get_message_keys(v: dict[str, str]) -> None:
    ck = bytes.fromhex(V2["valid"]["get_message_keys"]["conversation_key"])
    chacha_key, chacha_nonce, hmac_key = nip44.get_message_keys(ck, bytes.fromhex(v["nonce"]))
    assert chacha_key.hex() == v["chacha_key"]
    assert chacha_nonce.hex() == v["chacha_nonce"]
    assert hmac_key.hex() == v["hmac_key"]


@pytest.mark.parametrize(("unpadded", "padded"), V2["valid"]["calc_padded_len"])
def test_calc_padded_len(unpadded: int, padded: int) -> None:
    assert nip44.calc_padded_len(unpadded) == padded


@pytest.mark.parametrize("v", V2["valid"]["encrypt_decrypt"])
def test_encrypt_decrypt(v: dict[str, str]) -> None:
    ck1 = nip44.get_conversation_key(v["sec1"], public_key_of(v["sec2"]))
    assert ck1.hex() == v["conversation_key"]
    assert nip44.encrypt(v["plaintext"], ck1, bytes.fromhex(v["nonce"])) == v["payload"]
    ck2 = nip44.get_conversation_key(v["sec2"], public_key_of(v["sec1"]))
    assert ck2 == ck1
    assert nip44.decrypt(v["payload"], ck2) == v["plaintext"]


@pytest.mark.parametrize("v", V2["valid"]["encrypt_decrypt_long_msg"])
def test_encrypt_decrypt_long_msg(v: dict[str, Any]) -> None:
    plaintext = v["pattern"] * v["repeat"]
    assert hashlib.sha256(plaintext.encode()).hexdigest() == v["plaintext_sha256"]
    ck, nonce = bytes.fromhex(v["conversation_key"]), bytes.fromhex(v["nonce"])
    payload = nip44.encrypt(plaintext, ck, nonce)
    assert hashlib.sha256(payload.encode()).hexdigest() == v["payload_sha256"]
    assert nip44.decrypt(payload, ck) == plaintext


@pytest.mark.parametrize("length", V2["invalid"]["encrypt_msg_lengths"])
def test_invalid_encrypt_msg_lengths(length: int) -> None:
    # The official vectors treat 0 and >= 65536 as invalid: our default (standard) limit.
    with pytest.raises(ValueError):
        nip44.encrypt("a" * length, bytes(32), bytes(32))


@pytest.mark.parametrize("v", V2["invalid"]["get_conversation_key"], ids=lambda v: v["note"])
def test_invalid_get_conversation_key(v: dict[str, str]) -> None:
    with pytest.raises(InvalidKey):
        nip44.get_conversation_key(v["sec1"], v["pub2"])


@pytest.mark.parametrize("limit", [nip44.MAX_STANDARD_PLAINTEXT, EXT])
@pytest.mark.parametrize("v", V2["invalid"]["decrypt"], ids=lambda v: v["note"])
def test_invalid_decrypt(v: dict[str, str], limit: int) -> None:
    with pytest.raises(DecryptionError):
        nip44.decrypt(v["payload"], bytes.fromhex(v["conversation_key"]), max_plaintext=limit)


# --- extended length prefix (spec copy, specs/nips/44.md, "Extended length prefix") -----------

SPEC_CK = bytes.fromhex("c41c775356fd92eadc63ff5a0dc1da211b268cbea22316767095b2871ea1412d")
SPEC_NONCE = bytes.fromhex("00" * 31 + "01")
EXTENDED_TABLE = [
    (
        65535,
        2,
        65536,
        "6e1bebca6a8229364a162a72ef064826c4cd7457bf54f190ef782bd9deff3e42",
        "6d8c2810d1e870fbaa1f0a0937126cca837a15f9260e27060c331d70a3c0bc84",
    ),
    (
        65536,
        6,
        65536,
        "bf718b6f653bebc184e1479f1935b8da974d701b893afcf49e701f3e2f9f9c5a",
        "b7b4edb36ba92e267d322d56d9aebc22e7fa96ff52e3c12adc07f07a43cbc616",
    ),
    (
        65537,
        6,
        81920,
        "008ffc88d3c96a9f307524eb361e47c5222a887fc45fa0c1fb8d429c5c23b430",
        "eeb7c7c5373894ea2c1547cfd3ccb15d5a0b2d619da852e5c79df792dcc9e435",
    ),
]


@pytest.mark.parametrize(("n", "prefix", "padded_len", "pt_sha", "payload_sha"), EXTENDED_TABLE)
def test_extended_prefix_table(
    n: int, prefix: int, padded_len: int, pt_sha: str, payload_sha: str
) -> None:
    plaintext = "a" * n
    assert hashlib.sha256(plaintext.encode()).hexdigest() == pt_sha
    assert nip44.calc_padded_len(n) == padded_len
    padded = nip44.pad(plaintext, EXT)
    assert len(padded) == prefix + padded_len
    if prefix == 6:
        assert padded[:6] == b"\x00\x00" + n.to_bytes(4, "big")
    payload = nip44.encrypt(plaintext, SPEC_CK, SPEC_NONCE, max_plaintext=EXT)
    assert hashlib.sha256(payload.encode()).hexdigest() == payload_sha
    assert nip44.decrypt(payload, SPEC_CK, max_plaintext=EXT) == plaintext


def test_extended_payload_refused_by_default() -> None:
    payload = nip44.encrypt("a" * 65536, SPEC_CK, SPEC_NONCE, max_plaintext=EXT)
    with pytest.raises(DecryptionError):
        nip44.decrypt(payload, SPEC_CK)
    with pytest.raises(DecryptionError, match="accepted 70000"):
        nip44.decrypt(
            nip44.encrypt("a" * 70001, SPEC_CK, max_plaintext=EXT), SPEC_CK, max_plaintext=70000
        )


def _forge(padded: bytes) -> str:
    """Encrypt arbitrary padded bytes with a correct MAC, to test unpad's checks."""
    ck, nonce = SPEC_CK, SPEC_NONCE
    chacha_key, chacha_nonce, hmac_key = nip44.get_message_keys(ck, nonce)
    ct = nip44._chacha20(chacha_key, chacha_nonce, padded)
    mac = nip44._hmac_aad(hmac_key, ct, nonce)
    return base64.b64encode(b"\x02" + nonce + ct + mac).decode()


def test_extended_prefix_for_short_length_is_invalid() -> None:
    padded = b"\x00\x00" + (100).to_bytes(4, "big") + b"a" * 100 + bytes(128 - 100)
    with pytest.raises(DecryptionError, match="padding"):
        nip44.decrypt(_forge(padded), SPEC_CK, max_plaintext=EXT)


def test_zero_length_is_invalid() -> None:
    with pytest.raises(DecryptionError, match="padding"):
        nip44.decrypt(_forge(bytes(2 + 32)), SPEC_CK, max_plaintext=EXT)


def test_oversized_payload_rejected_before_decoding() -> None:
    with pytest.raises(DecryptionError, match="payload size"):
        nip44.decrypt("A" * (nip44.max_payload_chars() + 4), SPEC_CK)


def test_round_trip_random_nonce_and_unicode() -> None:
    text = 'héllo 🦄 \x00 "quoted"'
    a, b = nip44.encrypt(text, SPEC_CK), nip44.encrypt(text, SPEC_CK)
    assert a != b
    assert nip44.decrypt(a, SPEC_CK) == nip44.decrypt(b, SPEC_CK) == text


def test_tampered_payload_fails_mac() -> None:
    raw = bytearray(base64.b64decode(nip44.encrypt("secret", SPEC_CK)))
    raw[40] ^= 1
    with pytest.raises(DecryptionError, match="MAC"):
        nip44.decrypt(base64.b64encode(bytes(raw)).decode(), SPEC_CK)


def test_wrong_key_sizes() -> None:
    with pytest.raises(ValueError):
        nip44.get_message_keys(bytes(31), bytes(32))
    with pytest.raises(ValueError):
        nip44.get_message_keys(bytes(32), bytes(33))
