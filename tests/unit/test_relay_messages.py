"""NIP-01/42 message building and parsing (pure): well-formed frames parse, malformed ones raise."""

from __future__ import annotations

import contextlib
import json
import random
from typing import Any

import pytest

from nodeprov.nostr import messages as m
from nodeprov.nostr.relay_pool import backoff_delay, http_url
from tests.support.nostr_keys import Keys, verify_event

KEYS = Keys(bytes(range(1, 33)))
EVENT = KEYS.event("hello ✓", created_at=1_700_000_000)


def test_keys_helper_signs_verifiable_events() -> None:
    assert verify_event(EVENT)
    assert not verify_event({**EVENT, "content": "tampered"})
    assert not verify_event({**EVENT, "sig": "00" * 64})


def test_client_messages() -> None:
    assert json.loads(m.req_message("s1", [{"kinds": [1]}, m.Filter(authors=["ab"])])) == [
        "REQ",
        "s1",
        {"kinds": [1]},
        {"authors": ["ab"]},
    ]
    assert m.close_message("s1") == '["CLOSE","s1"]'
    assert json.loads(m.event_message(EVENT)) == ["EVENT", EVENT]
    assert "✓" in m.event_message(EVENT)  # UTF-8 kept, as relays measure it
    assert json.loads(m.auth_message(EVENT))[0] == "AUTH"
    with pytest.raises(m.MessageError):
        m.req_message("", [{}])


def test_filter_to_json() -> None:
    f = m.Filter(kinds=[4, 1059], tags={"p": ["aa"]}, since=5, limit=10)
    assert f.to_json() == {"kinds": [4, 1059], "#p": ["aa"], "since": 5, "limit": 10}
    assert m.Filter().to_json() == {}
    with pytest.raises(m.MessageError):
        m.Filter(tags={"pp": ["x"]}).to_json()


def test_auth_template() -> None:
    t = m.auth_template("wss://r.example/", "chal", 123)
    assert t == {
        "kind": 22242,
        "created_at": 123,
        "tags": [["relay", "wss://r.example/"], ["challenge", "chal"]],
        "content": "",
    }


def test_resume_filters_moves_since_up_only() -> None:
    filters: list[dict[str, Any]] = [
        {"kinds": [1]},
        {"kinds": [2], "since": 950},
        {"kinds": [3], "since": 10},
    ]
    out = m.resume_filters(filters, 1000, 60)
    assert [f["since"] for f in out] == [940, 950, 940]
    assert "since" not in filters[0]  # the originals stay as given
    assert m.resume_filters(filters, None, 60) == filters


def test_parse_each_relay_message() -> None:
    ev = m.parse_relay_message(json.dumps(["EVENT", "s", EVENT]))
    assert ev == m.RelayEvent("s", EVENT)
    ok = m.parse_relay_message(json.dumps(["OK", EVENT["id"], False, "auth-required: who?"]))
    assert isinstance(ok, m.RelayOk) and not ok.accepted and ok.prefix == "auth-required"
    empty = m.parse_relay_message('["OK", "", false, "invalid: Bad signature"]')
    assert empty == m.RelayOk("", False, "invalid: Bad signature")
    assert m.parse_relay_message(f'["OK","{EVENT["id"]}",true]') == m.RelayOk(EVENT["id"], True, "")
    assert m.parse_relay_message(b'["EOSE","s"]') == m.RelayEose("s")
    closed = m.parse_relay_message('["CLOSED","s","restricted: no"]')
    assert isinstance(closed, m.RelayClosed) and closed.prefix == "restricted"
    assert m.parse_relay_message('["NOTICE","hi"]') == m.RelayNotice("hi")
    assert m.parse_relay_message('["AUTH","c"]') == m.RelayAuth("c")


def test_reason_prefix() -> None:
    assert m.reason_prefix("duplicate: have it") == "duplicate"
    assert m.reason_prefix("") == ""
    assert m.reason_prefix("280 characters: should be enough") == ""


BAD_FRAMES: list[Any] = [
    "not json",
    b"\xff\xfe",
    "{}",
    "[]",
    "[1, 2]",
    '["WHAT", 1]',
    '["EVENT", "s"]',
    '["EVENT", 1, {}]',
    '["EOSE"]',
    '["EOSE", 5]',
    '["OK", "abc", true, ""]',
    '["OK", "", "yes", ""]',
    '["OK", ""]',
    '["AUTH"]',
    '["CLOSED", "s", 7]',
]


@pytest.mark.parametrize("raw", BAD_FRAMES)
def test_malformed_frames_raise_message_error(raw: Any) -> None:
    with pytest.raises(m.MessageError):
        m.parse_relay_message(raw)


@pytest.mark.parametrize(
    "change",
    [
        {"id": "A" * 64},
        {"pubkey": "ab"},
        {"sig": None},
        {"created_at": "1"},
        {"created_at": True},
        {"kind": -1},
        {"kind": 70000},
        {"tags": [["p", 1]]},
        {"tags": "x"},
        {"content": None},
    ],
)
def test_malformed_events_raise(change: dict[str, Any]) -> None:
    with pytest.raises(m.MessageError):
        m.parse_relay_message(json.dumps(["EVENT", "s", {**EVENT, **change}]))


def test_random_garbage_never_crashes() -> None:
    rng = random.Random(7)
    pieces = ['"EVENT"', '"OK"', '"EOSE"', '"AUTH"', "1", "null", "{}", "[]", '"x"', "true"]
    for _ in range(2000):
        raw = "[" + ",".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) + "]"
        with contextlib.suppress(m.MessageError):
            m.parse_relay_message(raw)


def test_relay_limits_from_nip11() -> None:
    assert m.RelayLimits.from_nip11({"name": "no limitation section"}) == m.RelayLimits()
    assert m.RelayLimits.from_nip11("junk") == m.RelayLimits()
    lim = m.RelayLimits.from_nip11(
        {
            "limitation": {
                "max_message_length": 600,
                "max_subscriptions": "many",
                "max_content_length": 10,
                "auth_required": True,
            }
        }
    )
    assert lim == m.RelayLimits(600, None, 10, True)
    assert lim.refuse_event(EVENT) is None
    reason = lim.refuse_event({**EVENT, "content": "x" * 11})
    assert reason is not None and "max_content_length 10" in reason
    big = m.RelayLimits(max_message_length=100).refuse_event(EVENT)
    assert big is not None and "max_message_length 100" in big


def test_backoff_and_nip11_url() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 60.0, rng) for a in range(12)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(30.0 <= d <= 60.0 for d in delays[8:])
    assert http_url("wss://relay.example.com") == "https://relay.example.com/"
    assert http_url("ws://127.0.0.1:7000/path") == "http://127.0.0.1:7000/path"
