"""Smoke tests of the test bed itself: real mints, real relay, real tokens, the TCP proxy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import nostr_sdk as ns
import pytest
import websockets

from tests.conftest import TokenFactoryMaker, TokenMaker
from tests.support.services import MintHandle, RelayHandle
from tests.support.tcp_proxy import TcpProxy, dead_url

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

_LOOPS: list[asyncio.AbstractEventLoop] = []


async def _get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        return await client.get(url, **kwargs)


# ----------------------------------------------------------------------------------- loop


async def test_loop_scope_is_session_a() -> None:
    _LOOPS.append(asyncio.get_running_loop())


async def test_loop_scope_is_session_b() -> None:
    _LOOPS.append(asyncio.get_running_loop())
    assert len(_LOOPS) == 2
    assert _LOOPS[0] is _LOOPS[1], "asyncio_default_test_loop_scope=session is not in effect"


# ---------------------------------------------------------------------------- cashu import

_IMPORT_CHECK = """
import os, sys
before = dict(os.environ)
from tests.support.cashu_client import import_cashu
import_cashu()
from cashu.core.settings import settings
assert dict(os.environ) == before, set(os.environ) ^ set(before)
assert not hasattr(sys, "tracebacklimit"), sys.tracebacklimit
assert "FROM_DOTENV" not in os.environ
assert settings.cashu_dir != "/dotenv/cashu", settings.cashu_dir
print("ok")
"""


def test_cashu_import_side_effects_are_contained(tmp_path: Path) -> None:
    """A stray ./.env or ~/.cashu/.env must not leak into the tests' environment."""
    (tmp_path / ".env").write_text("FROM_DOTENV=1\nCASHU_DIR=/dotenv/cashu\n")
    (tmp_path / ".cashu").mkdir()
    (tmp_path / ".cashu" / ".env").write_text("FROM_DOTENV=2\nCASHU_DIR=/dotenv/cashu\n")
    env = {k: v for k, v in os.environ.items() if k != "DEBUG"}
    env.update({"HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------- mints


@pytest.mark.parametrize("which,fee", [("mint", 0), ("fee_mint", 100)])
async def test_mint_info_and_keysets(request: pytest.FixtureRequest, which: str, fee: int) -> None:
    handle: MintHandle = request.getfixturevalue(which)
    assert handle.url.startswith("http://127.0.0.1:")
    info = (await _get(f"{handle.url}/v1/info")).json()
    assert info["version"].startswith("Nutshell/0.20")
    keysets = (await _get(f"{handle.url}/v1/keysets")).json()["keysets"]
    active = {k["unit"]: k for k in keysets if k["active"]}
    assert set(active) >= {"sat", "msat"}
    assert {k["input_fee_ppk"] for k in active.values()} == {fee}


@pytest.mark.parametrize("unit", ["sat", "msat"])
@pytest.mark.parametrize("version,prefix", [(4, "cashuB"), (3, "cashuA")])
async def test_make_token(
    make_token: TokenMaker, mint: MintHandle, unit: str, version: int, prefix: str
) -> None:
    amount = 21 if unit == "sat" else 21_500
    token = await make_token(amount, unit=unit, mint=mint, version=version)
    assert token.startswith(prefix)
    from tests.support.cashu_client import import_cashu

    parsed = import_cashu().deserialize_token_from_string(token)
    assert parsed.amount == amount
    assert parsed.unit == unit
    assert parsed.mint.rstrip("/") == mint.url
    states = await make_token.proof_states(token)
    assert states and set(states) == {"UNSPENT"}


async def test_redeem_spends_the_token(make_token: TokenMaker, mint: MintHandle) -> None:
    token = await make_token(64, mint=mint)
    assert await make_token.redeem(token) == 64
    assert set(await make_token.proof_states(token)) == {"SPENT"}
    with pytest.raises(Exception, match=r"(?i)spent"):
        await make_token.redeem(token)


async def test_fee_mint_tokens_are_exact_and_redeem_pays_fees(
    make_token: TokenMaker, fee_mint: MintHandle
) -> None:
    for unit, amount in (("sat", 100), ("msat", 5_000)):
        token = await make_token(amount, unit=unit, mint=fee_mint)
        from tests.support.cashu_client import import_cashu

        parsed = import_cashu().deserialize_token_from_string(token)
        assert parsed.amount == amount
        n_proofs = len(parsed.proofs)
        fee = (n_proofs * 100 + 999) // 1000
        assert await make_token.redeem(token) == amount - fee


async def test_many_tokens_are_distinct(make_token: TokenMaker, fee_mint: MintHandle) -> None:
    # No stopwatch here: how fast 50 tokens are made depends on the machine's load.
    tokens = [await make_token(1 + i, mint=fee_mint) for i in range(50)]
    assert len(set(tokens)) == 50


async def test_token_factory_has_its_own_wallet(
    token_factory: TokenFactoryMaker, mint: MintHandle
) -> None:
    factory = token_factory(mint, "msat")
    tokens = await asyncio.gather(*(factory.token(1234) for _ in range(5)))  # concurrent use
    assert len(set(tokens)) == 5
    assert set(await factory.proof_states(tokens[0])) == {"UNSPENT"}
    assert await factory.redeem(tokens[0]) == 1234
    assert set(await factory.proof_states(tokens[0])) == {"SPENT"}


# ---------------------------------------------------------------------------------- relay


def _signed_event(content: str, kind: int = 1) -> dict[str, Any]:
    event = ns.EventBuilder(ns.Kind(kind), content).finalize(ns.Keys.generate())
    data: dict[str, Any] = json.loads(event.as_json())
    return data


async def _publish(url: str, event: dict[str, Any]) -> list[Any]:
    async with websockets.connect(url, max_size=2**22) as ws:
        await ws.send(json.dumps(["EVENT", event]))
        reply: list[Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
        return reply


async def _query(url: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
    sub = uuid.uuid4().hex[:8]
    events: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=2**22) as ws:
        await ws.send(json.dumps(["REQ", sub, filters]))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if msg[0] == "EOSE":
                assert msg[1] == sub
                return events
            assert msg[0] == "EVENT" and msg[1] == sub, msg
            events.append(msg[2])


async def test_relay_req_eose_and_large_event(relay: RelayHandle) -> None:
    assert relay.url.startswith("ws://127.0.0.1:")
    assert await _query(relay.url, {"kinds": [1], "limit": 1, "authors": ["00" * 32]}) == []
    event = _signed_event("x" * 100_000)  # a gift-wrap sized event; default limit is 4096
    reply = await _publish(relay.url, event)
    assert reply[:3] == ["OK", event["id"], True], reply
    found = await _query(relay.url, {"ids": [event["id"]]})
    assert [e["id"] for e in found] == [event["id"]]


async def test_relay_nip11(relay: RelayHandle) -> None:
    doc = (await _get(relay.http_url, headers={"Accept": "application/nostr+json"})).json()
    assert 1 in doc["supported_nips"]


async def test_relay_stop_and_start_on_same_port(relay: RelayHandle) -> None:
    event = _signed_event("survives a restart")
    assert (await _publish(relay.url, event))[2] is True
    url = relay.url
    async with websockets.connect(url) as ws:
        relay.stop()
        assert not relay.running
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    with pytest.raises(OSError):
        await websockets.connect(url, open_timeout=2)
    relay.start()
    assert relay.url == url
    found = await _query(url, {"ids": [event["id"]]})
    assert [e["id"] for e in found] == [event["id"]]


async def test_shared_relay_was_restarted(relay: RelayHandle) -> None:
    relay.stop()  # the next test that uses `relay` must find it running again


async def test_shared_relay_is_running_again(relay: RelayHandle) -> None:
    assert relay.running
    assert await _query(relay.url, {"limit": 1, "authors": ["00" * 32]}) == []


async def test_private_relay_rejects_too_large(relay_factory: Any) -> None:
    private: RelayHandle = relay_factory(max_event_size=65536)
    reply = await _publish(private.url, _signed_event("y" * 70_000))
    # nostr-relay 1.14 quirk: a rejected EVENT gets ["OK", "", false, reason] -- the event id
    # is EMPTY -- and only after a 2 s throttle that doubles with each rejection on the socket.
    assert reply[0] == "OK" and reply[1] == "" and reply[2] is False, reply
    assert "280 characters" in reply[3]


# ---------------------------------------------------------------------------------- proxy


async def test_slow_proxy_delays(mint: MintHandle, tcp_proxy: Any) -> None:
    proxy: TcpProxy = tcp_proxy(mint.url, delay=0.4)
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        started = time.monotonic()
        assert (await client.get(f"{proxy.url}/v1/info")).status_code == 200
        assert time.monotonic() - started >= 0.4  # a lower bound: load only adds to it
        # Far beyond the client's timeout, then off again: the knob acts at once. (Not a
        # stopwatch bound like "answers within 0.3 s", which a busy machine breaks.)
        proxy.delay = 60.0
        with pytest.raises(httpx.TimeoutException):
            await client.get(f"{proxy.url}/v1/keysets", timeout=0.5)
        proxy.delay = 0.0
        assert (await client.get(f"{proxy.url}/v1/keysets")).status_code == 200


async def test_proxy_pause_resume_refuse(mint: MintHandle, tcp_proxy: Any) -> None:
    proxy: TcpProxy = tcp_proxy(mint.url)
    # A short timeout only where the proxy stalls for ever; the requests that must succeed get
    # a long one (0.5 s for a real mint round trip fails by chance on a busy machine).
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        proxy.pause()  # stall
        with pytest.raises(httpx.TimeoutException):
            await client.get(f"{proxy.url}/v1/info", timeout=0.5)
        proxy.resume()
        assert (await client.get(f"{proxy.url}/v1/info")).status_code == 200
        proxy.pause(refuse=True)
        proxy.drop_connections()
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{proxy.url}/v1/info")
        proxy.resume()
        assert (await client.get(f"{proxy.url}/v1/info")).status_code == 200


def test_proxy_works_from_a_blocking_test(mint: MintHandle, tcp_proxy: Any) -> None:
    proxy: TcpProxy = tcp_proxy(mint.url, connect_delay=0.2)
    started = time.monotonic()
    response = httpx.get(f"{proxy.url}/v1/info", trust_env=False, timeout=5)
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.2


async def test_dead_url_refuses() -> None:
    url = dead_url()
    # Refused, not timed out (that would be httpx.ConnectTimeout): no stopwatch needed.
    with pytest.raises(httpx.ConnectError):
        await _get(f"{url}/v1/info")
