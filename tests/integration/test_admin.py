"""The admin dashboard over HTTP (uvicorn, real mint, real ledger): auth, CSRF, money moves."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.mint_api import MintApi
from nodeprov.core.payments import Payer, api_key_account
from nodeprov.errors import Unauthorized
from nodeprov.http.admin import pages
from tests.browser.admin_node import (
    CHAT,
    CHAT_COST,
    PASSWORD,
    TOKEN,
    USAGE,
    AdminNode,
    admin_node_fixture,  # noqa: F401  (fixture)
    csrf_of,
    login,
)
from tests.support.core import TEST_MODEL
from tests.support.services import MintHandle

GET_PAGES = [
    "/admin/",
    "/admin/activity",
    "/admin/keys",
    "/admin/keys/key:abc",
    "/admin/transactions",
    "/admin/wallet",
]
POSTS = [
    "/admin/logout",
    "/admin/keys/key:abc/withdraw",
    "/admin/keys/key:abc/revoke",
    "/admin/wallet/withdraw",
    "/admin/wallet/payout/quote",
    "/admin/wallet/payout/pay",
]


def cookie_flags(response: httpx.Response, name: str) -> list[str]:
    """The lower-cased attributes of the Set-Cookie header for ``name``."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return [part.strip().lower() for part in header.split(";")]
    raise AssertionError(f"no Set-Cookie for {name}")


def client(node: AdminNode) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, follow_redirects=False)


async def test_login_required_everywhere(node: AdminNode, make_token: Any) -> None:
    key = await node.funded_key(10, make_token)
    account_id = api_key_account(key)
    posts = [*POSTS, f"/admin/keys/{quote(account_id)}/withdraw"]
    async with client(node) as http:
        for cookie in (None, "forged-session-id"):
            http.cookies.clear()
            if cookie:
                http.cookies.set("nodeprov_admin", cookie, path="/admin")
            for path in [*GET_PAGES, f"/admin/keys/{quote(account_id)}"]:
                r = await http.get(path)
                assert r.status_code == 303, path
                assert r.headers["location"] == "/admin/login"
            for path in posts:
                r = await http.post(path, data={"csrf": "x", "amount": ""})
                assert r.status_code == 403, path
                assert "log in" in r.text.lower()
        assert (await http.get("/admin/login")).status_code == 200
        assert (await http.get("/admin/static/admin.css")).status_code == 200
    account = await node.core.ledger.account(account_id)
    assert account is not None and account.balance_msat == 10_000 and not account.revoked


async def test_wrong_password_then_right_one(node: AdminNode) -> None:
    async with client(node) as http:
        r = await login(http, "not the password")
        assert r.status_code == 401
        assert "Wrong password" in r.text and PASSWORD not in r.text
        assert "nodeprov_admin" not in http.cookies
        assert (await http.get("/admin/")).status_code == 303
        r = await login(http)
        assert r.status_code == 303 and r.headers["location"] == "/admin/"
        r = await http.get("/admin/")
        assert r.status_code == 200 and "Overview" in r.text


async def test_repeated_failures_never_lock_the_right_password_out(node: AdminNode) -> None:
    """Five wrong guesses from the owner's address (127.0.0.1: anyone on the host) slow it
    down; the right password is still checked and let in."""
    async with client(node) as http:
        codes = [(await login(http, f"guess-{i}")).status_code for i in range(5)]
        assert codes == [401] * 5
        assert "nodeprov_admin" not in http.cookies
        assert (await http.get("/admin/")).status_code == 303
        r = await login(http)  # waits the address's delay (1 s), then logs in
        assert r.status_code == 303
        assert (await http.get("/admin/")).status_code == 200


async def test_csrf_missing_or_wrong_is_refused(node: AdminNode, make_token: Any) -> None:
    key = await node.funded_key(5, make_token)
    account_id = api_key_account(key)
    revoke = f"/admin/keys/{quote(account_id)}/revoke"
    async with client(node) as http:
        page = await http.get("/admin/login")
        r = await http.post("/admin/login", data={"password": PASSWORD})
        assert r.status_code == 403  # login form without its double-submit token
        http.cookies.clear()
        r = await http.post("/admin/login", data={"csrf": csrf_of(page.text), "password": PASSWORD})
        assert r.status_code == 403  # token without the matching cookie
        assert (await login(http)).status_code == 303
        async with client(node) as other:
            assert (await login(other)).status_code == 303
            foreign = csrf_of((await other.get("/admin/wallet")).text)
        for data in ({}, {"csrf": ""}, {"csrf": "wrong"}, {"csrf": foreign}):
            r = await http.post(revoke, data=data)
            assert r.status_code == 403, data
            assert "security token" in r.text or not data
        r = await http.post(revoke, content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 403
        account = await node.core.ledger.account(account_id)
        assert account is not None and not account.revoked
        token = csrf_of((await http.get(f"/admin/keys/{quote(account_id)}")).text)
        r = await http.post(revoke, data={"csrf": token})
        assert r.status_code == 303
    account = await node.core.ledger.account(account_id)
    assert account is not None and account.revoked
    with pytest.raises(Unauthorized):
        await node.core.payments.account_for(Payer("api_key", key))


async def test_session_cookie_flags_and_security_headers(node: AdminNode) -> None:
    async with client(node) as http:
        r = await login(http)
        flags = cookie_flags(r, "nodeprov_admin")
        assert "httponly" in flags and "samesite=strict" in flags and "path=/admin" in flags
        assert "max-age=600" in flags and "secure" not in flags
        page = await http.get("/admin/")
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["x-frame-options"] == "DENY"
        assert "default-src 'none'" in page.headers["content-security-policy"]
    async with client(node) as http:  # behind a TLS proxy (http.forwarded_allow_ips)
        https = {"x-forwarded-proto": "https"}
        page = await http.get("/admin/login", headers=https)
        assert "secure" in cookie_flags(page, "nodeprov_admin_login")
        nonce = csrf_of(page.text)  # a Secure cookie is not resent over plain http: send it
        r = await http.post(
            "/admin/login",
            data={"csrf": nonce, "password": PASSWORD},
            headers={**https, "cookie": f"nodeprov_admin_login={nonce}"},
        )
        flags = cookie_flags(r, "nodeprov_admin")
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags


async def test_logout_ends_the_session(node: AdminNode) -> None:
    async with client(node) as http:
        await login(http)
        session = http.cookies["nodeprov_admin"]
        token = csrf_of((await http.get("/admin/")).text)
        r = await http.post("/admin/logout", data={"csrf": token})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
        assert "nodeprov_admin" not in http.cookies
        http.cookies.set("nodeprov_admin", session, path="/admin")  # replay the old cookie
        assert (await http.get("/admin/")).status_code == 303


async def test_withdraw_a_keys_balance_as_a_token(node: AdminNode, make_token: Any) -> None:
    key = await node.funded_key(100, make_token, charges=2)
    account_id = api_key_account(key)
    left = 100_000 - 2 * CHAT_COST
    async with client(node) as http:
        await login(http)
        listing = (await http.get("/admin/keys")).text
        assert account_id[:28] in listing and "97.880 sat" in listing and "2.120 sat" in listing
        view = await http.get(f"/admin/keys/{quote(account_id)}")
        assert view.status_code == 200 and account_id in view.text and "97.880 sat" in view.text
        r = await http.post(
            f"/admin/keys/{quote(account_id)}/withdraw",
            data={"csrf": csrf_of(view.text), "amount": "200", "pool": "auto"},
        )
        assert r.status_code == 402 and "Insufficient balance" in r.text
        r = await http.post(
            f"/admin/keys/{quote(account_id)}/withdraw",
            data={"csrf": csrf_of(view.text), "amount": "", "pool": "auto"},
        )
        assert r.status_code == 200, r.text
        match = TOKEN.search(r.text)
        assert match is not None
        token = match.group(1).strip()
        assert token.startswith("cashuB") and "97 sat" in r.text
    assert await make_token.redeem(token) == 97
    account = await node.core.ledger.account(account_id)
    assert account is not None and account.balance_msat == left - 97_000  # 880 msat stay
    await node.core.assert_books_balance()


async def test_withdraw_earnings_and_pay_a_bolt11_invoice(
    node: AdminNode, make_token: Any, fee_mint: MintHandle
) -> None:
    await node.core.wallet.receive(await make_token(200), OPERATOR, "operator")
    async with client(node) as http:
        await login(http)
        page = await http.get("/admin/wallet")
        assert "200.000 sat" in page.text
        token = csrf_of(page.text)
        pool = f"{node.core.wallet.mints[0]}|sat"
        r = await http.post("/admin/wallet/withdraw", data={"csrf": token, "amount": "30.5"})
        assert r.status_code == 200, r.text
        match = TOKEN.search(r.text)
        assert match is not None
        assert await make_token.redeem(match.group(1).strip()) == 30  # whole sats only
        r = await http.post("/admin/wallet/payout/quote", data={"csrf": token, "bolt11": "lnbc1x!"})
        assert r.status_code == 400 and "not a bolt11 invoice" in r.text
        async with httpx.AsyncClient() as plain:
            invoice = (await MintApi(fee_mint.url, plain).mint_quote(50, "sat"))["request"]
        r = await http.post(
            "/admin/wallet/payout/quote", data={"csrf": token, "bolt11": invoice, "pool": pool}
        )
        assert r.status_code == 200 and 'id="quote-amount">50 sat' in r.text
        handle = r.text.split('name="quote" value="')[1].split('"')[0]
        r = await http.post("/admin/wallet/payout/pay", data={"csrf": token, "quote": handle})
        assert r.status_code == 200 and "Paid 50 sat" in r.text, r.text
        r = await http.post("/admin/wallet/payout/pay", data={"csrf": token, "quote": handle})
        assert r.status_code == 400 and "no longer open" in r.text  # a quote is paid once
    operator = await node.core.ledger.account(OPERATOR)
    assert operator is not None
    assert 200_000 - 30_000 - 60_000 <= operator.balance_msat <= 200_000 - 30_000 - 50_000


async def test_overview_and_paged_transactions(
    node: AdminNode, make_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node.funded_key(20, make_token, charges=3)
    monkeypatch.setattr(pages, "PAGE_SIZE", 3)
    async with client(node) as http:
        await login(http)
        page = (await http.get("/admin/")).text
        assert 'id="earnings">3.180 sat' in page  # 3 × 1060 msat, exact
        assert 'id="users-balance">16.820 sat' in page
        assert 'id="audit">balanced' in page
        assert "test-model" in page and "<td>http</td>" in page
        # Two charts (revenue, requests) of 30 days, today's bars stacked by channel.
        assert page.count('class="hit"') == 60 and page.count('class="bar http"') == 2
        assert 'id="revenue">3.180 sat' in page and 'id="rounding">0.000 sat' in page
        first = (await http.get("/admin/transactions")).text
        assert first.count('<td class="num">') >= 3 and 'id="older"' in first
        older = first.split('id="older" href="')[1].split('"')[0].replace("&amp;", "&")
        second = await http.get(older)
        assert second.status_code == 200 and "Newest" in second.text


async def test_the_overview_splits_earnings_into_revenue_and_rounding(
    node: AdminNode, make_token: Any
) -> None:
    await node.funded_key(20, make_token, charges=1)
    # A sat token per request pays ceil(1060 / 1000) = 2 sat: 940 msat of rounding.
    async with node.core.payments.job(
        Payer("request_token", await make_token(5)), TEST_MODEL, CHAT
    ) as job:
        await job.settle(USAGE)
    async with client(node) as http:
        await login(http)
        page = (await http.get("/admin/")).text
    assert 'id="revenue">2.120 sat' in page
    assert 'id="rounding">0.940 sat' in page
    assert 'id="earned">3.060 sat' in page and 'id="earnings">3.060 sat' in page
    assert "Earnings are revenue plus rounding" in page
    assert "not recorded per request" not in page


async def test_the_channel_of_each_request_shows_per_model_and_in_the_charts(
    node: AdminNode, make_token: Any
) -> None:
    await node.funded_key(20, make_token, charges=2)
    npub = "ef" * 32
    await node.core.payments.deposit("npub:" + npub, await make_token(10), "dm:d1")
    async with node.core.payments.job(Payer("npub", npub, channel="nostr"), TEST_MODEL, CHAT) as j:
        await j.settle(USAGE)
    async with client(node) as http:
        await login(http)
        page = (await http.get("/admin/")).text
        assert '<td>http</td><td class="num">2</td>' in page
        assert '<td>nostr</td><td class="num">1</td>' in page
        assert page.count('class="bar nostr"') == 2 and page.count('class="bar http"') == 2
        one = (await http.get("/admin/", params={"model": TEST_MODEL})).text
        assert f"Revenue per day of {TEST_MODEL}" in one
        other = (await http.get("/admin/", params={"model": "no-such-model"})).text
        assert "Revenue per day (last" in other  # an unknown model shows them all


async def test_transactions_page_shows_one_request_as_one_group(
    node: AdminNode, make_token: Any
) -> None:
    await node.funded_key(20, make_token, charges=2)
    async with node.core.payments.job(
        Payer("request_token", await make_token(5)), TEST_MODEL, CHAT
    ) as job:
        await job.settle(USAGE)
    async with client(node) as http:
        await login(http)
        page = (await http.get("/admin/transactions")).text
    groups = page.split('<tbody class="')[1:]
    heads = [g.split('"')[0] for g in groups]
    # Newest first: the token request, the key's two requests, the key's deposit.
    assert heads == ["request", "request", "request", "single"]
    token_group = groups[0]
    for kind in ("deposit", "charge", "earning", "rounding", "change"):
        assert f"<td>{kind}</td>" in token_group
    assert "held 2.000 sat" not in token_group  # the hold is the max cost, not the token
    assert f"charged {1.060:.3f} sat" in token_group and "· http ·" in token_group
    assert groups[1].count("<td>charge</td>") == 1 and groups[1].count("<td>earning</td>") == 1


async def test_keys_page_finds_a_key_by_full_and_masked_form(
    node: AdminNode, make_token: Any
) -> None:
    key = await node.funded_key(20, make_token)
    await node.funded_key(20, make_token)  # another key, not found
    account_id = api_key_account(key)
    masked = key[:7] + "…" + key[-4:]
    async with client(node) as http:
        await login(http)
        for query in (key, masked, key[:7] + "..." + key[-4:], account_id[4:16]):
            r = await http.get("/admin/keys", params={"q": query})
            assert r.status_code == 303, (query, r.text)
            assert r.headers["location"] == f"/admin/keys/{quote(account_id, safe='')}"
        view = (await http.get(r.headers["location"])).text
        assert f'id="key-hint">{masked}<' in view
        r = await http.get("/admin/keys", params={"q": "sk-nope…abcd"})
        assert r.status_code == 200 and "No account matches" in r.text
        r = await http.get("/admin/keys", params={"q": "sk"})
        assert r.status_code == 200 and "at least 4 characters" in r.text


async def test_activity_page_shows_rates_latency_holds_streams_and_keys(
    node: AdminNode, make_token: Any
) -> None:
    key = await node.funded_key(20, make_token, charges=2)
    node.metrics.record_request("http", TEST_MODEL, 200, 0.3, 1060)
    node.metrics.record_request("http", TEST_MODEL, 402, 0.01)
    node.metrics.record_request("http", TEST_MODEL, 502, 2.0)
    node.metrics.record_request("nostr", TEST_MODEL, 200, 4.0, 1060)
    node.metrics.stream_started()
    async with node.core.payments.job(Payer("api_key", key), TEST_MODEL, CHAT) as running:
        async with client(node) as http:
            await login(http)
            page = (await http.get("/admin/activity")).text
        await running.settle(USAGE)
    node.metrics.stream_ended()
    rates = page.split('id="rates"')[1].split("</table>")[0]
    # http: 3 requests, 1 ok, 1 unpaid, 0 other 4xx, 1 5xx: 33.3 % failed on the node's side
    assert '<td class="num">3</td><td class="num">1</td><td class="num">1</td>' in rates
    assert "33.3 %" in rates and "0.0 %" in rates
    latency = page.split('id="latency"')[1].split("</table>")[0]
    assert '<td>http</td><td class="num">3</td>' in latency and "2.5 s" in latency
    holds = page.split('id="holds-table"')[1].split("</table>")[0]
    assert api_key_account(key) in holds and TEST_MODEL in holds
    assert 'id="streams-now">1<' in page
    usage = page.split('id="keys-usage"')[1].split("</table>")[0]
    assert api_key_account(key) in usage and "2.120 sat" in usage
