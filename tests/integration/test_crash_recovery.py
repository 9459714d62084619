"""kill -9 a worker at each step of the wallet journal; recovery credits once and loses nothing.

The worker talks to the real mint through a TCP proxy the test controls, which lets the test
stop the world at a chosen step:

- ``journalled``: the op is written as pending, the swap request never reaches the mint;
- ``at_mint``: the mint has done the swap, its answer never reaches the worker;
- ``committed``: the op finished and was committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from nodeprov.core.melt import Melter
from nodeprov.core.mint_api import MintApi
from nodeprov.core.payments import api_key_account
from nodeprov.core.wallet import hash_to_curve_hex
from nodeprov.errors import TokenAlreadySpent
from nodeprov.protocol.cashu_token import parse_token
from tests.support.core import Core, build_core
from tests.support.ledger_backends import env_for, query
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("ledger_backend")


class Worker:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.crash_worker", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            env=env_for(Path(args[0])),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"worker did not start: {line!r}"

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_done(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "done"

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def pending_ops(db: Path) -> int:
    return int(query(db, "SELECT COUNT(*) FROM wallet_ops WHERE state = 'pending'")[0][0])


async def wait_inputs_spent(db: Path, mint: MintHandle) -> None:
    """Until the mint reports the pending op's input proofs spent (it did the swap)."""
    inputs = json.loads(query(db, "SELECT inputs FROM wallet_ops WHERE state = 'pending'")[0][0])
    ys = [hash_to_curve_hex(p["secret"]) for p in inputs]
    async with httpx.AsyncClient() as client:
        api = MintApi(mint.url, client)
        for _ in range(200):
            if set(await api.check_state(ys)) == {"SPENT"}:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the mint never did the swap")


async def crash_at(step: str, worker: Worker, proxy: TcpProxy, db: Path, mint: MintHandle) -> None:
    """Let ``worker`` run its operation up to ``step`` through ``proxy``, then kill -9 it."""
    try:
        if step == "journalled":
            proxy.pause()
            proxy.drop_connections()
        elif step == "at_mint":
            proxy.response_delay = 60.0
        worker.go()
        if step == "committed":
            await asyncio.to_thread(worker.wait_done)
        else:
            wait_until(lambda: pending_ops(db) == 1)
            if step == "at_mint":
                await wait_inputs_spent(db, mint)
                assert pending_ops(db) == 1
            else:
                await asyncio.sleep(0.3)
        worker.kill()
    finally:
        worker.close()
        # A request still stalled in the proxy must not reach the mint after the crash.
        proxy.drop_connections()
        proxy.resume()


async def states(make_token, token: str) -> set[str]:
    return set(await make_token.proof_states(token))


EXPECTED_RECOVERY: dict[tuple[str, str], dict[str, int]] = {
    ("receive", "journalled"): {"failed": 1},
    ("receive", "at_mint"): {"done": 1},
    ("create", "journalled"): {"failed": 1},
    ("create", "at_mint"): {"done": 1},
    ("send", "journalled"): {"failed": 1},
    ("send", "at_mint"): {"reversed": 1},
}


async def recovered_core(db: Path, mint: MintHandle, kind: str, step: str) -> Core:
    core = await build_core(db, [mint.url])
    outcome = await core.wallet.recover()
    assert outcome == EXPECTED_RECOVERY.get((kind, step), {})
    return core


@pytest.mark.parametrize("step", ["journalled", "at_mint", "committed"])
async def test_receive_survives_kill_at_each_step(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy, step: str
) -> None:
    db = tmp_path / "ledger.sqlite3"
    await (await build_core(db, [mint.url])).close()  # schema in place before the worker starts
    token = await make_token(100, mint=mint)
    proxy: TcpProxy = tcp_proxy(mint.url)
    worker = Worker([str(db), mint.url, proxy.url, "receive", token, "key:crash"])
    await crash_at(step, worker, proxy, db, mint)
    if step == "journalled":
        assert await states(make_token, token) == {"UNSPENT"}

    core = await recovered_core(db, mint, "receive", step)
    try:
        assert pending_ops(db) == 0
        account = await core.ledger.account("key:crash")
        credited = account.balance_msat if account else 0
        if step == "journalled":
            # The mint never saw the swap: nothing credited, the user still holds the token,
            # and it can be offered again and is credited exactly once.
            assert credited == 0
            assert await states(make_token, token) == {"UNSPENT"}
            await core.wallet.receive(token, "key:crash", "api_key")
        account = await core.ledger.account("key:crash")
        assert account is not None and account.balance_msat == 100_000
        with pytest.raises(TokenAlreadySpent):
            await core.wallet.receive(token, "key:crash", "api_key")
        assert await states(make_token, token) == {"SPENT"}
        await core.assert_books_balance()
    finally:
        await core.close()


def receive_op_account(db: Path) -> str:
    return str(query(db, "SELECT account_id FROM wallet_ops WHERE kind = 'receive'")[0][0])


@pytest.mark.parametrize("step", ["journalled", "at_mint", "committed"])
async def test_create_again_after_kill_returns_the_same_key_with_its_balance(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy, step: str
) -> None:
    """The client of ``/v1/wallet/create`` lost the answer (the node died after the swap, or
    the reply never arrived): creating again with the same token gives the same key, funded."""
    db = tmp_path / "ledger.sqlite3"
    await (await build_core(db, [mint.url])).close()
    token = await make_token(100, mint=mint)
    proxy: TcpProxy = tcp_proxy(mint.url)
    worker = Worker([str(db), mint.url, proxy.url, "create", token])
    await crash_at(step, worker, proxy, db, mint)
    first_account = receive_op_account(db)  # the key the first create made (never delivered)

    core = await recovered_core(db, mint, "create", step)
    try:
        assert pending_ops(db) == 0
        key, account = await core.payments.create_key(token)
        assert api_key_account(key) == first_account
        assert account.balance_msat == 100_000
        again, account = await core.payments.create_key(token)
        assert again == key and account.balance_msat == 100_000
        assert await states(make_token, token) == {"SPENT"}
        # Spent down, the key still answers with what is left (the token is its credential).
        await core.payments.withdraw(api_key_account(key), 40_000)
        third, account = await core.payments.create_key(token)
        assert third == key and account.balance_msat == 60_000
        await core.assert_books_balance()
    finally:
        await core.close()


@pytest.mark.parametrize("step", ["journalled", "at_mint", "committed"])
async def test_send_survives_kill_at_each_step(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy, step: str
) -> None:
    db = tmp_path / "ledger.sqlite3"
    core = await build_core(db, [mint.url])
    await core.wallet.receive(await make_token(64, mint=mint), "key:s", "api_key")
    # Use up the 1-sat proofs so the next 1-sat send needs a swap at the mint.
    for _ in range(2):
        await core.wallet.send("key:s", 1000, mint_url=mint.url, unit="sat")
    await core.close()

    proxy: TcpProxy = tcp_proxy(mint.url)
    worker = Worker([str(db), mint.url, proxy.url, "send", "1000", "key:s", "sat"])
    await crash_at(step, worker, proxy, db, mint)

    core = await recovered_core(db, mint, "send", step)
    try:
        assert pending_ops(db) == 0
        account = await core.ledger.account("key:s")
        assert account is not None
        if step == "committed":
            # The token was issued (and would have reached the user): the debit stands.
            assert account.balance_msat == 61_000
        else:
            # The user never got a token: the account has its money back, less any mint fee.
            assert account.balance_msat == 62_000
        await core.assert_books_balance()
        # Whatever happened, the pool still pays out everything the books say it holds.
        sent = await core.wallet.send("key:s", account.balance_msat, mint_url=mint.url, unit="sat")
        assert await make_token.redeem(sent.token) == account.balance_msat // 1000
        assert len(parse_token(sent.token).proofs) >= 1
        await core.assert_books_balance()
    finally:
        await core.close()


@pytest.mark.parametrize("step", ["journalled", "at_mint", "committed"])
async def test_melt_survives_kill_at_each_step(
    tmp_path: Path, mint: MintHandle, fee_mint: MintHandle, make_token, tcp_proxy, step: str
) -> None:
    db = tmp_path / "ledger.sqlite3"
    core = await build_core(db, [mint.url])
    await core.wallet.receive(await make_token(200, mint=mint), "operator", "operator")
    await core.close()
    async with httpx.AsyncClient() as client:  # an invoice from another mint: an outside payee
        bolt11 = str((await MintApi(fee_mint.url, client).mint_quote(50, "sat"))["request"])

    proxy: TcpProxy = tcp_proxy(mint.url)
    worker = Worker([str(db), mint.url, proxy.url, "melt", bolt11, "operator"])
    await crash_at(step, worker, proxy, db, mint)

    core = await build_core(db, [mint.url])
    try:
        outcome = await Melter(core.wallet).recover()
        expected = {"journalled": {"unpaid": 1}, "at_mint": {"paid": 1}, "committed": {}}
        assert outcome == expected[step]
        assert pending_ops(db) == 0
        operator = await core.ledger.account("operator")
        assert operator is not None
        if step == "journalled":
            assert operator.balance_msat == 200_000  # nothing paid, nothing charged
        else:
            assert 150_000 - 10_000 <= operator.balance_msat <= 150_000
        await core.assert_books_balance()
    finally:
        await core.close()


# --- DM jobs: kill -9 between the settle and the "done" record ------------------------


@pytest.mark.parametrize("pay", ["npub", "x_cashu", "plain_text"])
async def test_dm_job_killed_between_settle_and_done_is_charged_once_on_resume(
    tmp_path: Path, mint: MintHandle, make_token, pay: str
) -> None:
    from tests.support.crash_worker import dm_context, dm_reply
    from tests.support.fake_upstream import FakeUpstream, expected_usage
    from tests.support.nostr_client import CHAT_MODEL, MODELS, chat_cost

    db = tmp_path / "ledger.sqlite3"
    sender, event_id = secrets.token_hex(32), secrets.token_hex(32)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello node"}]}
    body["max_tokens"] = 8
    token = await make_token(30 if pay == "x_cashu" else 40, mint=mint)
    if pay == "plain_text":
        text = "hello node"
    else:
        msg = {"type": "request", "id": "r1", "endpoint": "/v1/chat/completions", "body": body}
        if pay == "x_cashu":
            msg["cashu"] = token
        text = json.dumps(msg)
    with FakeUpstream(models=MODELS) as upstream:
        core, ctx = await dm_context(db, mint.url, upstream.url)
        if pay != "x_cashu":
            await core.wallet.receive(token, "npub:" + sender, "npub")
        await ctx.upstreams.aclose()
        await core.close()

        worker = Worker([str(db), mint.url, mint.url, "dm", upstream.url, sender, event_id, text])
        try:
            worker.go()
            assert worker.proc.stdout is not None
            assert await asyncio.to_thread(worker.proc.stdout.readline) == "settled\n"
            worker.kill()
        finally:
            worker.close()
        assert len(upstream.requests) == 1

        # The next run finds the event accepted but not done, and resumes it.
        core, ctx = await dm_context(db, mint.url, upstream.url)
        try:
            row = await ctx.store.get(event_id)
            assert row is not None and row.state == "accepted"
            reply = await dm_reply(ctx, sender, text, event_id, resumed=True)
            assert len(upstream.requests) == 1  # the job is not run (nor paid) again
            cost = chat_cost(expected_usage(body if pay != "plain_text" else {
                "messages": [{"role": "user", "content": text}]}))  # fmt: skip
            operator = await core.ledger.account("operator")
            assert operator is not None
            if pay == "x_cashu":
                data = json.loads(reply)
                assert data["type"] == "response" and data["cost_msat"] == cost, data
                assert await make_token.redeem(data["change"]) == 30 - -(-cost // 1000)
                assert operator.balance_msat == 1000 * -(-cost // 1000)
            else:
                account = await core.ledger.account("npub:" + sender)
                assert account is not None and account.balance_msat == 40_000 - cost
                assert operator.balance_msat == cost
                if pay == "npub":
                    data = json.loads(reply)
                    assert data["cost_msat"] == cost and data["balance_msat"] == 40_000 - cost
                else:
                    assert "cost" in reply and "(no answer)" not in reply, reply
            await core.assert_books_balance()
        finally:
            await ctx.upstreams.aclose()
            await core.close()


@pytest.mark.parametrize("pay", ["npub", "x_cashu"])
async def test_dm_job_killed_mid_upstream_call_resumes_without_waiting_for_its_lease(
    tmp_path: Path, mint: MintHandle, make_token, pay: str
) -> None:
    """The dead run's hold is still within its lease; the resumed job releases it, pays once."""
    from tests.support.crash_worker import dm_context, dm_reply
    from tests.support.fake_upstream import FakeUpstream, expected_usage
    from tests.support.nostr_client import HELD_MODEL, MODELS, chat_cost

    db = tmp_path / "ledger.sqlite3"
    sender, event_id = secrets.token_hex(32), secrets.token_hex(32)
    body = {"model": HELD_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    msg = {"type": "request", "id": "r1", "endpoint": "/v1/chat/completions", "body": body}
    token = await make_token(2, mint=mint)  # enough for one hold, not for two
    if pay == "x_cashu":
        msg["cashu"] = token
    text = json.dumps(msg)
    with FakeUpstream(models=MODELS) as upstream:
        core, ctx = await dm_context(db, mint.url, upstream.url)
        assert 1000 < core.pricer.max_cost(HELD_MODEL, body).total_msat <= 2000 // 2 + 1000
        if pay == "npub":
            await core.wallet.receive(token, "npub:" + sender, "npub")
        await ctx.upstreams.aclose()
        await core.close()

        worker = Worker([str(db), mint.url, mint.url, "dm", upstream.url, sender, event_id, text])
        # The upstream holds the call until the kill: waiting for the hold and then killing
        # raced a 2 s slow model (a stalled test process let the job finish first).
        upstream.close_gate()
        try:
            worker.go()
            wait_until(lambda: upstream.held_arrivals == 1)  # the upstream call is under way
            # A token's swap runs beside the upstream call: wait for its hold as well.
            wait_until(lambda: open_holds(db) == 1)
            worker.kill()
        finally:
            worker.close()
            upstream.open_gate()

        core, ctx = await dm_context(db, mint.url, upstream.url)
        try:
            assert open_holds(db) == 1  # its lease has not lapsed
            data = json.loads(await dm_reply(ctx, sender, text, event_id, resumed=True))
            assert data["type"] == "response", data
            cost = chat_cost(expected_usage(body))
            assert data["cost_msat"] == cost
            assert open_holds(db) == 0
            operator = await core.ledger.account("operator")
            assert operator is not None
            if pay == "npub":
                assert data["balance_msat"] == 2_000 - cost
                assert operator.balance_msat == cost
            else:
                change = 2 - -(-cost // 1000)  # 0 here: the whole token pays
                assert data["change"] is None and change == 0
                assert operator.balance_msat == 2_000
            await core.assert_books_balance()
        finally:
            await ctx.upstreams.aclose()
            await core.close()


def open_holds(db: Path) -> int:
    return int(query(db, "SELECT COUNT(*) FROM holds")[0][0])


@pytest.mark.parametrize("step", ["journalled", "at_mint"])
async def test_dm_job_killed_while_its_swap_runs_beside_the_upstream_call_pays_once(
    tmp_path: Path, mint: MintHandle, make_token, tcp_proxy: Callable[..., TcpProxy], step: str
) -> None:
    """The token's swap overlaps the upstream call; kill -9 with both in flight. Start-up
    recovery settles the swap (never reached the mint: the token is the sender's again;
    done at the mint: credited once) and the resumed job pays once, with the right change."""
    from tests.support.crash_worker import dm_context, dm_reply
    from tests.support.fake_upstream import FakeUpstream, expected_usage
    from tests.support.nostr_client import CHAT_MODEL, MODELS, chat_cost

    db = tmp_path / "ledger.sqlite3"
    sender, event_id = secrets.token_hex(32), secrets.token_hex(32)
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    token = await make_token(30, mint=mint)
    msg = {"type": "request", "id": "r1", "endpoint": "/v1/chat/completions", "body": body}
    text = json.dumps({**msg, "cashu": token})
    proxy = tcp_proxy(mint.url)
    with FakeUpstream(models=MODELS) as upstream:
        upstream.behaviour.held = True
        core, ctx = await dm_context(db, mint.url, upstream.url)  # the schema, before the worker
        await ctx.upstreams.aclose()
        await core.close()
        worker = Worker([str(db), mint.url, proxy.url, "dm", upstream.url, sender, event_id, text])
        upstream.close_gate()
        try:
            if step == "journalled":
                proxy.drop_connections()
                proxy.pause()
            else:
                proxy.response_delay = 60.0
            worker.go()
            wait_until(lambda: upstream.held_arrivals == 1 and pending_ops(db) == 1)
            if step == "at_mint":
                await wait_inputs_spent(db, mint)
            assert open_holds(db) == 0  # the swap has not landed: nothing is held yet
            worker.kill()
        finally:
            worker.close()
            proxy.drop_connections()
            proxy.response_delay = 0.0
            proxy.resume()
            upstream.open_gate()
        upstream.behaviour.held = False

        core, ctx = await dm_context(db, mint.url, upstream.url)
        try:
            expected = {"journalled": {"failed": 1}, "at_mint": {"done": 1}}[step]
            assert await core.wallet.recover() == expected
            data = json.loads(await dm_reply(ctx, sender, text, event_id, resumed=True))
            assert data["type"] == "response", data
            cost = chat_cost(expected_usage(body))
            assert data["cost_msat"] == cost
            assert await make_token.redeem(data["change"]) == 30 - -(-cost // 1000)
            operator = await core.ledger.account("operator")
            assert operator is not None and operator.balance_msat == 1000 * -(-cost // 1000)
            assert open_holds(db) == 0
            await core.assert_books_balance()
        finally:
            await ctx.upstreams.aclose()
            await core.close()
