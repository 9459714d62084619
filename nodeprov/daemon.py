"""Builds the core once and runs the daemon's long-lived tasks until asked to stop.

A *service* is ``async (core, stop) -> None`` that runs until ``stop`` is set: the core's
housekeeping loops, payouts, the HTTP server and the Nostr pool. The :class:`Core` they
share is built by :mod:`nodeprov.core.node`.

Every worker runs the HTTP server and the rate refresh. The rest (:data:`LEADER_ONLY`:
the Nostr channel, payouts, expiry refunds, funding polls, the hold sweeper, wallet
recovery) runs only while this process leads (:mod:`nodeprov.leadership`): with the
ledger on SQLite that is always, with PostgreSQL one process among all that share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeprov.config import Config
from nodeprov.core import journal
from nodeprov.core.expiry import refund_expired_keys
from nodeprov.core.ledger import OPERATOR, Ledger, now
from nodeprov.core.lightning_funding import LightningFunding, poll_lightning_funding
from nodeprov.core.melt import Melter
from nodeprov.core.node import Core, Service, build_core
from nodeprov.http import http_service, listening_http_service
from nodeprov.http.server import bind
from nodeprov.leadership import Leadership, LockSession, PostgresSession, SoloSession
from nodeprov.limits import raise_open_files_limit
from nodeprov.nostr.service import nostr_service
from nodeprov.payouts import payout_service

log = logging.getLogger(__name__)

SWEEP_SECONDS = 60.0
RECOVER_SECONDS = 60.0
# How long services get to finish after stop is set before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


def abandoned_before(core: Core) -> int:
    """Wallet ops started before this unix time are abandoned: no live request awaits them."""
    return now() - 2 * int(core.config.wallet.mint_timeout_seconds) - 60


async def recover(core: Core, *, older_than: int | None = None) -> None:
    """Start-up recovery: settle interrupted wallet operations, release lapsed holds.

    ``older_than`` (a unix time) limits it to ops started before then: with several
    processes on one database, younger ones may belong to another worker's live request.
    """
    # Mint ops first: a paid quote credits an account that a later step may pay out of.
    # Only ops that may have moved money: unpaid quotes (anyone can open one) are left to
    # the poll service, which runs as soon as the node is up.
    minted = await LightningFunding(core.wallet).recover(older_than=older_than, unpaid=False)
    outcome = {f"mint_{state}": n for state, n in minted.items()}
    outcome.update(await core.wallet.recover(older_than=older_than))
    for state, n in (await Melter(core.wallet).recover(older_than=older_than)).items():
        outcome[f"melt_{state}"] = n
    if outcome:
        counts = ", ".join(f"{state}={n}" for state, n in sorted(outcome.items()))
        log.info("wallet recovery: %s", counts)
    else:
        log.info("wallet recovery: no interrupted operations")
    # Only lapsed leases: a hold whose job still renews it (another worker on this database)
    # stays; the previous run's holds are released by the sweep once their lease lapses.
    released = await core.ledger.release_stale_holds()
    if released:
        log.info("released %d holds whose lease lapsed", released)


async def _every(
    seconds: float, stop: asyncio.Event, name: str, step: Callable[[], Awaitable[None]]
) -> None:
    """Run ``step`` every ``seconds`` until ``stop``; one failed round is logged, not fatal."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        if stop.is_set():
            return
        try:
            await step()
        except Exception:
            log.exception("%s failed; retrying in %.0f s", name, seconds)


async def sweep_holds(core: Core, stop: asyncio.Event) -> None:
    """Release holds whose lease lapsed (their job stopped renewing; see ``core.charges``)."""

    async def step() -> None:
        released = await core.ledger.release_stale_holds()
        if released:
            log.warning("released %d holds whose lease lapsed", released)

    await _every(SWEEP_SECONDS, stop, "hold sweep", step)


async def retry_recovery(core: Core, stop: asyncio.Event) -> None:
    """Retry wallet operations left pending because a mint was unreachable."""

    async def step() -> None:
        # Ops younger than this may still be awaited by a live request.
        older_than = abandoned_before(core)
        outcome = await core.wallet.recover(older_than=older_than)
        for state, n in (await Melter(core.wallet).recover(older_than=older_than)).items():
            outcome[f"melt_{state}"] = n
        if outcome and set(outcome) != {"pending"}:
            log.info("wallet recovery retry: %s", outcome)

    await _every(RECOVER_SECONDS, stop, "wallet recovery", step)


async def refresh_rates(core: Core, stop: asyncio.Event) -> None:
    """Keep the BTC/USD rate fresh (only when some model is priced in USD)."""
    if core.rates is None:
        await stop.wait()
        return
    await core.rates.run(stop)


CORE_SERVICES: tuple[Service, ...] = (
    refresh_rates,
    sweep_holds,
    retry_recovery,
    poll_lightning_funding,
    refund_expired_keys,
)


def default_services() -> tuple[Service, ...]:
    """What ``nodeprov start`` runs: the core's housekeeping and the channels."""
    return (*CORE_SERVICES, payout_service, http_service, nostr_service)


# Services (by name, so that a configured copy such as ``PayoutService().service()`` counts)
# that must run in one process at a time: they answer DMs, move money on their own schedule
# or settle what another request left behind.
LEADER_ONLY = frozenset(
    {
        "nostr_service",
        "payout_service",
        "refund_expired_keys",
        "poll_lightning_funding",
        "sweep_holds",
        "retry_recovery",
    }
)


def lock_session(config: Config) -> LockSession:
    """How this process competes for leadership: SQLite's one process always leads."""
    if config.ledger_on_postgres:
        return PostgresSession(config.ledger_url)
    return SoloSession()


async def recover_shared(core: Core, leadership: Leadership) -> None:
    """A new leader's recovery on a shared database: everything when no other process
    serves (it holds presence alone meanwhile, so none starts), else only operations old
    enough to be abandoned. This process's own live operations are never touched."""
    if await leadership.session.try_alone():
        try:
            await recover(core)
        finally:
            await leadership.session.release_alone()
    else:
        await recover(core, older_than=abandoned_before(core))


def leader_service(services: Sequence[Service], leadership: Leadership) -> Service:
    """One every-worker service that runs ``services`` whenever this process leads.

    A new term on a shared database first recovers what an earlier leader left, only
    operations old enough to be abandoned (another worker's live ones are left alone).
    """

    async def leader_services(core: Core, stop: asyncio.Event) -> None:
        async def lead(resign: asyncio.Event) -> None:
            if core.config.ledger_on_postgres:
                await recover_shared(core, leadership)
            await _supervise(core, resign, services)

        await leadership.run(stop, lead)

    return leader_services


async def run(
    config: Config,
    stop: asyncio.Event,
    *,
    services: Sequence[Service] | None = None,
    on_ready: Callable[[Core], None] | None = None,
    handle_signals: bool = True,
    listen: Sequence[socket.socket] = (),
    leadership: Leadership | None = None,
) -> None:
    """Build the core, recover, run ``services`` until ``stop`` (or SIGINT/SIGTERM), close.

    ``listen``: the HTTP sockets of a worker of ``start --workers`` (else one bound here).
    Services named in :data:`LEADER_ONLY` run under ``leadership`` (default: the lock
    that fits the ledger, see :func:`lock_session`).
    """
    chosen = list(default_services() if services is None else services)
    socks: list[socket.socket] = []
    if http_service in chosen:
        raise_open_files_limit()  # two sockets per open stream
        # Bound before the ledger, the banner or a first admin password: a port in use is
        # one error line (ConfigError) and nothing else happens.
        socks = list(listen) or [bind(config.http.host, config.http.port)]
        listening = listening_http_service(socks)
        chosen = [listening if s is http_service else s for s in chosen]
    leadership = leadership or Leadership(lock_session(config))
    led = [s for s in chosen if s.__name__ in LEADER_ONLY]
    if led:
        chosen = [s for s in chosen if s not in led] + [leader_service(led, leadership)]
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        core = await build_core(config)
        try:
            if not config.ledger_on_postgres:
                await recover(core)  # one process owns this ledger: every pending op is orphaned
            elif await leadership.session.try_alone():
                # Before serving: the first process on the database recovers everything, as
                # at a SQLite start; one joining others leaves recovery to the leader.
                try:
                    await recover(core)
                finally:
                    await leadership.session.release_alone()
            else:
                await leadership.session.join()
            if on_ready is not None:
                on_ready(core)
            await _supervise(core, stop, chosen)
        finally:
            await leadership.session.close()
            await core.close()
            log.info("stopped")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for sock in socks:
            sock.close()  # already closed if the server ran; not if the core failed to build


async def _supervise(core: Core, stop: asyncio.Event, services: Sequence[Service]) -> None:
    """Run services until ``stop``; a service that crashes stops the daemon with its error."""
    tasks = [asyncio.create_task(s(core, stop), name=s.__name__) for s in services]
    stopping: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    failure: BaseException | None = None
    try:
        pending: set[asyncio.Task[Any]] = {*tasks, stopping}
        while not stop.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.error("%s failed: %s", task.get_name(), exc, exc_info=exc)
                    failure = failure or exc
                    stop.set()
        stop.set()
        _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_SECONDS)
        for task in late:
            log.warning("%s did not stop in time; cancelling it", task.get_name())
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    finally:
        stopping.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(stopping, *tasks, return_exceptions=True)
    if failure is not None:
        raise failure


# --- read-only views of the books, for `status` and `wallet balance` -------------------


@dataclass(frozen=True)
class Books:
    """What the node owes: user balances (with what running jobs hold) and its earnings."""

    accounts: dict[str, int]
    users_msat: int
    held_msat: int
    holds: int
    operator_msat: int
    pending_ops: int
    # Ops recovery marked failed because the mint refused them; newest first.
    failed_ops: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


async def books(ledger: Ledger) -> Books:
    """Totals of the ledger (one consistent read per figure; the daemon may be running)."""
    kinds = await ledger.db.fetchall(
        "SELECT kind, COUNT(*), COALESCE(SUM(balance_msat), 0) FROM accounts "
        "WHERE id != ? GROUP BY kind ORDER BY kind",
        (OPERATOR,),
    )
    holds, held_msat = await ledger.open_holds()
    pending = await ledger.db.fetchone("SELECT COUNT(*) FROM wallet_ops WHERE state = 'pending'")
    operator = await ledger.account(OPERATOR)
    failed, failures = await journal.recovery_failures(ledger.db, limit=5)
    return Books(
        accounts={row[0]: int(row[1]) for row in kinds},
        users_msat=sum(int(row[2]) for row in kinds),
        held_msat=held_msat,
        holds=holds,
        operator_msat=operator.balance_msat if operator else 0,
        pending_ops=int(pending[0]) if pending else 0,
        failed_ops=failed,
        failures=failures,
    )
