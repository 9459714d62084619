"""The nodeprov/1 DM job protocol: parsing, reply builders, parts."""

from __future__ import annotations

import json
import random

import pytest

from nodeprov.errors import InsufficientBalance, InvalidJobMessage
from nodeprov.protocol import dm_jobs as dj

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _msg(**fields: object) -> str:
    return json.dumps(fields)


def test_parse_each_type() -> None:
    req = dj.parse_client_message(
        _msg(type="request", id="1", endpoint="/v1/chat/completions", body=BODY, cashu=" cashuBx ")
    )
    assert req == dj.JobRequest("1", "/v1/chat/completions", BODY, "cashuBx")
    no_cashu = dj.parse_client_message(
        _msg(type="request", id="1", endpoint="/v1/embeddings", body={})
    )
    assert isinstance(no_cashu, dj.JobRequest) and no_cashu.cashu is None
    assert dj.parse_client_message(_msg(type="deposit", id="d", cashu="cashuA1")) == dj.Deposit(
        "d", "cashuA1"
    )
    assert dj.parse_client_message(_msg(type="balance", id="b")) == dj.BalanceQuery("b")
    assert dj.parse_client_message(_msg(type="withdraw", id="w")) == dj.Withdraw("w", None)
    assert dj.parse_client_message(_msg(type="withdraw", id="w", amount_msat=5)) == dj.Withdraw(
        "w", 5
    )
    assert dj.parse_client_message(_msg(type="info", id="i")) == dj.InfoQuery("i")


@pytest.mark.parametrize(
    "text",
    ["hello", "  what is 2+2?", "{not json", '["type"]', '{"hello": 1}', "42", '"type"', ""],
)
def test_plain_text(text: str) -> None:
    assert dj.parse_client_message(text) == dj.PlainText(text)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"type": "nope", "id": "1"}, "unknown job message type"),
        ({"type": 3, "id": "1"}, "unknown job message type"),
        ({"type": "balance"}, "no 'id'"),
        ({"type": "balance", "id": ""}, "non-empty"),
        ({"type": "balance", "id": 7}, "non-empty string"),
        ({"type": "balance", "id": "x" * 129}, "longer than 128"),
        ({"type": "balance", "id": "a\nb"}, "control"),
        ({"type": "request", "id": "1", "endpoint": "/v1/chat/completions", "body": []}, "body"),
        ({"type": "request", "id": "1", "endpoint": "/v1/chat/completions"}, "body"),
        ({"type": "request", "id": "1", "endpoint": "/admin", "body": {}}, "not allowed"),
        ({"type": "request", "id": "1", "body": {}}, "not allowed"),
        (
            {"type": "request", "id": "1", "endpoint": "/v1/embeddings", "body": {}, "cashu": 5},
            "cashu",
        ),
        ({"type": "deposit", "id": "1"}, "cashu"),
        ({"type": "deposit", "id": "1", "cashu": ["cashuB"]}, "cashu"),
        ({"type": "withdraw", "id": "1", "amount_msat": 0}, "positive integer"),
        ({"type": "withdraw", "id": "1", "amount_msat": -5}, "positive integer"),
        ({"type": "withdraw", "id": "1", "amount_msat": 1.5}, "positive integer"),
        ({"type": "withdraw", "id": "1", "amount_msat": "5"}, "positive integer"),
        ({"type": "withdraw", "id": "1", "amount_msat": True}, "positive integer"),
        ({"type": "withdraw", "id": "1", "amount_msat": 10**20}, "out of range"),
        (
            {
                "type": "request",
                "id": "1",
                "endpoint": "/v1/chat/completions",
                "body": {"model": "m", "messages": [1]},
            },
            r"messages\[0\]",
        ),
        (
            {
                "type": "request",
                "id": "1",
                "endpoint": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": 5}]},
            },
            r"messages\[0\].content",
        ),
    ],
)
def test_invalid_job_messages(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidJobMessage, match=message):
        dj.parse_client_message(json.dumps(fields))


def test_deeply_nested_job_message_is_refused() -> None:
    text = '{"type": "request", "id": "1", "body": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(InvalidJobMessage, match="nested deeper"):
        dj.parse_client_message(text)


def test_id_of_invalid_message_for_error_reply() -> None:
    assert dj.message_id('{"type": "nope", "id": "abc"}') == "abc"
    assert dj.message_id("hello") is None
    assert dj.message_id('{"id": 5}') is None


def test_reply_builders() -> None:
    r = json.loads(dj.response_reply("1", {"ok": True}, 1234, change="cashuB", balance_msat=None))
    assert r == {
        "type": "response",
        "id": "1",
        "status": 200,
        "body": {"ok": True},
        "cost_msat": 1234,
        "change": "cashuB",
        "balance_msat": None,
    }
    e = json.loads(dj.error_reply("2", InsufficientBalance("need more"), payment_request="creqA"))
    assert e["error"] == {
        "type": "insufficient_quota",
        "code": "insufficient_balance",
        "message": "need more",
    }
    assert (e["refund"], e["payment_request"]) == (None, "creqA")
    assert json.loads(dj.balance_reply("3", 5)) == {"type": "balance", "id": "3", "balance_msat": 5}
    w = json.loads(dj.withdrawal_reply("4", "cashuB", 9))
    assert w == {"type": "withdrawal", "id": "4", "cashu": "cashuB", "amount_msat": 9}
    i = json.loads(dj.info_reply("5", [{"id": "m"}], ["https://mint"], ["sat"]))
    assert i == {
        "type": "info",
        "id": "5",
        "models": [{"id": "m"}],
        "mints": ["https://mint"],
        "units": ["sat"],
    }


def test_small_reply_is_not_split() -> None:
    reply = dj.balance_reply("1", 5)
    assert dj.split_parts(reply, 1000) == [reply]


@pytest.mark.parametrize("max_bytes", [120, 200, 1000, 4096])
def test_split_and_join_with_escaping(max_bytes: int) -> None:
    rng = random.Random(max_bytes)
    alphabet = 'ab"\\\n\t\x01é🦄€ '
    text = "".join(rng.choice(alphabet) for _ in range(5000))
    reply = dj.response_reply("job-1", {"text": text}, 10)
    parts = dj.split_parts(reply, max_bytes)
    assert len(parts) > 1
    for k, part in enumerate(parts, 1):
        assert len(part.encode("utf-8")) <= max_bytes
        obj = json.loads(part)
        assert (obj["type"], obj["id"], obj["part"], obj["of"]) == ("part", "job-1", k, len(parts))
    shuffled = parts[:]
    rng.shuffle(shuffled)
    assert dj.join_parts(shuffled) == reply
    assert json.loads(dj.join_parts(parts))["body"]["text"] == text


def test_split_part_count_crosses_digit_boundary() -> None:
    reply = dj.response_reply("x", {"t": "a" * 4500}, 1)
    parts = dj.split_parts(reply, 90)
    assert len(parts) >= 100
    assert all(len(p.encode()) <= 90 for p in parts)
    assert dj.join_parts(parts) == reply


def test_split_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        dj.split_parts(dj.response_reply("x", {"t": "a" * 100}, 1), 50)


def test_join_errors() -> None:
    parts = dj.split_parts(dj.response_reply("x", {"t": "a" * 500}, 1), 150)
    with pytest.raises(InvalidJobMessage, match="parts"):
        dj.join_parts(parts[:-1])
    other = dj.split_parts(dj.response_reply("y", {"t": "a" * 500}, 1), 150)
    with pytest.raises(InvalidJobMessage, match="different"):
        dj.join_parts([parts[0], *other[1:]])
    with pytest.raises(InvalidJobMessage):
        dj.join_parts([])
    with pytest.raises(InvalidJobMessage):
        dj.join_parts(["hello"])
    with pytest.raises(InvalidJobMessage):
        dj.parse_part('{"type": "part", "id": "x", "part": 0, "of": 1, "data": ""}')
    assert dj.parse_part(dj.balance_reply("1", 1)) is None
