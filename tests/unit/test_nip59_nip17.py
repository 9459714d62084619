"""NIP-59 gift wraps and NIP-17 DMs: the examples from the NIPs, round trips, and rejections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nodeprov.errors import DecryptionError, InvalidEvent
from nodeprov.protocol import nip04, nip44, nip59
from nodeprov.protocol.nostr_event import (
    Event,
    EventTemplate,
    Keys,
    UnsignedEvent,
    sign_event,
    verify_event,
)

# From NIP-59 "An Example" (specs/nips/59.md). The spec's JSON has a trailing comma; fixed here.
NIP59_WRAP = {
    "content": (
        "AhC3Qj/QsKJFWuf6xroiYip+2yK95qPwJjVvFujhzSguJWb/6TlPpBW0CGFwfufCs2Zyb0JeuLmZhNlnqecAAalC4ZCugB+I"
        "9ViA5pxLyFfQjs1lcE6KdX3euCHBLAnE9GL/+IzdV9vZnfJH6atVjvBkNPNzxU+OLCHO/DAPmzmMVx0SR63frRTCz6Cuth"
        "40D+VzluKu1/Fg2Q1LSst65DE7o2efTtZ4Z9j15rQAOZfE9jwMCQZt27rBBK3yVwqVEriFpg2mHXc1DDwHhDADO8eiyOTWF"
        "1ghDds/DxhMcjkIi/o+FS3gG1dG7gJHu3KkGK5UXpmgyFKt+421m5o++RMD/BylS3iazS1S93IzTLeGfMCk+7IKxuSCO06k"
        "1+DaasJJe8RE4/rmismUvwrHu/HDutZWkvOAhd4z4khZo7bJLtiCzZCZ74lZcjOB4CYtuAX2ZGpc4I1iOKkvwTuQy9BWYpk"
        "zGg3ZoSWRD6ty7U+KN+fTTmIS4CelhBTT15QVqD02JxfLF7nA6sg3UlYgtiGw61oH68lSbx16P3vwSeQQpEB5JbhofW7t9T"
        "LZIbIW/ODnI4hpwj8didtk7IMBI3Ra3uUP7ya6vptkd9TwQkd/7cOFaSJmU+BIsLpOXbirJACMn+URoDXhuEtiO6xirNtrP"
        "N8jYqpwvMUm5lMMVzGT3kMMVNBqgbj8Ln8VmqouK0DR+gRyNb8fHT0BFPwsHxDskFk5yhe5c/2VUUoKCGe0kfCcX/EsHbJL"
        "UUtlHXmTqaOJpmQnW1tZ/siPwKRl6oEsIJWTUYxPQmrM2fUpYZCuAo/29lTLHiHMlTbarFOd6J/ybIbICy2gRRH/LFSryty"
        "3Cnf6aae+A9uizFBUdCwTwffc3vCBae802+R92OL78bbqHKPbSZOXNC+6ybqziezwG+OPWHx1Qk39RYaF0aFsM4uZWrFic9"
        "7WwVrH5i+/Nsf/OtwWiuH0gV/SqvN1hnkxCTF/+XNn/laWKmS3e7wFzBsG8+qwqwmO9aVbDVMhOmeUXRMkxcj4QreQkHxLk"
        "Cx97euZpC7xhvYnCHarHTDeD6nVK+xzbPNtzeGzNpYoiMqxZ9bBJwMaHnEoI944Vxoodf51cMIIwpTmmRvAzI1QgrfnOLOU"
        "S7uUjQ/IZ1Qa3lY08Nqm9MAGxZ2Ou6R0/Z5z30ha/Q71q6meAs3uHQcpSuRaQeV29IASmye2A2Nif+lmbhV7w8hjFYoaLCR"
        "sdchiVyNjOEM4VmxUhX4VEvw6KoCAZ/XvO2eBF/SyNU3Of4SO"
    ),
    "kind": 1059,
    "created_at": 1703021488,
    "pubkey": "18b1a75918f1f2c90c23da616bce317d36e348bcf5f7ba55e75949319210c87c",
    "id": "5c005f3ccf01950aa8d131203248544fb1e41a0d698e846bd419cec3890903ac",
    "sig": (
        "35fabdae4634eb630880a1896a886e40fd6ea8a60958e30b89b33a93e6235df750097b04f9e13053764251b8bc5dd7"
        "e8e0794a3426a90b6bcc7e5ff660f54259"
    ),
    "tags": [["p", "166bf3765ebd1fc55decfe395beff2ea3b2a4e0a8946e7eb578512b555737c99"]],
}
AUTHOR = Keys("0beebd062ec8735f4243466049d7747ef5d6594ee838de147f8aab842b15e273")
RECIPIENT = Keys("e108399bd8424357a710b606ae0c13166d853d327e47a6e5e038197346bdbf45")
EPHEMERAL = Keys("4f02eac59266002db5801adc5270700ca69d5b8f761d8732fab2fbf233c90cbd")

# The two gift wraps of the NIP-17 example, copied from specs/nips/17.md ("Examples").
NIP17_EXAMPLES = Path(__file__).parent.parent / "vectors" / "nip17_examples.json"


def test_nip59_example_keys_match() -> None:
    assert EPHEMERAL.public_key == NIP59_WRAP["pubkey"]
    assert RECIPIENT.public_key == NIP59_WRAP["tags"][0][1]  # type: ignore[index]


def test_nip59_example_unwraps() -> None:
    wrap = Event.from_dict(NIP59_WRAP)
    assert verify_event(wrap)
    rumor, sender = nip59.unwrap(wrap, RECIPIENT)
    assert sender == AUTHOR.public_key
    assert rumor.id == "9dd003c6d3b73b74a85a9ab099469ce251653a7af76f523671ab828acd2a0ef9"
    assert (rumor.kind, rumor.created_at) == (1, 1691518405)
    assert rumor.content == "Are you going to the party tonight?"
    # The intermediate seal is the one printed in the spec.
    ck = nip44.get_conversation_key(RECIPIENT.secret_key, wrap.pubkey)
    seal = Event.from_json(nip44.decrypt(wrap.content, ck))
    assert seal.id == "28a87d7c074d94a58e9e89bb3e9e4e813e2189f285d797b1c56069d36f59eaa7"
    assert (seal.kind, seal.tags, seal.created_at) == (13, (), 1703015180)


def test_nip17_example_both_wraps() -> None:
    ex = json.loads(NIP17_EXAMPLES.read_text())
    sender, receiver = Keys.parse(ex["sender_nsec"]), Keys.parse(ex["receiver_nsec"])
    to_receiver = Event.from_dict(ex["gift_wrap_to_receiver"])
    to_sender = Event.from_dict(ex["gift_wrap_to_sender"])
    for wrap, keys in ((to_receiver, receiver), (to_sender, sender)):
        assert verify_event(wrap)
        assert wrap.tag_values("p") == [keys.public_key]
        rumor, who = nip59.unwrap(wrap, keys)
        assert who == sender.public_key
        assert (rumor.kind, rumor.content) == (14, ex["message"])
        assert rumor.tags == (("p", receiver.public_key),)


def test_build_dm_round_trip_with_self_copy() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    wraps = nip59.build_dm(
        alice, bob.public_key, "hi bob", reply_to="e" * 64, created_at=1_700_000_000
    )
    assert len(wraps) == 2
    assert [w.tag_values("p") for w in wraps] == [[bob.public_key], [alice.public_key]]
    for wrap, keys in zip(wraps, (bob, alice), strict=True):
        assert wrap.kind == 1059 and wrap.pubkey not in (alice.public_key, bob.public_key)
        assert 1_700_000_000 - nip59.TWO_DAYS < wrap.created_at <= 1_700_000_000
        rumor, sender = nip59.unwrap(wrap, keys)
        assert sender == alice.public_key
        assert rumor.kind == 14 and rumor.content == "hi bob"
        assert rumor.created_at == 1_700_000_000
        assert rumor.tags == (("p", bob.public_key), ("e", "e" * 64))
    only = nip59.build_dm(alice, bob.public_key, "x", self_copy=False)
    assert len(only) == 1
    assert wraps[0].pubkey != wraps[1].pubkey  # fresh ephemeral key per wrap


def test_unwrap_for_someone_else_fails() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    (wrap,) = nip59.build_dm(alice, bob.public_key, "x", self_copy=False)
    with pytest.raises(DecryptionError):
        nip59.unwrap(wrap, Keys.generate())


def _wrap_seal(seal: Event, recipient: Keys) -> Event:
    return nip59.gift_wrap(seal, recipient.public_key)


def test_unwrap_rejects_impersonation() -> None:
    mallory, alice, bob = Keys.generate(), Keys.generate(), Keys.generate()
    rumor = nip59.make_rumor(alice.public_key, 14, "I am alice", (("p", bob.public_key),))
    ck = nip44.get_conversation_key(mallory.secret_key, bob.public_key)
    seal = sign_event(EventTemplate(13, (), nip44.encrypt(rumor.to_json(), ck)), mallory.secret_key)
    with pytest.raises(InvalidEvent, match="impersonation"):
        nip59.unwrap(_wrap_seal(seal, bob), bob)
    with pytest.raises(InvalidEvent, match="sealing author"):
        nip59.seal(rumor, mallory, bob.public_key)


def test_unwrap_rejects_bad_signatures_and_kinds() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    rumor = nip59.build_dm_rumor(alice.public_key, bob.public_key, "x")
    seal = nip59.seal(rumor, alice, bob.public_key)
    # Flip one bit of the last byte: the signature always changes (setting it to a fixed value
    # left it unchanged whenever the byte already had that value).
    bad_sig = seal.sig[:-2] + f"{int(seal.sig[-2:], 16) ^ 1:02x}"
    assert bad_sig != seal.sig
    bad_seal = Event.from_dict({**seal.to_dict(), "sig": bad_sig})
    with pytest.raises(InvalidEvent, match="seal id or signature"):
        nip59.unwrap(_wrap_seal(bad_seal, bob), bob)
    not_seal = sign_event(EventTemplate(1, (), seal.content), alice.secret_key)
    with pytest.raises(InvalidEvent, match="not a kind 13"):
        nip59.unwrap(_wrap_seal(not_seal, bob), bob)
    wrap = _wrap_seal(seal, bob)
    with pytest.raises(InvalidEvent, match="gift wrap id or signature"):
        nip59.unwrap(Event.from_dict({**wrap.to_dict(), "created_at": 5}), bob)
    with pytest.raises(InvalidEvent, match="not a gift wrap"):
        nip59.unwrap(seal, bob)


def test_unwrap_rejects_signed_rumor_and_garbage_seal() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    signed = sign_event(EventTemplate(14, (), "x"), alice.secret_key)
    ck = nip44.get_conversation_key(alice.secret_key, bob.public_key)
    seal = sign_event(EventTemplate(13, (), nip44.encrypt(signed.to_json(), ck)), alice.secret_key)
    with pytest.raises(InvalidEvent, match="signature"):
        nip59.unwrap(_wrap_seal(seal, bob), bob)
    eph = Keys.generate()
    ck2 = nip44.get_conversation_key(eph.secret_key, bob.public_key)
    junk = sign_event(
        EventTemplate(1059, (("p", bob.public_key),), nip44.encrypt("{}", ck2)), eph.secret_key
    )
    with pytest.raises(InvalidEvent, match="valid seal"):
        nip59.unwrap(junk, bob)


def test_ephemeral_gift_wrap_kind() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    seal = nip59.seal(nip59.make_rumor(alice.public_key, 14, "x"), alice, bob.public_key)
    wrap = nip59.gift_wrap(seal, bob.public_key, kind=21059, relay_hint="wss://r.example")
    assert wrap.kind == 21059 and wrap.tags == (("p", bob.public_key, "wss://r.example"),)
    assert nip59.unwrap(wrap, bob).rumor.content == "x"


def test_size_limits() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    base = nip59.build_dm_rumor(alice.public_key, bob.public_key, "", created_at=1)
    room = nip59.MAX_RUMOR_JSON_BYTES - len(base.to_json().encode())
    fits = nip59.build_dm_rumor(alice.public_key, bob.public_key, "a" * room, created_at=1)
    assert len(fits.to_json().encode()) == nip59.MAX_RUMOR_JSON_BYTES
    assert nip59.unwrap(nip59.wrap(fits, alice, bob.public_key), bob).rumor == fits
    too_big = nip59.build_dm_rumor(alice.public_key, bob.public_key, "a" * 50000, created_at=1)
    std = nip44.MAX_STANDARD_PLAINTEXT
    with pytest.raises(InvalidEvent, match="too large"):
        nip59.wrap(too_big, alice, bob.public_key, max_plaintext=std)
    # By default a seal over 65535 bytes takes the extended prefix, and unwrap accepts it.
    big = nip59.wrap(too_big, alice, bob.public_key)
    assert nip59.unwrap(big, bob).rumor == too_big
    with pytest.raises(DecryptionError):
        nip59.unwrap(big, bob, max_plaintext=std)


def _layer_prefixes(wrap: Event, bob: Keys) -> tuple[bytes, bytes]:
    """The first two plaintext bytes of the wrap and of the seal (00 00 = extended prefix)."""

    def first_two(payload: str, key: bytes) -> bytes:
        nonce, ciphertext, _ = nip44.decode_payload(payload, nip44.MAX_EXTENDED_PLAINTEXT)
        chacha_key, chacha_nonce, _ = nip44.get_message_keys(key, nonce)
        return nip44._chacha20(chacha_key, chacha_nonce, ciphertext)[:2]

    ext = nip44.MAX_EXTENDED_PLAINTEXT
    wrap_key = nip44.get_conversation_key(bob.secret_key, wrap.pubkey)
    sealed = Event.from_json(nip44.decrypt(wrap.content, wrap_key, max_plaintext=ext))
    seal_key = nip44.get_conversation_key(bob.secret_key, sealed.pubkey)
    return first_two(wrap.content, wrap_key), first_two(sealed.content, seal_key)


def test_standard_encoding_whenever_it_fits() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    small = nip59.build_dm(alice, bob.public_key, "a" * 30_000, self_copy=False)[0]
    assert b"\x00\x00" not in _layer_prefixes(small, bob)
    # 45 KB of text: the seal (~45 KB) fits the u16 prefix, the wrap around it (~80 KB) does not.
    mid = nip59.build_dm(alice, bob.public_key, "a" * 45_000, self_copy=False)[0]
    wrap_prefix, seal_prefix = _layer_prefixes(mid, bob)
    assert wrap_prefix == b"\x00\x00" and seal_prefix != b"\x00\x00"


def test_dm_relays_from_10050() -> None:
    keys = Keys.generate()
    tags = (
        ("relay", "wss://a.example"),
        ("relay", "https://no"),
        ("relay", "wss://a.example"),
        ("r", "wss://x"),
        ("relay", "ws://b.example"),
    )
    event = sign_event(EventTemplate(10050, tags, ""), keys.secret_key)
    assert nip59.dm_relays_from_10050(event) == ["wss://a.example", "ws://b.example"]
    with pytest.raises(InvalidEvent):
        nip59.dm_relays_from_10050(sign_event(EventTemplate(1, (), ""), keys.secret_key))


def test_rumor_json_round_trip() -> None:
    rumor = UnsignedEvent("a" * 64, 1, 14, (("p", "b" * 64),), "x")
    assert json.loads(rumor.to_json())["id"] == rumor.id
    assert UnsignedEvent.from_json(rumor.to_json()) == rumor


def test_nip04_round_trip_and_events() -> None:
    alice, bob = Keys.generate(), Keys.generate()
    content = nip04.encrypt("héllo", alice.secret_key, bob.public_key)
    assert "?iv=" in content
    assert nip04.decrypt(content, bob.secret_key, alice.public_key) == "héllo"
    event = nip04.build_dm(alice, bob.public_key, "hi", reply_to="e" * 64)
    assert event.kind == 4 and event.tags == (("p", bob.public_key), ("e", "e" * 64))
    assert nip04.open_dm(event, bob) == ("hi", alice.public_key)
    assert nip04.open_dm(event, alice) == ("hi", bob.public_key)
    with pytest.raises(InvalidEvent, match="not addressed"):
        nip04.open_dm(event, Keys.generate())
    for bad in ("nope", "AAAA?iv=AAAA", content.replace("?iv=", "?iv=AA")):
        with pytest.raises(DecryptionError):
            nip04.decrypt(bad, bob.secret_key, alice.public_key)
    # Fixed keys and iv: with random ones, a wrong key decrypts to valid padding and UTF-8
    # about once in ten million runs.
    fixed = nip04.encrypt("héllo", AUTHOR.secret_key, RECIPIENT.public_key, iv=bytes(16))
    assert nip04.decrypt(fixed, RECIPIENT.secret_key, AUTHOR.public_key) == "héllo"
    with pytest.raises(DecryptionError):
        nip04.decrypt(fixed, EPHEMERAL.secret_key, AUTHOR.public_key)
