"""Two processes on one PostgreSQL ledger finish, undo or pay from the same books at once.

SQLite's one writer ran every write transaction alone; PostgreSQL runs them side by side
(READ COMMITTED). Each test builds two cores on one database (two processes, as workers and
the leader are) and makes them meet where a row's state decides what is written: a test
connection holds the pool's ``assets`` row, so both transactions get as far as they can
before either commits, and is let go only once both wait on a lock. Orderings come from
those locks (read from ``pg_stat_activity``), never from timing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from nodeprov.core import journal, liabilities
from nodeprov.core.db import Conn
from nodeprov.core.denominations import complete_split
from nodeprov.core.ledger import OPERATOR, debit
from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.core.melt import Melter
from nodeprov.core.wallet import Received, Wallet
from nodeprov.errors import InsufficientBalance
from nodeprov.payouts import reconcile
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.integration.test_melt import invoice
from tests.support.core import Core, Rerouting, build_core
from tests.support.daemon_core import make_core, write_config
from tests.support.ledger_backends import ledger_target, query
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy

# PostgreSQL only: with SQLite a second writer cannot start before the first commits.
pytestmark = pytest.mark.parametrize("ledger_backend", ["postgresql"], indirect=True)

STUCK_SECONDS = 30.0


@pytest.fixture
async def two_cores(
    ledger_backend: str, tmp_path: Path, mint: MintHandle, make_token: Any
) -> AsyncIterator[tuple[Core, Core, Path]]:
    """Two cores on one database whose sat pool already has an ``assets`` row."""
    db = tmp_path / "shared.sqlite3"
    one = await build_core(db, [mint.url])
    two = await build_core(db, [mint.url])
    try:
        await one.wallet.receive(await make_token(16, mint=mint), "key:seed", "api_key")
        yield one, two, db
        assert (await one.ledger.audit()).ok
    finally:
        await one.close()
        await two.close()


@contextlib.contextmanager
def rows_held(db: Path, sql: str, params: tuple[Any, ...]) -> Iterator[None]:
    """Lock the rows ``sql`` selects (as a slow transaction would) until the block ends."""
    target = ledger_target(db)
    assert isinstance(target, str)
    with psycopg.connect(target) as conn:
        conn.execute(sql + " FOR UPDATE", params)
        yield
        conn.rollback()


def pool_row_held(db: Path, mint_url: str) -> contextlib.AbstractContextManager[None]:
    """The sat pool's ``assets`` row, locked until the block ends."""
    sql = "SELECT value_msat FROM assets WHERE mint_url = %s AND unit = 'sat'"
    return rows_held(db, sql, (mint_url,))


def waiting_on_locks(db: Path) -> int:
    rows = query(
        db,
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()",
    )
    return int(rows[0][0])


async def both_at_once(
    db: Path,
    mint_url: str,
    *work: Callable[[], Awaitable[Any]],
    held: contextlib.AbstractContextManager[None] | None = None,
) -> list[Any]:
    """Run ``work`` in order, each started once the one before waits on a lock, while the
    pool row (or ``held``) is held; let go once all of them wait."""
    with held or pool_row_held(db, mint_url):
        tasks: list[asyncio.Future[Any]] = []
        for step in work:
            tasks.append(asyncio.ensure_future(step()))
            await until(lambda: waiting_on_locks(db) >= len(tasks) or tasks[-1].done())
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def until(check: Callable[[], bool]) -> None:
    """Yield to the loop until ``check()`` holds (the test's hang guard bounds it)."""
    for _ in range(int(STUCK_SECONDS * 100)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the transactions never met")


async def pending_receive(wallet: Wallet, token: str, account_id: str) -> tuple[int, list[Any]]:
    """A receive journalled ``pending`` whose swap the mint has done: (op id, signatures).

    What a process leaves when it dies between the mint's answer and its own commit.
    """
    offer = await wallet.appraise(token)
    keyset = await wallet.active_keyset(offer.mint_url, offer.unit)
    outputs = wallet.make_outputs(keyset, complete_split(offer.value), "keep")
    async with wallet.ledger.db.write() as conn:
        await conn.execute(
            "INSERT INTO accounts (id, kind, created_at) VALUES (?, 'api_key', 0)", (account_id,)
        )
        op_id = await journal.insert_op(
            conn, kind="receive", mint_url=offer.mint_url, unit=offer.unit,
            account_id=account_id, amount=offer.token.amount, fee=offer.fee,
            fingerprint=token_fingerprint(offer.token), inputs=offer.inputs, outputs=outputs,
        )  # fmt: skip
    signatures = await wallet.api(offer.mint_url).swap(
        [p.to_wire() for p in offer.inputs], [o.to_wire() for o in outputs]
    )
    return op_id, list(signatures)


async def balance(core: Core, account_id: str) -> int:
    account = await core.ledger.account(account_id)
    assert account is not None
    return account.balance_msat


async def test_a_receive_finished_by_two_processes_at_once_is_credited_once(
    two_cores: tuple[Core, Core, Path], mint: MintHandle, make_token: Any
) -> None:
    one, two, db = two_cores
    op_id, signatures = await pending_receive(one.wallet, await make_token(8, mint=mint), "key:x")
    results = await both_at_once(
        db,
        mint.url,
        lambda: one.wallet._finish_receive(op_id, signatures),
        lambda: two.wallet._finish_receive(op_id, signatures),
    )
    assert results == [None, None]
    assert await balance(one, "key:x") == 8_000
    assert (await one.wallet.op(op_id)).state == "done"


async def test_a_receive_finished_here_and_failed_there_stays_finished(
    two_cores: tuple[Core, Core, Path], mint: MintHandle, make_token: Any
) -> None:
    """Recovery that gives up on an op another process is finishing must not undo it."""
    one, two, db = two_cores
    op_id, signatures = await pending_receive(one.wallet, await make_token(8, mint=mint), "key:x")
    await both_at_once(
        db,
        mint.url,
        lambda: one.wallet._finish_receive(op_id, signatures),
        lambda: two.wallet._fail_receive(op_id, spent=False, error="gave up"),
    )
    assert (await one.wallet.op(op_id)).state == "done"
    assert await balance(one, "key:x") == 8_000


async def test_a_funding_quote_minted_by_two_processes_at_once_is_credited_once(
    two_cores: tuple[Core, Core, Path], mint: MintHandle
) -> None:
    """A poll in one worker and the leader's recovery finish the same paid quote."""
    one, two, db = two_cores
    quote = await LightningFunding(one.wallet).create(21)
    assert quote.api_key is not None
    rows = query(db, "SELECT op_id FROM lightning_funding WHERE id = ?", (quote.id,))
    op = await one.wallet.op(int(rows[0][0]))
    assert op.quote is not None
    outputs = await LightningFunding(one.wallet)._write_outputs(op)
    assert outputs is not None
    signatures = await one.wallet.api(mint.url).mint(op.quote, [o.to_wire() for o in outputs])
    results = await both_at_once(
        db,
        mint.url,
        lambda: LightningFunding(one.wallet)._finish(op.id, signatures),
        lambda: LightningFunding(two.wallet)._finish(op.id, signatures),
    )
    assert results == [None, None]
    status = await LightningFunding(two.wallet).status(quote.id)
    assert status.state == "paid" and status.balance_msat == 21_000


async def test_two_moves_out_of_one_pool_never_take_the_change_it_owes(
    two_cores: tuple[Core, Core, Path], mint: MintHandle, make_token: Any
) -> None:
    """Each payout alone leaves the sat pool what it owes a per-request token; both together
    would not. The second one's check sees the first (it waits for it), so it is refused."""
    one, two, db = two_cores  # the sat pool: 16 sat of key:seed
    token = await make_token(60, mint=mint)  # 60 sat of change owed in sat
    await one.wallet.receive(token, "req:" + token_fingerprint(parse_token(token)), "request")
    await one.wallet.receive(await make_token(40, mint=mint), "key:c", "api_key")
    for key in ("key:a", "key:b"):  # balances paid into the msat pool
        await one.wallet.receive(await make_token(50_000, "msat", mint=mint), key, "api_key")

    async def pay_39_sat(conn: Conn, account_id: str) -> None:
        """What a swap send or a melt writes before the mint is asked (in flight: 39 sat)."""
        await debit(conn, account_id, 39_000, "withdrawal")
        await journal.insert_op(
            conn, kind="send", mint_url=mint.url, unit="sat", account_id=account_id,
            amount=39, debit_msat=39_000, inputs=(), outputs=(),
        )  # fmt: skip
        await liabilities.check_move(conn, mint.url, "sat", account_id)

    async def second() -> None:
        async with two.ledger.db.write() as conn:
            await pay_39_sat(conn, "key:b")

    # The pool holds 116 sat and owes 60: 56 may leave, not 2 x 39.
    async with one.ledger.db.write() as conn:
        await pay_39_sat(conn, "key:a")
        late = asyncio.ensure_future(second())
        await until(lambda: waiting_on_locks(db) >= 1 or late.done())
    with pytest.raises(InsufficientBalance, match="owed to unclaimed change"):
        await late
    assert await balance(one, "key:b") == 50_000


async def test_a_late_swap_keeps_nothing_when_another_payout_took_its_inputs_meanwhile(
    two_cores: tuple[Core, Core, Path], mint: MintHandle, make_token: Any
) -> None:
    """A send gave up (reversed: its inputs back in the pool) and then its swap landed. If
    another process's payout is taking those inputs right now, they are not the pool's to
    mark spent: the late swap keeps nothing (an operator restores it from the journal)."""
    one, _, db = two_cores
    wallet = one.wallet
    await wallet.receive(await make_token(64, mint=mint), "key:a", "api_key")
    keyset = await wallet.active_keyset(mint.url, "sat")
    async with wallet.ledger.db.write() as conn:
        await debit(conn, "key:a", 39_000, "withdrawal")
        counts = await journal.pool_counts(conn, mint.url, "sat")
        inputs = await journal.take_proofs(conn, mint.url, "sat", counts)  # the whole pool
        total = sum(p.amount for p in inputs)
        outputs = wallet.make_outputs(keyset, complete_split(39), "send")
        outputs += wallet.make_outputs(keyset, complete_split(total - 39), "keep")
        op_id = await journal.insert_op(
            conn, kind="send", mint_url=mint.url, unit="sat", account_id="key:a", amount=39,
            debit_msat=39_000, inputs=inputs, outputs=outputs,
        )  # fmt: skip
        await journal.set_proof_state(conn, [p.secret for p in inputs], "reserved", op_id)
    await wallet._reverse_send(op_id, inputs_spent=False)  # gave up: inputs back, money back
    signatures = await wallet.api(mint.url).swap(
        [p.to_wire() for p in inputs], [o.to_wire() for o in outputs]
    )
    secrets = [p.secret for p in inputs]
    target = ledger_target(db)
    assert isinstance(target, str)
    with psycopg.connect(target) as other:  # another payout takes the pool's proofs
        other.execute("SELECT 1 FROM proofs WHERE secret = ANY(%s) FOR UPDATE", (secrets,))
        other.execute(
            "UPDATE proofs SET state = 'reserved', op_id = 0 WHERE secret = ANY(%s)", (secrets,)
        )
        late = asyncio.ensure_future(wallet._finish_send(op_id, signatures, deliver=True))
        await until(lambda: waiting_on_locks(db) >= 1 or late.done())
        other.commit()
    await late
    assert query(db, "SELECT DISTINCT state, op_id FROM proofs") == [("reserved", 0)]
    assert await balance(one, "key:a") == 64_000
    # The other payout, whose mint call now fails, puts its inputs back: the books still hold.
    query(db, "UPDATE proofs SET state = 'unspent', op_id = ?", (op_id,))


async def test_change_paid_out_by_two_processes_at_once_is_paid_once_with_its_rest_once(
    two_cores: tuple[Core, Core, Path], mint: MintHandle, make_token: Any
) -> None:
    """A job's settle in one worker and its client's claim in another pay the same change:
    one token, the msat rest to the operator once, and neither answer is an error."""
    one, two, db = two_cores
    token = await make_token(10, mint=mint)
    fingerprint = token_fingerprint(parse_token(token))
    account = "req:" + fingerprint
    await one.wallet.receive(token, account, "request")
    await one.ledger.settle(await one.ledger.hold(account, 500), 500)  # 9,500 msat left
    earned = await balance(one, OPERATOR)
    received = Received(0, mint.url, "sat", 10, 0, fingerprint)
    results = await both_at_once(
        db,
        mint.url,
        lambda: one.payments.change.refund(account, received),
        lambda: two.payments.change.refund(account, received),
        held=rows_held(db, "SELECT id FROM accounts WHERE id = %s", (account,)),
    )
    assert not any(isinstance(r, BaseException) for r in results), results
    (sent,) = [r for r in results if r is not None]
    assert await make_token.redeem(sent.token) == 9
    assert await balance(one, OPERATOR) == earned + 500
    assert await balance(one, account) == 0


async def test_a_new_leaders_payout_service_leaves_a_melt_another_worker_is_paying_alone(
    ledger_backend: str, tmp_path: Path, mint: MintHandle, fee_mint: MintHandle,
    make_token: Any, tcp_proxy: Callable[..., TcpProxy],
) -> None:  # fmt: skip
    """The payout service settles melts an earlier run left; with workers on one database a
    young pending melt is another worker's live one, and the mint has not seen it yet."""
    config = write_config(tmp_path, mint.url)
    proxy = tcp_proxy(mint.url)
    leader = await make_core(config)
    worker = await make_core(config, transport=Rerouting({mint.url: proxy.url}))
    try:
        await leader.wallet.receive(await make_token(100, mint=mint), OPERATOR, "operator")
        quote = await Melter(worker.wallet).quote(await invoice(fee_mint, 10), unit="sat")
        await worker.wallet.pool_keysets(mint.url, "sat")
        proxy.drop_connections()
        proxy.pause()  # the worker's melt is journalled, then waits on its way to the mint
        paying = asyncio.ensure_future(Melter(worker.wallet).pay(OPERATOR, quote))
        pending = "SELECT COUNT(*) FROM wallet_ops WHERE kind = 'melt' AND state = 'pending'"
        await until(lambda: query(tmp_path / "data" / "ledger.sqlite3", pending) == [(1,)])
        await reconcile(leader)  # what PayoutService.run does first, in the new leader
        proxy.resume()
        melted = await paying
        assert melted.state == "paid" and melted.cost_msat >= 10_000
        operator = await leader.ledger.account(OPERATOR)
        assert operator is not None and operator.balance_msat == 100_000 - melted.cost_msat
        assert (await leader.ledger.audit()).ok
    finally:
        await worker.close()
        await leader.close()
