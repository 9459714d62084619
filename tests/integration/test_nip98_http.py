"""NIP-98 HTTP auth against the real mint: ``Authorization: Nostr …`` pays from the npub account.

Headers are signed by nostr-sdk (tests/support/nip98_client.py) and, in one test, made and
sent by nostr-tools' ``nip98.getToken`` and Node's fetch. Every rejection is a 401 naming the
failed check and moves no money; an unfunded npub gets a 402; a replayed event is refused
however it is raced.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.support.http_node import Node, chat_cost, node_fixture, upstream_fixture  # noqa: F401
from tests.support.nip98_client import Nip98Client, encode_body
from tests.support.nostr_tools_peer import PEER_DIR, Unavailable, ensure_installed, node_required

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ledger_backend")]

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


async def funded(node: Node, client: Nip98Client, make_token: Any, sat: int) -> None:
    """Top the signer's npub account up with a ``sat`` token, over NIP-98."""
    r = await client.post(node.base + "/wallet/topup", {"cashu_token": await make_token(sat)})
    assert r.status_code == 200, r.text
    assert r.json()["msats"] == sat * 1000


async def books(node: Node, pubkey: str) -> tuple[int, int, int, int]:
    """What a rejection must not change: the npub's balance, reserve and spending, and the
    operator's earnings."""
    account = await node.core.ledger.account("npub:" + pubkey)
    assert account is not None
    return (
        account.balance_msat,
        account.reserved_msat,
        account.total_spent_msat,
        await node.operator_msat(),
    )


async def test_topup_balance_and_paid_routes_draw_on_the_npub_account(
    node: Node, make_token: Any
) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        r = await client.get(node.base + "/wallet/balance")
        assert r.status_code == 200, r.text
        fresh = r.json()
        assert fresh["balance"] == 0 and fresh["pubkey"] == client.pubkey
        assert fresh["npub"].startswith("npub1") and "api_key" not in fresh
        assert await node.core.ledger.account("npub:" + client.pubkey) is None  # just looked

        await funded(node, client, make_token, 10)
        r = await client.post(node.base + "/chat/completions", CHAT)
        assert r.status_code == 200, r.text
        cost = chat_cost(r.json()["usage"])
        assert int(r.headers["X-Cost-Msat"]) == cost
        assert int(r.headers["X-Balance-Msat"]) == 10_000 - cost
        r = await client.post(node.base + "/embeddings", {"model": "fake-embed", "input": "hi"})
        assert r.status_code == 200, r.text
        spent = cost + int(r.headers["X-Cost-Msat"])

        info = (await client.get(node.base + "/wallet/info")).json()
        assert info["balance"] == 10_000 - spent and info["total_spent"] == spent
        assert info["total_deposited"] == 10_000 and info["pubkey"] == client.pubkey
        rows = await node.core.ledger.db.fetchall(
            "SELECT channel FROM transactions WHERE account_id = ? AND kind = 'charge'",
            ("npub:" + client.pubkey,),
        )
        assert [row[0] for row in rows] == ["http", "http"]


async def test_an_unfunded_npub_gets_402_not_401(node: Node) -> None:
    async with httpx.AsyncClient() as http:
        r = await Nip98Client(http).post(node.base + "/chat/completions", CHAT)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_balance"
    assert r.headers["X-Cashu"].startswith("creqA")


async def test_withdraw_and_refund_pay_the_npub_balance_out(node: Node, make_token: Any) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        r = await client.post(node.base + "/wallet/withdraw", {})
        assert r.status_code == 402, r.text  # nothing yet: as for an empty key, not a 401
        r = await http.post(node.base + "/wallet/refund", headers=client.header(
            "POST", node.base + "/wallet/refund"))  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_balance", r.text
        await funded(node, client, make_token, 12)
        r = await client.post(node.base + "/wallet/withdraw", {"amount": 5_000})
        assert r.status_code == 200, r.text
        assert r.json()["msats"] == 5_000 and await make_token.redeem(r.json()["token"]) == 5
        r = await client.post(node.base + "/wallet/withdraw", {"amount": 10**9})
        assert r.status_code == 402
        r = await http.post(node.base + "/balance/refund", headers=client.header(
            "POST", node.base + "/balance/refund"))  # fmt: skip
        assert r.status_code == 200, r.text
        assert await make_token.redeem(r.json()["token"]) == 7
        assert await client.balance(node.base) == 0


async def test_a_replayed_event_is_401_and_charges_once(node: Node, make_token: Any) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        url = node.base + "/chat/completions"
        raw = encode_body(CHAT)
        headers = {"Content-Type": "application/json", **client.header("POST", url, raw)}
        first = await http.post(url, content=raw, headers=headers)
        assert first.status_code == 200, first.text
        before = await books(node, client.pubkey)
        # Raced too: however many copies arrive at once, none of them pays again.
        again = await asyncio.gather(
            *(http.post(url, content=raw, headers=headers) for _ in range(4))
        )
        for r in again:
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_nostr_auth"
            assert "(replayed)" in r.json()["error"]["message"]
        assert await books(node, client.pubkey) == before


async def test_one_event_raced_on_a_fresh_account_pays_at_most_once(
    node: Node, make_token: Any
) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        url = node.base + "/chat/completions"
        raw = encode_body(CHAT)
        headers = {"Content-Type": "application/json", **client.header("POST", url, raw)}
        answers = await asyncio.gather(
            *(http.post(url, content=raw, headers=headers) for _ in range(5))
        )
    assert sorted(r.status_code for r in answers) == [200, 401, 401, 401, 401]
    account = await node.core.ledger.account("npub:" + client.pubkey)
    assert account is not None
    paid = next(r for r in answers if r.status_code == 200)
    assert account.total_spent_msat == int(paid.headers["X-Cost-Msat"])


REJECTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (the check the message names, how the header differs from the request)
    "stale": ("created_at", {"at": int(time.time()) - 3600}),
    "from the future": ("created_at", {"at": int(time.time()) + 3600}),
    "another path": ("u", {"url": "/embeddings"}),
    "another host": ("u", {"url": "https://elsewhere.example/v1/chat/completions"}),
    "another query": ("u", {"url": "/chat/completions?x=1"}),
    "another method": ("method", {"method": "PUT"}),
    "another body": ("payload", {"payload": "00" * 32}),
    "no payload tag": ("payload", {"payload": ""}),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
async def test_a_mismatched_header_is_401_naming_the_check_and_charges_nothing(
    node: Node, make_token: Any, case: str
) -> None:
    check, differs = REJECTIONS[case]
    change = dict(differs)
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        before = await books(node, client.pubkey)
        url = node.base + "/chat/completions"
        signed_url = change.pop("url", "/chat/completions")
        if signed_url.startswith("/"):
            signed_url = node.base + signed_url
        raw = encode_body(CHAT)
        method = change.pop("method", "POST")
        headers = client.header(method, signed_url, raw, **change)
        r = await http.post(
            url, content=raw, headers={"Content-Type": "application/json", **headers}
        )
        assert r.status_code == 401, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_nostr_auth"
        assert error["message"].startswith(f"NIP-98 auth failed ({check})")
        assert await books(node, client.pubkey) == before


async def test_a_forged_signature_and_junk_are_401(node: Node, make_token: Any) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        before = await books(node, client.pubkey)
        url = node.base + "/chat/completions"
        raw = encode_body(CHAT)
        good = client.header("POST", url, raw)["Authorization"].removeprefix("Nostr ")
        event = json.loads(base64.b64decode(good))
        event["pubkey"] = Nip98Client(http).pubkey  # someone else's account
        forged = base64.b64encode(json.dumps(event).encode()).decode()
        for credential, check in ((forged, "signature"), ("%%%", "base64")):
            headers = {"Content-Type": "application/json", "Authorization": f"Nostr {credential}"}
            r = await http.post(url, content=raw, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["message"].startswith(f"NIP-98 auth failed ({check})")
        assert await books(node, client.pubkey) == before


async def test_the_configured_public_url_is_accepted_and_a_foreign_host_is_not(
    node: Node, make_token: Any
) -> None:
    """The node's ``http_url`` is ``http://127.0.0.1`` (as a proxy on port 80 would publish
    it): a header signed for that URL pays; one signed for the host a client put in ``Host``
    does not, since another service's header must not pay here."""
    assert node.config.node.http_url == "http://127.0.0.1"
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        raw = encode_body(CHAT)
        public = client.header("POST", "http://127.0.0.1/v1/chat/completions", raw)
        r = await http.post(node.base + "/chat/completions", content=raw,
                            headers={"Content-Type": "application/json", **public})  # fmt: skip
        assert r.status_code == 200, r.text
        foreign = client.header("POST", "http://other.example/v1/chat/completions", raw)
        r = await http.post(node.base + "/chat/completions", content=raw, headers={
            "Content-Type": "application/json", "Host": "other.example", **foreign})  # fmt: skip
        assert r.status_code == 401, r.text
        assert "(u)" in r.json()["error"]["message"]


async def test_x_cashu_pays_when_both_are_sent_and_the_event_stays_unused(
    node: Node, make_token: Any
) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 10)
        before = await books(node, client.pubkey)
        url = node.base + "/chat/completions"
        raw = encode_body(CHAT)
        headers = {"Content-Type": "application/json", **client.header("POST", url, raw)}
        token = await make_token(5)
        r = await http.post(url, content=raw, headers={**headers, "X-Cashu": token})
        assert r.status_code == 200, r.text
        assert "X-Balance-Msat" not in r.headers and r.headers["X-Cashu"].startswith("cashu")
        assert (await books(node, client.pubkey))[:3] == before[:3]
        r = await http.post(url, content=raw, headers=headers)  # the event was never spent
        assert r.status_code == 200, r.text


async def test_concurrent_nip98_requests_never_overdraw(node: Node, make_token: Any) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 3)
        url = node.base + "/chat/completions"
        # The same request signed 8 times, likely in one second (one event id): each
        # signature is a request of its own.
        answers = await asyncio.gather(*(client.post(url, CHAT) for _ in range(8)))
        await node.wait_idle()
        paid = [r for r in answers if r.status_code == 200]
        assert paid and all(r.status_code in (200, 402) for r in answers)
        spent = sum(int(r.headers["X-Cost-Msat"]) for r in paid)
        account = await node.core.ledger.account("npub:" + client.pubkey)
        assert account is not None
        assert account.balance_msat == 3_000 - spent >= 0
        assert account.reserved_msat == 0 and account.total_spent_msat == spent


@pytest.fixture(scope="module")
def node_bin() -> str:
    try:
        return ensure_installed()
    except Unavailable as exc:
        if node_required():
            pytest.fail(f"the nostr-tools peer must run here: {exc}")
        pytest.skip(f"nostr-tools peer unavailable: {exc}")


def tools_fetch(node_bin: str, secret: str, method: str, url: str, body: Any = None) -> Any:
    """One request made and signed by nostr-tools (tests/support/nostr_tools/nip98_fetch.mjs)."""
    argv = [node_bin, "nip98_fetch.mjs", secret, method, url]
    if body is not None:
        argv.append(json.dumps(body))
    done = subprocess.run(argv, cwd=PEER_DIR, capture_output=True, check=True, timeout=60)
    return json.loads(done.stdout)


async def test_nostr_tools_get_token_tops_up_and_pays(
    node: Node, make_token: Any, node_bin: str
) -> None:
    async with httpx.AsyncClient() as http:
        client = Nip98Client(http)  # its key, used by nostr-tools too
        secret = client.secret_hex
        topup = {"cashu_token": await make_token(10)}
        out = await asyncio.to_thread(
            tools_fetch, node_bin, secret, "POST", node.base + "/wallet/topup", topup
        )
        assert out["status"] == 200, out
        assert out["pubkey"] == client.pubkey and json.loads(out["body"])["msats"] == 10_000
        out = await asyncio.to_thread(
            tools_fetch, node_bin, secret, "POST", node.base + "/chat/completions", CHAT
        )
        assert out["status"] == 200, out
        cost = chat_cost(json.loads(out["body"])["usage"])
        assert int(out["cost_msat"]) == cost and int(out["balance_msat"]) == 10_000 - cost
        out = await asyncio.to_thread(
            tools_fetch, node_bin, secret, "GET", node.base + "/wallet/balance"
        )
        assert out["status"] == 200 and json.loads(out["body"])["balance"] == 10_000 - cost
        assert await client.balance(node.base) == 10_000 - cost


async def test_audio_uploads_and_streams_pay_with_nip98_too(node: Node, make_token: Any) -> None:
    """The payload tag covers a multipart body byte for byte; a stream settles on the npub."""
    async with httpx.AsyncClient(timeout=30) as http:
        client = Nip98Client(http)
        await funded(node, client, make_token, 20)
        url = node.base + "/audio/transcriptions"
        audio = b"RIFF" + b"\0" * 4 + b"WAVE" + b"\0" * 2000  # no trusted header: a floor bound
        request = http.build_request(
            "POST", url, data={"model": "fake-whisper"}, files={"file": ("a.wav", audio)}
        )
        body = request.read()
        request.headers.update(client.header("POST", url, body))
        r = await http.send(request)
        assert r.status_code == 200, r.text
        spent = int(r.headers["X-Cost-Msat"])
        # The same upload with one byte changed is another body: refused, nothing moves.
        before = await books(node, client.pubkey)
        request = http.build_request("POST", url, data={"model": "fake-whisper"},
                                     files={"file": ("a.wav", audio[:-1] + b"\1")})  # fmt: skip
        request.headers.update(client.header("POST", url, body))
        r = await http.send(request)
        assert r.status_code == 401 and "(payload)" in r.json()["error"]["message"]
        assert await books(node, client.pubkey) == before

        streamed = {**CHAT, "stream": True}
        raw = encode_body(streamed)
        headers = {"Content-Type": "application/json"}
        headers.update(client.header("POST", node.base + "/chat/completions", raw))
        async with http.stream(
            "POST", node.base + "/chat/completions", content=raw, headers=headers
        ) as r:
            assert r.status_code == 200
            text = "".join([chunk async for chunk in r.aiter_text()])
        assert "[DONE]" in text
        await node.wait_idle()
        account = await node.core.ledger.account("npub:" + client.pubkey)
        assert account is not None and account.total_spent_msat > spent
        assert account.balance_msat == 20_000 - account.total_spent_msat


async def test_used_events_are_pruned_by_the_sweeper(node: Node) -> None:
    payments, ledger = node.core.payments, node.core.ledger
    now = int(time.time())
    assert await payments.first_auth_use("a" * 128, "1" * 64, "p" * 64, now - 3600, now)
    assert await payments.first_auth_use("b" * 128, "2" * 64, "p" * 64, now, now)
    assert not await payments.first_auth_use("b" * 128, "2" * 64, "p" * 64, now, now)
    await ledger.release_stale_holds(at=now)
    rows = await ledger.db.fetchall("SELECT sig FROM auth_events")
    assert [row[0] for row in rows] == ["b" * 128]
