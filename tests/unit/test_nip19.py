"""NIP-19 bech32 entities, with the examples from the NIP."""

from __future__ import annotations

import pytest

from nodeprov.errors import InvalidKey
from nodeprov.protocol import nip19

NPUB = "npub10elfcs4fr0l0r8af98jlmgdh9c8tcxjvz9qkw038js35mp4dma8qzvjptg"
NPUB_HEX = "7e7e9c42a91bfef19fa929e5fda1b72e0ebc1a4c1141673e2794234d86addf4e"
NSEC = "nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5"
NSEC_HEX = "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
NPROFILE = (
    "nprofile1qqsrhuxx8l9ex335q7he0f09aej04zpazpl0ne2cgukyawd24mayt8gpp4mhxue69uhhytnc9e3k7mgp"
    "z4mhxue69uhkg6nzv9ejuumpv34kytnrdaksjlyr9p"
)
PROFILE_HEX = "3bf0c63fcb93463407af97a5e5ee64fa883d107ef9e558472c4eb9aaaefa459d"


def test_npub_example() -> None:
    assert nip19.npub_decode(NPUB) == NPUB_HEX
    assert nip19.npub_encode(NPUB_HEX) == NPUB


def test_second_npub_example() -> None:
    npub = "npub180cvv07tjdrrgpa0j7j7tmnyl2yr6yr7l8j4s3evf6u64th6gkwsyjh6w6"
    assert nip19.npub_encode(PROFILE_HEX) == npub
    assert nip19.npub_decode(npub.upper()) == PROFILE_HEX


def test_nsec_example() -> None:
    assert nip19.nsec_decode(NSEC) == NSEC_HEX
    assert nip19.nsec_encode(NSEC_HEX) == NSEC


def test_note_round_trip() -> None:
    note = nip19.note_encode(NPUB_HEX)
    assert note.startswith("note1")
    assert nip19.note_decode(note) == NPUB_HEX


def test_nprofile_example() -> None:
    profile = nip19.nprofile_decode(NPROFILE)
    assert profile.pubkey == PROFILE_HEX
    assert profile.relays == ("wss://r.x.com", "wss://djbas.sadkb.com")
    assert nip19.nprofile_encode(profile) == NPROFILE
    assert len(NPROFILE) > 90  # beyond BIP-173's limit, which NIP-19 lifts


def test_nprofile_ignores_unknown_tlv() -> None:
    data = bytes([0, 32]) + bytes.fromhex(PROFILE_HEX) + bytes([9, 2, 1, 2])
    text = nip19.bech32_encode("nprofile", data)
    assert nip19.nprofile_decode(text) == nip19.Profile(PROFILE_HEX)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (NPUB[:-1] + ("q" if NPUB[-1] != "q" else "p"), "checksum"),
        (NPUB.replace("npub1", "nsec1"), "checksum"),
        (NPUB[:10] + NPUB[10:].upper(), "mixes"),
        ("npub1b", "short"),
        (NPUB + "q" * 5000, "longer"),
        (NPUB.replace("0", "o"), "alphabet"),
        ("", "empty"),
    ],
)
def test_bad_bech32(text: str, message: str) -> None:
    with pytest.raises(InvalidKey, match=message):
        nip19.npub_decode(text)


def test_wrong_prefix_and_length() -> None:
    with pytest.raises(InvalidKey, match="expected a 'npub'"):
        nip19.npub_decode(NSEC)
    with pytest.raises(InvalidKey, match="32 bytes"):
        nip19.npub_decode(nip19.bech32_encode("npub", bytes(31)))
    with pytest.raises(InvalidKey, match="hex"):
        nip19.npub_encode("XYZ")
    with pytest.raises(InvalidKey, match="no public key"):
        nip19.nprofile_decode(nip19.bech32_encode("nprofile", bytes([1, 1, 65])))
    with pytest.raises(InvalidKey, match="truncated"):
        nip19.nprofile_decode(nip19.bech32_encode("nprofile", bytes([0, 32, 1])))


def test_decode_pubkey_accepts_all_forms() -> None:
    assert nip19.decode_pubkey(NPUB) == NPUB_HEX
    assert nip19.decode_pubkey("nostr:" + NPUB) == NPUB_HEX
    assert nip19.decode_pubkey(NPUB_HEX.upper()) == NPUB_HEX
    assert nip19.decode_pubkey(NPROFILE) == PROFILE_HEX
    with pytest.raises(InvalidKey):
        nip19.decode_pubkey("alice")
