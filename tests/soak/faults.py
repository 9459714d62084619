"""Faults at random moments: the daemon killed and restarted, the mint stopped and started,
the relay restarted, the upstream failing or slow, a second ``nodeprov start`` on the live
data dir. Each is logged with the operations it interrupted, and after each the node must
answer again with its books in balance (``nodeprov wallet audit``)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from pathlib import Path

from tests.soak.stack import NodeDidNotStart
from tests.soak.world import World
from tests.support.fake_openai import Behaviour

FAULTS = {
    "kill -9 and restart": 4,
    "mint down": 3,
    "relay restart": 2,
    "upstream failing": 2,
    "upstream slow": 1,
    "second start": 1,
}


class NodeGone(Exception):
    """The node did not start again: the run cannot go on."""


async def inject(world: World, stop: asyncio.Event) -> None:
    """Inject faults until ``stop``, a random 2-10 s apart."""
    names, weights = list(FAULTS), list(FAULTS.values())
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=world.rng.uniform(2.0, 10.0))
            return
        except TimeoutError:
            pass
        fault = world.rng.choices(names, weights)[0]
        interrupted = Counter(world.in_flight.values())
        what = ", ".join(f"{n}×{op}" for op, n in sorted(interrupted.items())) or "nothing"
        world.faults += 1
        world.log(f"fault {world.faults}: {fault} (in flight: {what})")
        await FAULT_ACTIONS[fault](world)


async def kill_and_restart(world: World) -> None:
    stack = world.stack
    stack.kill()
    await asyncio.sleep(world.rng.uniform(0.0, 2.0))
    try:
        seconds = await stack.start()
    except NodeDidNotStart as exc:
        world.books.violation("node_did_not_start", str(exc))
        raise NodeGone(str(exc)) from exc
    world.log(f"  node up again in {seconds:.1f} s")
    await check_audit(world, "after a restart")


async def mint_down(world: World) -> None:
    mint = world.stack.mint
    assert mint is not None
    world.faucet.mint_up.clear()
    await asyncio.to_thread(mint.stop)
    await asyncio.sleep(world.rng.uniform(1.0, 6.0))
    await asyncio.to_thread(mint.start)
    world.faucet.mint_up.set()


async def relay_restart(world: World) -> None:
    relay = world.stack.relay
    assert relay is not None
    await asyncio.to_thread(relay.stop)
    await asyncio.sleep(world.rng.uniform(0.5, 3.0))
    await asyncio.to_thread(relay.start)


async def upstream_failing(world: World) -> None:
    status = world.rng.choice((500, 502, 503, 429))
    await _upstream_behaves(world, Behaviour(fail=status))


async def upstream_slow(world: World) -> None:
    await _upstream_behaves(world, Behaviour(delay=1.5, chunk_delay=0.2))


async def _upstream_behaves(world: World, behaviour: Behaviour) -> None:
    upstream = world.stack.upstream
    saved = upstream.behaviour
    upstream.behaviour = behaviour
    await asyncio.sleep(world.rng.uniform(1.0, 5.0))
    upstream.behaviour = saved


async def second_start(world: World) -> None:
    result = await world.stack.second_start()
    if result.code != 2 or "already running" not in result.err + result.out:
        world.books.violation(
            "second_start_not_refused",
            f"exit {result.code}: {(result.err or result.out).strip()[-300:]}",
        )
    if not world.stack.running:
        world.books.violation("second_start_stopped_the_node", world.stack.log_tail())


# The sweeper runs every minute: a lapsed hold may stay open that long before it is released.
SWEEP_SLACK_SECONDS = 60 + 10


def overdue_holds(ledger_path: Path, now: float) -> list[tuple[int, str, int]]:
    """Open holds whose lease lapsed longer ago than a sweep takes (read-only, from outside)."""
    if not ledger_path.exists():
        return []
    with contextlib.closing(
        sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=5)
    ) as conn:
        rows = conn.execute(
            "SELECT id, account_id, lease_expires_at FROM holds "
            "WHERE state = 'open' AND lease_expires_at < ?",
            (int(now) - SWEEP_SLACK_SECONDS,),
        ).fetchall()
    return [(int(r[0]), str(r[1]), int(r[2])) for r in rows]


async def check_holds(world: World) -> None:
    """No hold outlives its job's lease by more than a sweep."""
    try:
        overdue = await asyncio.to_thread(overdue_holds, world.stack.ledger_path, time.time())
    except sqlite3.Error:
        return  # the node holds a write lock for a moment: look again next time
    for hold_id, account, lease in overdue:
        world.books.violation(
            "hold_outlived_lease",
            f"hold {hold_id} of {account} still open {int(time.time()) - lease} s after its "
            "lease lapsed",
        )


async def check_audit(world: World, when: str) -> None:
    result = await world.stack.cli("wallet", "audit", "--json")
    if result.code != 0:
        world.books.violation("audit_failed", f"{when}: {result.out.strip()[-500:]}")


FAULT_ACTIONS = {
    "kill -9 and restart": kill_and_restart,
    "mint down": mint_down,
    "relay restart": relay_restart,
    "upstream failing": upstream_failing,
    "upstream slow": upstream_slow,
    "second start": second_start,
}
