"""NIP-01 events: ids, BIP-340 signatures, strict parsing."""

from __future__ import annotations

import json

import pytest

from nodeprov.errors import InvalidEvent, InvalidKey
from nodeprov.protocol.nostr_event import (
    Event,
    EventTemplate,
    Keys,
    UnsignedEvent,
    event_id,
    parse_verified,
    public_key_of,
    serialize_for_id,
    sign_event,
    verify_event,
)

# The NIP-59 example rumor: an id computed by another implementation.
RUMOR: dict[str, object] = {
    "created_at": 1691518405,
    "content": "Are you going to the party tonight?",
    "tags": [],
    "kind": 1,
    "pubkey": "611df01bfcf85c26ae65453b772d8f1dfd25c264621c0277e1fc1518686faef9",
    "id": "9dd003c6d3b73b74a85a9ab099469ce251653a7af76f523671ab828acd2a0ef9",
}
AUTHOR_SECRET = "0beebd062ec8735f4243466049d7747ef5d6594ee838de147f8aab842b15e273"


def test_event_id_of_spec_rumor() -> None:
    r = RUMOR
    eid = event_id(str(r["pubkey"]), 1691518405, 1, (), str(r["content"]))
    assert eid == r["id"]
    assert UnsignedEvent.from_dict(r).id == r["id"]
    assert public_key_of(AUTHOR_SECRET) == r["pubkey"]


def test_serialization_escapes_exactly() -> None:
    raw = serialize_for_id("a" * 64, 1, 1, (("t", "é"),), 'l\n"\\\r\t\b\f🦄\x01')
    assert raw == (
        b'[0,"'
        + b"a" * 64
        + b'",1,1,[["t","\xc3\xa9"]],"l\\n\\"\\\\\\r\\t\\b\\f'
        + "🦄".encode()
        + b'\\u0001"]'
    )


def test_sign_and_verify() -> None:
    keys = Keys.generate()
    event = sign_event(EventTemplate(1, (("p", "b" * 64),), "hi"), keys.secret_key, 1700000000)
    assert event.pubkey == keys.public_key and event.created_at == 1700000000
    assert verify_event(event)
    assert Event.from_json(event.to_json()) == event
    assert parse_verified(event.to_json(), kinds=[1]) == event
    forged = Event.from_dict({**event.to_dict(), "content": "bye"})
    assert not verify_event(forged)
    wrong_sig = Event.from_dict({**event.to_dict(), "sig": "0" * 128})
    assert not verify_event(wrong_sig)
    with pytest.raises(InvalidEvent, match="signature"):
        parse_verified(forged.to_json())
    with pytest.raises(InvalidEvent, match="kind"):
        parse_verified(event.to_json(), kinds=[4])


def test_sign_unsigned_requires_matching_key() -> None:
    keys = Keys.generate()
    unsigned = UnsignedEvent(keys.public_key, 1, 1, (), "")
    assert verify_event(sign_event(unsigned, keys.secret_key))
    with pytest.raises(InvalidKey):
        sign_event(unsigned, Keys.generate().secret_key)


def test_keys() -> None:
    keys = Keys.parse("nsec1vl029mgpspedva04g90vltkh6fvh240zqtv9k0t9af8935ke9laqsnlfe5")
    assert keys.secret_key == "67dea2ed018072d675f5415ecfaed7d2597555e202d85b3d65ea4e58d2d92ffa"
    assert Keys.parse(keys.nsec) == keys
    assert keys.npub.startswith("npub1")
    assert keys.secret_key not in repr(keys)
    for bad in ("00" * 32, "ff" * 32, "abc"):
        with pytest.raises(InvalidKey):
            Keys(bad)


GOOD = {
    "id": "a" * 64,
    "pubkey": "b" * 64,
    "created_at": 1,
    "kind": 1,
    "tags": [["p", "x"]],
    "content": "",
    "sig": "c" * 128,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"id": "A" * 64}, "id"),
        ({"pubkey": "b" * 63}, "pubkey"),
        ({"sig": "c" * 126}, "sig"),
        ({"created_at": "1"}, "created_at"),
        ({"created_at": True}, "created_at"),
        ({"created_at": -1}, "created_at"),
        ({"kind": 70000}, "kind"),
        ({"tags": [["p", 1]]}, "tag"),
        ({"tags": "p"}, "tags"),
        ({"content": None}, "content"),
        ({"content": "\ud800"}, "content"),
    ],
)
def test_event_validation(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        Event.from_dict({**GOOD, **change})


def test_event_from_json_errors() -> None:
    with pytest.raises(InvalidEvent, match="JSON"):
        Event.from_json("{nope")
    with pytest.raises(InvalidEvent, match="object"):
        Event.from_json("[]")
    with pytest.raises(InvalidEvent, match="missing 'sig'"):
        Event.from_json(json.dumps({k: v for k, v in GOOD.items() if k != "sig"}))
    with pytest.raises(InvalidEvent, match="larger"):
        Event.from_json(" " * 1_000_001)


def test_rumor_checks() -> None:
    with pytest.raises(InvalidEvent, match="does not match"):
        UnsignedEvent.from_dict({**RUMOR, "content": "changed"})
    with pytest.raises(InvalidEvent, match="signature"):
        UnsignedEvent.from_dict({**RUMOR, "sig": "c" * 128})
    rumor = UnsignedEvent.from_dict(RUMOR)
    assert UnsignedEvent.from_json(rumor.to_json()) == rumor
