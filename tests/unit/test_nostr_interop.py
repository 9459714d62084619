"""Interop with an independent implementation: the ``nostr-sdk`` package (rust-nostr bindings)."""

from __future__ import annotations

import json

import pytest

from nodeprov.protocol import nip04, nip19, nip44, nip59
from nodeprov.protocol.nostr_event import Event, EventTemplate, Keys, sign_event, verify_event

ns = pytest.importorskip("nostr_sdk")

TEXTS = ["hi", 'héllo 🦄 "q" \\ \n\t', "x" * 65000, '{"type": "balance", "id": "1"}']


def _theirs(keys: Keys) -> ns.Keys:
    return ns.Keys.parse(keys.secret_key)


def test_keys_and_npub_match() -> None:
    ours = Keys.generate()
    theirs = _theirs(ours)
    assert theirs.public_key().to_hex() == ours.public_key
    assert theirs.public_key().to_bech32() == ours.npub == nip19.npub_encode(ours.public_key)
    assert theirs.secret_key().to_bech32() == ours.nsec
    assert ns.PublicKey.parse(ours.npub).to_hex() == ours.public_key


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_nip44_both_ways(text: str) -> None:
    alice, bob = Keys.generate(), Keys.generate()
    ck = nip44.get_conversation_key(alice.secret_key, bob.public_key)
    ours = nip44.encrypt(text, ck)
    assert ns.nip44_decrypt(_theirs(bob).secret_key(), _theirs(alice).public_key(), ours) == text
    theirs = ns.nip44_encrypt(
        _theirs(bob).secret_key(), _theirs(alice).public_key(), text, ns.Nip44Version.V2
    )
    assert nip44.decrypt(theirs, ck) == text


def test_nip44_largest_standard_message_decrypts_in_nostr_sdk() -> None:
    # nostr-sdk refuses to *encrypt* plaintexts above ~65000 bytes but decrypts up to 65535.
    alice, bob = Keys.generate(), Keys.generate()
    ck = nip44.get_conversation_key(alice.secret_key, bob.public_key)
    text = "x" * nip44.MAX_STANDARD_PLAINTEXT
    got = ns.nip44_decrypt(
        _theirs(bob).secret_key(), _theirs(alice).public_key(), nip44.encrypt(text, ck)
    )
    assert got == text


def test_nip44_extended_is_not_understood_by_nostr_sdk() -> None:
    # The spec copy's extended prefix is not in deployed implementations: keep it opt-in.
    alice, bob = Keys.generate(), Keys.generate()
    ck = nip44.get_conversation_key(alice.secret_key, bob.public_key)
    payload = nip44.encrypt("a" * 65536, ck, max_plaintext=nip44.MAX_EXTENDED_PLAINTEXT)
    with pytest.raises(Exception):  # noqa: B017 - whatever nostr-sdk raises
        ns.nip44_decrypt(_theirs(bob).secret_key(), _theirs(alice).public_key(), payload)
    with pytest.raises(Exception):  # noqa: B017
        ns.nip44_encrypt(
            _theirs(alice).secret_key(), _theirs(bob).public_key(), "a" * 65536, ns.Nip44Version.V2
        )


@pytest.mark.parametrize("text", TEXTS[:2], ids=range(2))
def test_nip04_both_ways(text: str) -> None:
    alice, bob = Keys.generate(), Keys.generate()
    ours = nip04.encrypt(text, alice.secret_key, bob.public_key)
    assert ns.nip04_decrypt(_theirs(bob).secret_key(), _theirs(alice).public_key(), ours) == text
    theirs = ns.nip04_encrypt(_theirs(bob).secret_key(), _theirs(alice).public_key(), text)
    assert nip04.decrypt(theirs, alice.secret_key, bob.public_key) == text


def test_our_events_verify_in_nostr_sdk() -> None:
    keys = Keys.generate()
    tags = (("p", "a" * 64, "wss://r"), ("e", "b" * 64), ("t", 'é "x"'))
    for content in ("", "plain", 'line\nbreak "q" \\ \x01 🦄'):
        event = sign_event(EventTemplate(1, tags, content), keys.secret_key)
        theirs = ns.Event.from_json(event.to_json())
        assert theirs.verify()
        assert theirs.id().to_hex() == event.id


def test_their_events_verify_here() -> None:
    keys = ns.Keys.generate()
    builder = ns.EventBuilder(ns.Kind(1), 'hello "there"\n🦄').tags(
        [ns.Tag.parse(["t", "nostr"]), ns.Tag.parse(["p", "a" * 64])]
    )
    theirs = builder.finalize(keys)
    ours = Event.from_json(theirs.as_json())
    assert verify_event(ours)
    assert ours.id == theirs.id().to_hex()


def test_our_gift_wrap_unwrapped_by_nostr_sdk() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    wraps = nip59.build_dm(alice, bob.public_key, "hola 🦄", reply_to="c" * 64)
    for wrap, keys in zip(wraps, (bob, alice), strict=True):
        theirs = ns.Event.from_json(wrap.to_json())
        assert theirs.verify()
        unwrapped = ns.UnwrappedGift.from_gift_wrap(_theirs(keys), theirs)
        assert unwrapped.sender().to_hex() == alice.public_key
        rumor = json.loads(unwrapped.rumor().as_json())
        assert rumor["kind"] == 14 and rumor["content"] == "hola 🦄"
        assert rumor["tags"] == [["p", bob.public_key], ["e", "c" * 64]]


def test_their_gift_wrap_unwrapped_by_us() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    theirs = ns.nip17_make_private_msg(_theirs(alice), _theirs(bob).public_key(), "¿qué tal? 🦄")
    wrap = Event.from_json(theirs.as_json())
    assert wrap.kind == 1059 and wrap.tag_values("p") == [bob.public_key]
    rumor, sender = nip59.unwrap(wrap, bob)
    assert sender == alice.public_key
    assert rumor.kind == 14 and rumor.content == "¿qué tal? 🦄"
    assert ("p", bob.public_key) in rumor.tags


def test_their_10050_is_read() -> None:
    keys = ns.Keys.generate()
    ours_template = EventTemplate(10050, (("relay", "wss://inbox.example"),), "")
    event = sign_event(ours_template, keys.secret_key().to_hex())
    urls = [u.__str__() for u in ns.nip17_extract_relay_list(ns.Event.from_json(event.to_json()))]
    assert [u.rstrip("/") for u in urls] == nip59.dm_relays_from_10050(event)
