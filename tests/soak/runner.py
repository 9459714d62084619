"""One soak run: the workload and the faults for ``seconds``, then the drain and the money check.

The end, in order: the clients stop; late DM replies are awaited; the node is restarted
once the leases have lapsed (start-up recovery settles every interrupted wallet operation);
no hold and no pending operation may be left; every per-request token's change is claimed;
every account's balance must lie in the client's range and is withdrawn; the operator's
earnings are withdrawn with the CLI; then the mint is asked about every proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tests.soak import dm_ops, faults, http_ops
from tests.soak.books import Books
from tests.soak.drain import drain_and_count
from tests.soak.faucet import Faucet
from tests.soak.stack import Stack
from tests.soak.world import World

HTTP_WORKERS = 4
DM_CLIENTS = 2
HttpOp = Callable[[World], Awaitable[None]]
HTTP_OPS: dict[HttpOp, int] = {
    http_ops.create_key: 1,
    http_ops.key_chat: 5,
    http_ops.concurrent_key_chats: 1,
    http_ops.topup: 1,
    http_ops.withdraw: 1,
    http_ops.token_key_chat: 2,
    http_ops.xcashu_chat: 4,
    http_ops.stream_disconnect: 1,
    http_ops.balance: 1,
}


@dataclass
class Result:
    seed: int
    operations: int
    faults: int
    violations: list[str]

    @property
    def summary(self) -> str:
        return (
            f"soak: {self.operations} operations, {self.faults} faults, "
            f"{len(self.violations)} violations (seed {self.seed})"
        )


async def run(seconds: float, seed: int, workdir: Path | None = None) -> Result:
    """Run the soak; the result carries the counts and every violation found."""
    with contextlib.ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        books = Books()
        log_lines: list[str] = []
        async with Stack(workdir) as stack:
            faucet = Faucet(stack.mint_url, workdir)
            world = World(stack, books, faucet, random.Random(seed), log_lines)
            try:
                await _workload(world, seconds)
                if not any(v.rule == "node_did_not_start" for v in books.violations):
                    await drain_and_count(world)
            except Exception as exc:  # the check could not finish: that is a finding too
                world.log("".join(traceback.format_exception(exc)))
                books.violation("check_crashed", f"{type(exc).__name__}: {exc}")
            finally:
                await world.http.aclose()
                for client in world.npubs:
                    await client.close()
                await faucet.aclose()
            moves = "".join(f"{m}\t{t}\n" for t, m in books.history.items())
            (workdir / "tokens.txt").write_text(moves)
            if books.evidence:
                (workdir / "evidence.txt").write_text("\n".join(books.evidence) + "\n")
        return Result(seed, world.operations, world.faults, [str(v) for v in books.violations])


async def _workload(world: World, seconds: float) -> None:
    stop = asyncio.Event()
    world.npubs = [
        await dm_ops.DmClient(world.stack.relay_url, world.stack.node_pubkey()).connect()
        for _ in range(DM_CLIENTS)
    ]
    tasks = [asyncio.create_task(_http_worker(world, i, stop)) for i in range(HTTP_WORKERS)]
    tasks += [asyncio.create_task(_dm_worker(world, c, stop)) for c in world.npubs]
    fault_task = asyncio.create_task(faults.inject(world, stop))
    deadline = time.monotonic() + seconds
    next_report = time.monotonic() + 30
    next_hold_check = time.monotonic() + 10
    while time.monotonic() < deadline and not stop.is_set():
        await asyncio.sleep(0.5)
        if time.monotonic() >= next_hold_check:
            next_hold_check += 10
            await faults.check_holds(world)
        if world.books.violations:
            world.log(f"VIOLATION: {world.books.violations[0]}; stopping the run")
            stop.set()
        if fault_task.done() and fault_task.exception() is not None:
            stop.set()
        if time.monotonic() >= next_report:
            next_report += 30
            world.log(f"{world.operations} operations, {world.faults} faults so far")
    stop.set()
    world.log("stopping the clients")
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(faults.NodeGone):
        await fault_task
    for task in tasks:
        if task.exception() is not None:
            world.books.violation("client_crashed", repr(task.exception()))


async def _http_worker(world: World, index: int, stop: asyncio.Event) -> None:
    ops, weights = list(HTTP_OPS), list(HTTP_OPS.values())
    while not stop.is_set():
        op = world.rng.choices(ops, weights)[0]
        ident = world.begin(op.__name__)
        try:
            await op(world)
        finally:
            world.end(ident)


async def _dm_worker(world: World, client: dm_ops.DmClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        account = world.books.account(client.name)
        roll = world.rng.random()
        name = "dm_deposit"
        if account.lo < 5_000 or roll < 0.15:
            op: Callable[[], Awaitable[None]] = lambda: dm_ops.dm_deposit(world, client)  # noqa: E731
        elif roll < 0.50:
            name, op = "dm_job", lambda: dm_ops.dm_job(world, client, paid_by_token=False)
        elif roll < 0.75:
            name, op = "dm_job_cashu", lambda: dm_ops.dm_job(world, client, paid_by_token=True)
        elif roll < 0.85:
            name, op = "dm_withdraw", lambda: dm_ops.dm_withdraw(world, client)
        elif roll < 0.92 or client.plain_lost:
            name, op = "dm_balance", lambda: dm_ops.dm_balance(world, client)
        else:
            name, op = "dm_plain_chat", lambda: dm_ops.dm_plain_chat(world, client)
        ident = world.begin(name)
        try:
            await op()
        finally:
            world.end(ident)
