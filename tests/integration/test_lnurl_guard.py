"""LNURL requests (payouts, expiry refunds) go only where the Lightning address sends them.

One guarded fetch in ``core.lnurl``: a redirect is followed only on the same host; a host
other than the address's own (a callback elsewhere) must resolve to public addresses only,
and the connection goes to the address that was checked. The real LNURL test server runs
on 127.0.0.1, the address's own host, which stays allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nodeprov.core.expiry import ExpiryRefunder
from nodeprov.core.ledger import OPERATOR
from nodeprov.core.lnurl import LnurlError, lnurl_client, public_address, request_invoice, resolve
from nodeprov.core.payments import api_key_account
from nodeprov.daemon import Core
from nodeprov.payouts import payout_now
from tests.support.daemon_core import make_core, write_config
from tests.support.drip_server import drip_server
from tests.support.lnurl_server import LnurlServer
from tests.support.services import MintHandle

pytestmark = pytest.mark.integration


@pytest.fixture
def lnurl(mint: MintHandle) -> Iterator[LnurlServer]:
    server = LnurlServer(mint.url).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def other(mint: MintHandle) -> Iterator[LnurlServer]:
    """A second LNURL server: the place a hostile redirect or callback points to."""
    server = LnurlServer(mint.url).start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with lnurl_client(5.0) as client:
        yield client


async def test_a_redirect_on_the_same_host_is_followed(
    lnurl: LnurlServer, http: httpx.AsyncClient
) -> None:
    lnurl.redirect_next = f"http://127.0.0.1:{lnurl.port}/.well-known/lnurlp/{{user}}?moved=1"
    request = await resolve(http, lnurl.address("alice"))
    assert request.callback.endswith("/lnurlp/cb/alice")
    assert [r.split("?")[0] for r in lnurl.requests] == ["/.well-known/lnurlp/alice"] * 2
    invoice = await request_invoice(http, request, 5000)
    assert invoice.startswith("ln")


@pytest.mark.parametrize(
    "target",
    [
        "http://localhost:{other}/.well-known/lnurlp/{{user}}",  # another name for loopback
        "http://10.1.2.3/.well-known/lnurlp/{{user}}",  # a private address
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "https://example.com/.well-known/lnurlp/{{user}}",  # any other host
    ],
)
async def test_a_redirect_to_another_host_is_not_followed(
    lnurl: LnurlServer, other: LnurlServer, http: httpx.AsyncClient, target: str
) -> None:
    lnurl.redirect_next = target.format(other=other.port)
    with pytest.raises(LnurlError, match="redirected to another host"):
        await resolve(http, lnurl.address("alice"))
    assert other.requests == []


async def test_a_callback_on_another_name_for_a_loopback_address_is_refused(
    lnurl: LnurlServer, other: LnurlServer, http: httpx.AsyncClient
) -> None:
    lnurl.callback_base = f"http://localhost:{other.port}"
    request = await resolve(http, lnurl.address("alice"))
    with pytest.raises(LnurlError, match="not a public address"):
        await request_invoice(http, request, 5000)
    assert other.requests == [] and other.invoices == []


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254",
     "100.64.0.1", "0.0.0.0", "::ffff:127.0.0.1", "fc00::1", "fe80::1", "224.0.0.1"],
)  # fmt: skip
async def test_private_loopback_and_special_addresses_are_not_public(host: str) -> None:
    with pytest.raises(LnurlError, match="not a public address"):
        await public_address(host, 443)


async def test_a_public_address_is_returned_for_pinning() -> None:
    assert await public_address("8.8.8.8", 443) == "8.8.8.8"
    assert await public_address("2001:4860:4860::8888", 443) == "2001:4860:4860::8888"


async def test_payout_and_refund_refuse_a_redirect_to_another_host(
    tmp_path: Path, mint: MintHandle, lnurl: LnurlServer, other: LnurlServer, make_token
) -> None:
    core: Core = await make_core(write_config(tmp_path, mint.url))
    try:
        await core.wallet.receive(await make_token(100, mint=mint), OPERATOR, "operator")
        hostile = f"http://localhost:{other.port}/.well-known/lnurlp/{{user}}"
        lnurl.redirect_next = hostile
        with pytest.raises(LnurlError, match="redirected to another host"):
            await payout_now(core, lnurl.address("op"))
        operator = await core.ledger.account(OPERATOR)
        assert operator is not None and operator.balance_msat == 100_000

        api_key, _ = await core.payments.create_key(
            await make_token(50, mint=mint),
            expires_at=int(time.time()) - 1,
            refund_address=lnurl.address("alice"),
        )
        lnurl.redirect_next = hostile
        (result,) = await ExpiryRefunder(core.wallet, private_hosts=True).round()
        assert result.state == "failed" and "redirected to another host" in (result.error or "")
        account = await core.ledger.account(api_key_account(api_key))
        assert account is not None and account.balance_msat == 50_000
        assert other.requests == []
        assert (await core.ledger.audit()).ok
    finally:
        await core.close()


async def test_a_dripping_lnurl_server_is_cut_off_at_the_request_deadline() -> None:
    """Each byte comes within the read timeout, the answer never ends: one deadline in all."""
    async with drip_server() as port, lnurl_client(1.0) as client:
        # The outer wait only turns a hang into a failure; the error is what is asserted.
        with pytest.raises(LnurlError, match="did not answer within 1 s"):
            await asyncio.wait_for(resolve(client, f"alice@127.0.0.1:{port}"), 60)


@pytest.mark.parametrize("announced", [True, False])
async def test_an_lnurl_answer_larger_than_the_cap_is_refused(announced: bool) -> None:
    big = b'{"tag": "payRequest", "padding": "' + b"x" * 64 * 1024 + b'"}'  # over the 64 KiB cap

    async def serve_big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if announced:
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(big) + big)
        else:  # chunked: the size is known only while reading
            writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for start in range(0, len(big), 4096):
                part = big[start : start + 4096]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            writer.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve_big, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with lnurl_client(5.0) as client:
            with pytest.raises(LnurlError, match="bytes"):
                await resolve(client, f"alice@127.0.0.1:{port}")
    finally:
        server.close()
