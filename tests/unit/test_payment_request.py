"""NUT-18 payment requests against the vectors in tests/vectors/nut18_payment_requests.json."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeprov.errors import InvalidRequest, InvalidToken
from nodeprov.protocol.cashu_token import Proof, parse_token, serialize_token
from nodeprov.protocol.payment_request import (
    Nut10Option,
    PaymentRequest,
    PaymentRequestPayload,
    Transport,
    build_payment_payload,
    decode_payment_request,
    encode_payment_request,
    parse_payment_payload,
)

HERE = Path(__file__).parent.parent / "vectors"
VECTORS = json.loads((HERE / "nut18_payment_requests.json").read_text())["vectors"]
TOKENS = json.loads((HERE / "nut00_tokens.json").read_text())


def expected_json(vector: dict[str, Any]) -> dict[str, Any]:
    # One upstream vector pairs its JSON with the spec example's encoding; trust the encoding.
    result: dict[str, Any] = vector.get("json_of_encoded", vector["json"])
    return result


def request_from_json(obj: dict[str, Any]) -> PaymentRequest:
    """An independent JSON -> dataclass mapping, so decode is checked field by field."""
    nut10 = obj.get("nut10")
    return PaymentRequest(
        id=obj.get("i"),
        amount=obj.get("a"),
        unit=obj.get("u"),
        single_use=obj.get("s"),
        mints=tuple(obj.get("m", ())),
        description=obj.get("d"),
        transports=tuple(
            Transport(t["t"], t["a"], tuple(tuple(g) for g in t.get("g", ())))
            for t in obj.get("t", ())
        ),
        nut10=None
        if nut10 is None
        else Nut10Option(nut10["k"], nut10["d"], tuple(tuple(x) for x in nut10.get("t", ()))),
    )


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_vector_decodes(vector: dict[str, Any]) -> None:
    assert decode_payment_request(vector["encoded"]) == request_from_json(expected_json(vector))


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v["name"])
def test_vector_round_trip(vector: dict[str, Any]) -> None:
    req = decode_payment_request(vector["encoded"])
    encoded = encode_payment_request(req)
    assert decode_payment_request(encoded) == req
    assert decode_payment_request(encoded.rstrip("=")) == req
    if vector.get("has_cbor_undefined"):
        # These vectors spell an absent transport "g" as CBOR `undefined`; we omit the key, so
        # compare with the vector's CBOR minus exactly those keys (order otherwise preserved).
        body = vector["encoded"][5:]
        raw = cbor2.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        for t in raw["t"]:
            if t.get("g") is cbor2.undefined:
                del t["g"]
        assert encoded == "creqA" + base64.urlsafe_b64encode(cbor2.dumps(raw)).decode()
    else:
        assert encoded == vector["encoded"]


def test_vectors_cover_all_fields() -> None:
    seen = {k for v in VECTORS for k in expected_json(v)}
    assert seen == {"i", "a", "u", "s", "m", "d", "t", "nut10"}


def test_built_request_encodes_like_a_vector() -> None:
    req = PaymentRequest(
        id="7f4a2b39", unit="sat", mints=("https://mint.example.com",), transports=()
    )
    minimal = next(v for v in VECTORS if v["name"].startswith("Minimal"))
    assert encode_payment_request(req) == minimal["encoded"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected creqA prefix"),
        ("creqB" + "A" * 20, "expected creqA prefix"),
        ("creqA", "truncated"),
        (VECTORS[1]["encoded"][:-30], "truncated"),
        ("creqA!!!!", "not base64"),
        ("creqA" + "A" * 70_000, "too large"),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps([1])).decode(), "must be a CBOR map"),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps({"a": 5})).decode(), "no unit"),
        (
            "creqA" + base64.urlsafe_b64encode(cbor2.dumps({"a": True, "u": "sat"})).decode(),
            "amount",
        ),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps({"m": "https://x"})).decode(), "mints"),
        (
            "creqA" + base64.urlsafe_b64encode(cbor2.dumps({"t": [{"t": "post"}]})).decode(),
            "target",
        ),
        (
            "creqA"
            + base64.urlsafe_b64encode(
                cbor2.dumps({"t": [{"t": "nostr", "a": "x", "g": [["n", 17]]}]})
            ).decode(),
            "tags",
        ),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps({"nut10": {"d": "x"}})).decode(), "kind"),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps({"s": "yes"})).decode(), "boolean"),
        ("creqA" + base64.urlsafe_b64encode(cbor2.dumps({}) + b"\x00").decode(), "trailing"),
    ],
)
def test_clear_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        decode_payment_request(text)


@settings(max_examples=300)
@given(st.text() | st.binary().map(lambda b: "creqA" + base64.urlsafe_b64encode(b).decode()))
def test_garbage_only_raises_invalid_request(text: str) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_payment_request(text)


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["i", "a", "u", "s", "m", "d", "t", "g", "k", "nut10"]),
            children,
            max_size=6,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(CBOR_VALUES)
def test_random_structures_only_raise_invalid_request(value: object) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_payment_request("creqA" + base64.urlsafe_b64encode(cbor2.dumps(value)).decode())


# --- PaymentRequestPayload ------------------------------------------------------------------


def payload() -> PaymentRequestPayload:
    token = parse_token(TOKENS["v4"][1]["encoded"])
    return PaymentRequestPayload(
        id="b7a90176", memo="thanks", mint=token.mint, unit=token.unit, proofs=token.proofs
    )


def test_payload_round_trip_and_wire_shape() -> None:
    p = payload()
    text = build_payment_payload(p)
    wire = json.loads(text)
    assert list(wire) == ["id", "memo", "mint", "unit", "proofs"]
    assert wire["proofs"][0] == TOKENS["v4"][1]["token"]["proofs"][0]
    assert parse_payment_payload(text) == p
    assert parse_payment_payload(text.encode()) == p
    assert parse_payment_payload(wire) == p
    assert p.amount == 4


def test_payload_as_token() -> None:
    p = payload()
    token = p.to_token()
    assert token.amount == p.amount and token.memo == "thanks"
    assert parse_token(serialize_token(token)) == token


def test_payload_with_dleq_proof_and_optional_fields_absent() -> None:
    proof = TOKENS["dleq_proof"]
    p = parse_payment_payload({"mint": "https://m/", "unit": "sat", "proofs": [proof]})
    assert p.mint == "https://m" and p.id is None and p.memo is None
    assert p.proofs == (Proof.from_wire(proof),)
    assert p.proofs[0].dleq is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ({"unit": "sat", "proofs": []}, "no mint URL"),
        ({"mint": "https://m", "unit": "sat"}, "'proofs'"),
        ({"mint": "https://m", "unit": "sat", "proofs": []}, "no proofs"),
        ({"mint": "https://m", "proofs": [TOKENS["dleq_proof"]]}, "no unit"),
        ({"mint": "https://m", "unit": "sat", "proofs": [{"amount": 1}]}, "missing"),
        ({"mint": "https://m", "unit": "sat", "id": 5, "proofs": [TOKENS["dleq_proof"]]}, "id"),
    ],
)
def test_payload_errors(data: Any, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        parse_payment_payload(data)


@settings(max_examples=200)
@given(
    st.text()
    | st.recursive(
        st.none() | st.integers() | st.text(),
        lambda c: (
            st.lists(c)
            | st.dictionaries(
                st.sampled_from(["id", "memo", "mint", "unit", "proofs", "amount", "secret", "C"]),
                c,
            )
        ),
        max_leaves=20,
    )
)
def test_payload_garbage_only_raises_invalid_token(data: Any) -> None:
    with contextlib.suppress(InvalidToken):
        parse_payment_payload(data if isinstance(data, str | dict) else json.dumps(data))
