"""NIP-98 verification (nodeprov.protocol.nip98): every check, passing and failing, bytes in.

The NIP's own example header is a vector: its signature is valid, and it names the URL with
the tag ``url`` (an older spelling than the ``u`` the NIP's text requires), so it passes the
checks up to ``u`` and fails that one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pytest

from nodeprov.protocol import nip98
from nodeprov.protocol.nip98 import Nip98Rejected, request_urls, verify
from nodeprov.protocol.nostr_event import EventTemplate, Keys, sign_event

NOW = 1_780_000_000
URL = "https://node.example/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
KEYS = Keys("0c" * 32)

# From NIP-98's text ("Example HTTP Authorization header").
NIP_HEADER = (
    "eyJpZCI6ImZlOTY0ZTc1ODkwMzM2MGYyOGQ4NDI0ZDA5MmRhODQ5NGVkMjA3Y2JhODIzMTEwYmUzYTU3ZGZlNGI1Nzg3"
    "MzQiLCJwdWJrZXkiOiI2M2ZlNjMxOGRjNTg1ODNjZmUxNjgxMGY4NmRkMDllMThiZmQ3NmFhYmMyNGEwMDgxY2UyODU2"
    "ZjMzMDUwNGVkIiwiY29udGVudCI6IiIsImtpbmQiOjI3MjM1LCJjcmVhdGVkX2F0IjoxNjgyMzI3ODUyLCJ0YWdzIjpb"
    "WyJ1cmwiLCJodHRwczovL2FwaS5zbm9ydC5zb2NpYWwvYXBpL3YxL241c3AvbGlzdCJdLFsibWV0aG9kIiwiR0VUIl1d"
    "LCJzaWciOiI1ZWQ5ZDhlYzk1OGJjODU0Zjk5N2JkYzI0YWMzMzdkMDA1YWYzNzIzMjQ3NDdlZmU0YTAwZTI0ZjRjMzA0"
    "MzdmZjRkZDgzMDg2ODRiZWQ0NjdkOWQ2YmUzZTVhNTE3YmI0M2IxNzMyY2M3ZDMzOTQ5YTNhYWY4NjcwNWMyMjE4NCJ9"
)
NIP_URL = "https://api.snort.social/api/v1/n5sp/list"
NIP_AT = 1682327852


def header(
    *,
    url: str = URL,
    method: str = "POST",
    body: bytes | None = BODY,
    kind: int = nip98.KIND,
    at: int = NOW,
    extra: Sequence[Sequence[str]] = (),
) -> str:
    tags: list[Sequence[str]] = [("u", url), ("method", method)]
    if body is not None:
        tags.append(("payload", hashlib.sha256(body).hexdigest()))
    tags.extend(extra)
    event = sign_event(EventTemplate(kind, tuple(tuple(t) for t in tags)), KEYS.secret_key, at)
    return base64.b64encode(event.to_json().encode()).decode()


def check(credential: str, **request: Any) -> nip98.Authorized:
    args: dict[str, Any] = {"method": "POST", "urls": [URL], "body": BODY, "now": NOW}
    args.update(request)
    return verify(credential, **args)


def failed(credential: str, **request: Any) -> str:
    with pytest.raises(Nip98Rejected) as caught:
        check(credential, **request)
    assert caught.value.status == 401
    assert caught.value.message.startswith(f"NIP-98 auth failed ({caught.value.check})")
    return caught.value.check


def test_a_good_event_names_its_signer() -> None:
    token = header()
    signed = check(token)
    assert signed.pubkey == KEYS.public_key
    assert signed.created_at == NOW
    raw = json.loads(base64.b64decode(token))
    assert signed.event_id == raw["id"]


def test_the_nip_example_has_a_valid_signature_but_the_old_url_tag_name() -> None:
    assert failed(NIP_HEADER, method="GET", urls=[NIP_URL], body=b"", now=NIP_AT) == "u"
    # Tampered with, the same vector fails its signature first.
    raw = json.loads(base64.b64decode(NIP_HEADER))
    raw["tags"][0][0] = "u"
    forged = base64.b64encode(json.dumps(raw).encode()).decode()
    assert failed(forged, method="GET", urls=[NIP_URL], body=b"", now=NIP_AT) == "signature"


def test_base64_variants_are_read_and_junk_is_refused() -> None:
    token = header()
    assert check(token.rstrip("=")).pubkey == KEYS.public_key
    urlsafe = token.replace("+", "-").replace("/", "_")
    assert check(urlsafe).pubkey == KEYS.public_key
    assert failed("not base64 at all!") == "base64"
    assert failed("") == "base64"
    assert failed("A" * (nip98.MAX_CREDENTIAL_CHARS + 1)) == "base64"
    assert failed("é") == "base64"


def test_an_event_that_is_not_json_or_not_an_event_is_refused() -> None:
    assert failed(base64.b64encode(b"{not json").decode()) == "event"
    assert failed(base64.b64encode(b"[1,2]").decode()) == "event"
    assert failed(base64.b64encode(b'{"kind":27235}').decode()) == "event"


def test_kind_must_be_27235() -> None:
    assert failed(header(kind=1)) == "kind"


def test_id_and_signature_must_be_valid() -> None:
    raw = json.loads(base64.b64decode(header()))
    bad_sig = dict(raw, sig=("0" if raw["sig"][0] != "0" else "1") + raw["sig"][1:])
    assert failed(base64.b64encode(json.dumps(bad_sig).encode()).decode()) == "signature"
    bad_id = dict(raw, created_at=raw["created_at"] + 1)  # the id no longer hashes the event
    assert failed(base64.b64encode(json.dumps(bad_id).encode()).decode()) == "signature"


def test_created_at_within_60_seconds_either_side() -> None:
    assert check(header(at=NOW - 60)).created_at == NOW - 60
    assert check(header(at=NOW + 60)).created_at == NOW + 60
    assert failed(header(at=NOW - 61)) == "created_at"
    assert failed(header(at=NOW + 61)) == "created_at"


def test_u_must_be_the_request_url_with_its_query() -> None:
    with_query = URL + "?a=1"
    assert check(header(url=with_query), urls=[with_query]).pubkey == KEYS.public_key
    assert failed(header(url=with_query)) == "u"
    assert failed(header(url=URL), urls=[with_query]) == "u"
    assert failed(header(url="https://other.example/v1/chat/completions")) == "u"
    assert failed(header(url="https://node.example/v1/embeddings")) == "u"
    assert failed(header(url="http://node.example/v1/chat/completions")) == "u"
    assert failed(header(url="/v1/chat/completions")) == "u"
    assert failed(header(extra=[("u", URL)])) == "u"  # two u tags: which one was meant?


def test_u_is_compared_as_the_same_resource() -> None:
    # Scheme and host case, and a default port, name the same URL; the path does not.
    same = "HTTPS://Node.Example:443/v1/chat/completions"
    assert check(header(url=same)).pubkey == KEYS.public_key
    assert failed(header(url=URL + "/")) == "u"
    assert failed(header(url="https://node.example:8443/v1/chat/completions")) == "u"


def test_method_must_match() -> None:
    assert failed(header(method="GET")) == "method"
    assert check(header(method="post")).pubkey == KEYS.public_key
    assert failed(header(extra=[("method", "POST")])) == "method"


def test_a_body_needs_its_exact_payload_hash() -> None:
    assert failed(header(body=None)) == "payload"
    assert failed(header(body=BODY + b" ")) == "payload"
    assert failed(header(), body=BODY.replace(b"hi", b"yo")) == "payload"
    assert failed(header(extra=[("payload", hashlib.sha256(BODY).hexdigest())])) == "payload"


def test_no_body_needs_no_payload_but_a_stated_one_must_match() -> None:
    get = {"method": "GET", "body": b""}
    assert check(header(method="GET", body=None), **get).pubkey == KEYS.public_key
    assert check(header(method="GET", body=b""), **get).pubkey == KEYS.public_key
    assert failed(header(method="GET", body=b"x"), **get) == "payload"


def test_request_urls_joins_public_bases_with_path_and_query() -> None:
    urls = request_urls(
        "http://127.0.0.1:8000/v1/x?q=1",
        ("https://node.example/prefix/", "http://abc.onion"),
        "/v1/x",
        "q=1",
    )
    assert urls == (
        "https://node.example/prefix/v1/x?q=1",
        "http://abc.onion/v1/x?q=1",
        "http://127.0.0.1:8000/v1/x?q=1",  # an address: reached directly
    )


def test_the_requests_own_url_counts_only_for_a_host_of_this_node() -> None:
    bases = ("https://node.example",)
    # Host is the client's to choose: a header signed for another service must not pay here.
    assert request_urls("https://other.example/v1/x", bases, "/v1/x", "") == (
        "https://node.example/v1/x",
    )
    assert "https://node.example:8443/v1/x" in request_urls(
        "https://node.example:8443/v1/x", bases, "/v1/x", ""
    )
    assert "http://box.lan:8000/v1/x" in request_urls(
        "http://box.lan:8000/v1/x", bases, "/v1/x", "", listen_host="box.lan"
    )
    # With no public URL configured, the URL the server saw is the one to sign.
    assert request_urls("http://box.lan:8000/v1/x", ("", ""), "/v1/x", "") == (
        "http://box.lan:8000/v1/x",
    )


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("HTTP://A.example:80/p?x=1", "http://a.example/p?x=1"),
        ("https://a.example", "https://a.example/"),
        ("https://[::1]:8443/p", "https://[::1]:8443/p"),
        ("ftp://a.example/p", None),
        ("https://a.example/p#frag", None),
        ("https://a.example:99999/p", None),
        ("no scheme", None),
    ],
)
def test_normalize_url(url: str, normal: str | None) -> None:
    assert nip98.normalize_url(url) == normal
