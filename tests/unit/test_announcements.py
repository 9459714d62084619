"""Announcement event templates (kinds 0, 10050, 38421, 31990) and listing parsing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from nodeprov.errors import InvalidEvent
from nodeprov.protocol import announcements as ann
from nodeprov.protocol.nostr_event import Keys, sign_event, verify_event

LISTING = ann.NodeListing(
    name="nodeprov test",
    about="LLMs for ecash",
    version="0.1.0",
    http_url="https://llm.example",
    onion_url="http://abcdefgh.onion",
    relays=("wss://relay.example",),
    mints=("https://mint.example", "https://mint2.example"),
    units=("sat", "msat"),
    models=(
        ann.ModelListing("gpt-x", {"request": 1, "input_per_1m": 500, "output_per_1m": 1500}),
        ann.ModelListing("emb", {"input_per_1m": 20}, {"context_length": 8192}),
    ),
    identifier="npub1test",
    capabilities=("openai_http", "x_cashu", "nip17_dm"),
)


def test_profile() -> None:
    t = ann.profile_event(LISTING)
    assert t.kind == 0 and t.tags == ()
    assert json.loads(t.content) == {
        "name": "nodeprov test",
        "about": "LLMs for ecash",
        "website": "https://llm.example",
    }


def test_dm_relays() -> None:
    t = ann.dm_relays_event(["wss://a.example", "wss://b.example", "wss://a.example"])
    assert (t.kind, t.content) == (10050, "")
    assert t.tags == (("relay", "wss://a.example"), ("relay", "wss://b.example"))
    with pytest.raises(InvalidEvent):
        ann.dm_relays_event(["https://not-a-relay"])


def test_listing_event_and_parse_round_trip() -> None:
    t = ann.listing_event(LISTING)
    assert t.kind == 38421
    assert t.tags == (
        ("d", "npub1test"),
        ("u", "https://llm.example"),
        ("u", "http://abcdefgh.onion"),
        ("mint", "https://mint.example"),
        ("mint", "https://mint2.example"),
        ("version", "0.1.0"),
    )
    content = json.loads(t.content)
    assert content["models"][0] == {
        "id": "gpt-x",
        "pricing": {"request": 1, "input_per_1m": 500, "output_per_1m": 1500},
    }
    assert content["models"][1]["context_length"] == 8192
    assert content["units"] == ["sat", "msat"]
    assert content["capabilities"] == ["openai_http", "x_cashu", "nip17_dm"]
    event = sign_event(t, Keys.generate().secret_key)
    assert verify_event(event)
    # Relays travel in kind 10050, not in the listing.
    assert ann.parse_listing(event) == replace(LISTING, relays=())


def test_handler_event() -> None:
    t = ann.handler_event(LISTING, identifier="nodeprov")
    assert t.kind == 31990
    assert t.tags == (("d", "nodeprov"), ("k", "14"), ("k", "4"), ("k", "5050"))
    content = json.loads(t.content)
    assert content["website"] == "https://llm.example"
    assert [m["id"] for m in content["models"]] == ["gpt-x", "emb"]
    parsed = ann.parse_listing(sign_event(t, Keys.generate().secret_key))
    assert parsed.models == LISTING.models and parsed.http_url == LISTING.http_url
    assert parsed.capabilities == LISTING.capabilities


def test_identifier_required() -> None:
    with pytest.raises(ValueError, match="identifier"):
        ann.listing_event(replace(LISTING, identifier=""))


def test_content_hash_tracks_changes() -> None:
    h = ann.content_hash(LISTING)
    assert h == ann.content_hash(replace(LISTING))
    changed_price = replace(
        LISTING, models=(ann.ModelListing("gpt-x", {"request": 2}), LISTING.models[1])
    )
    for other in (
        changed_price,
        replace(LISTING, mints=("https://mint.example",)),
        replace(LISTING, onion_url=None),
        replace(LISTING, relays=()),
        replace(LISTING, version="0.2.0"),
        replace(LISTING, capabilities=("openai_http",)),
    ):
        assert ann.content_hash(other) != h


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "name"),
        ({"http_url": "ftp://x"}, "http_url"),
        ({"mints": ("mint.example",)}, "mint"),
        ({"relays": ("https://r",)}, "relay"),
        ({"models": ("gpt",)}, "ModelListing"),
        ({"capabilities": ("x_cashu", 5)}, "capabilities"),
    ],
)
def test_listing_validation(change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidEvent, match=message):
        replace(LISTING, **change)  # type: ignore[arg-type]


def test_model_validation() -> None:
    with pytest.raises(InvalidEvent, match="integer"):
        ann.ModelListing("m", {"request": 1.5})  # type: ignore[dict-item]
    with pytest.raises(InvalidEvent, match="negative"):
        ann.ModelListing("m", {"request": -1})
    with pytest.raises(InvalidEvent, match="id"):
        ann.ModelListing("", {})


def test_parse_listing_errors() -> None:
    keys = Keys.generate()
    from nodeprov.protocol.nostr_event import EventTemplate

    def ev(kind: int, content: str) -> object:
        return sign_event(EventTemplate(kind, (("d", "x"),), content), keys.secret_key)

    with pytest.raises(InvalidEvent, match="kind"):
        ann.parse_listing(ev(1, "{}"))  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="JSON"):
        ann.parse_listing(ev(38421, "nope"))  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="models"):
        ann.parse_listing(ev(38421, '{"name": "n", "models": {}}'))  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="name"):
        ann.parse_listing(ev(38421, '{"models": []}'))  # type: ignore[arg-type]


def test_a_listing_without_capabilities_parses_as_none_listed() -> None:
    """Listings from nodes that predate capabilities (no field) still parse."""
    t = ann.listing_event(replace(LISTING, capabilities=()))
    content = json.loads(t.content)
    del content["capabilities"]
    old = sign_event(replace(t, content=json.dumps(content)), Keys.generate().secret_key)
    assert ann.parse_listing(old).capabilities == ()
