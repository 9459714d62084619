"""The end of a soak: settle what is late, drain the node into client tokens, count at the mint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from tests.soak import dm_ops
from tests.soak.faucet import token_msat, token_secrets
from tests.soak.faults import check_audit
from tests.soak.stack import LEASE_SECONDS, NodeDidNotStart
from tests.soak.world import World, XCashuPayment

LATE_REPLY_WAIT = 60.0


async def drain_and_count(world: World) -> None:
    """Quiesce, check the node's state, drain every account, and check the money."""
    books, stack = world.books, world.stack
    world.log("settling late replies")
    await _late_replies(world)
    # Every lease of a killed run has lapsed by now; a restart settles interrupted wallet
    # operations (start-up recovery), so nothing may be left open after it.
    await asyncio.sleep(LEASE_SECONDS + 1)
    await stack.stop()
    try:
        await stack.start()
    except NodeDidNotStart as exc:
        books.violation("node_did_not_start", str(exc))
        return
    status = (await stack.cli("status", "--json")).json()
    ledger = status.get("ledger", status)
    if ledger.get("holds"):
        books.violation("hold_outlived_lease", f"{ledger['holds']} holds open after the run")
    if ledger.get("pending_ops"):
        books.violation("pending_op_left", f"{ledger['pending_ops']} wallet ops still pending")
    world.log("claiming change of per-request tokens")
    for payment in world.xcashu:
        await _claim_change(world, payment)
    world.log("checking and draining accounts")
    for key in world.keys:
        await _drain_http(world, "key:" + key, key)
    for token in world.token_keys:
        await _drain_http(world, "tok:" + token, token)
    for client in world.npubs:
        await _drain_npub(world, client)
    await stack.stop()
    # The operator's earnings: whole sats first, then what msat proofs can pay of the rest.
    for unit in ("sat", "msat"):
        result = await stack.cli("wallet", "withdraw", "--unit", unit, "--json")
        if result.code == 0:
            token = result.json()["token"]
            books.receive(token, token_msat(token), "operator withdrawal")
        else:
            world.log(f"operator withdraw in {unit}: {(result.err or result.out).strip()[-300:]}")
    status = (await stack.cli("status", "--json")).json()
    ledger = status.get("ledger", status)
    left = int(ledger["users_msat"]) + int(ledger["operator_msat"])
    await check_audit(world, "at the end")
    await _check_node_proofs(world, left)
    tokens = [*books.wallet, *books.taken, *books.unknown]
    states = await world.faucet.states(tokens)
    unspent = books.check_proofs(states, {t: token_secrets(t) for t in tokens})
    books.check_conservation(unspent, left)
    world.log(
        f"money: issued {books.issued_msat} msat; clients hold {unspent} unspent; "
        f"the node still owes {left}; {books.answered} answered jobs charged "
        f"{books.charged_msat} msat"
    )


def _node_proofs(ledger_path: Path) -> list[tuple[str, int]]:
    """The proofs the node's books say it holds: (secret, msat), read-only from outside."""
    with contextlib.closing(sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT secret, amount * CASE unit WHEN 'sat' THEN 1000 ELSE 1 END FROM proofs "
            "WHERE state IN ('unspent', 'reserved')"
        ).fetchall()
    return [(str(r[0]), int(r[1])) for r in rows]


async def _check_node_proofs(world: World, owed_msat: int) -> None:
    """What the node still owes must be backed by proofs the mint says are unspent."""
    proofs = await asyncio.to_thread(_node_proofs, world.stack.ledger_path)
    states = await world.faucet.secret_states(secret for secret, _ in proofs)
    spent = [(s, msat) for s, msat in proofs if states.get(s) != "UNSPENT"]
    if spent:
        world.books.violation(
            "node_proof_spent",
            f"{len(spent)} proofs ({sum(m for _, m in spent)} msat) the node counts as its own "
            "are not unspent at the mint",
        )
    held = sum(msat for _, msat in proofs)
    if held < owed_msat:
        world.books.violation("node_underfunded", f"holds {held} msat, owes {owed_msat}")


async def _late_replies(world: World) -> None:
    deadline = time.monotonic() + LATE_REPLY_WAIT
    for client in world.npubs:
        for kind, ident, sent in client.late:
            reply = await client.reply_to(ident, max(0.1, deadline - time.monotonic()))
            if reply is None:
                continue
            if kind == "deposit" and reply["type"] == "balance":
                token, msat = sent
                world.books.taken_by_node(token, "late DM deposit reply")
                world.books.account(client.name).lo += msat
            elif kind == "job":
                payment, body = sent
                dm_ops.settle_dm_job(world, client, body, reply, payment)
            elif kind == "withdraw" and reply["type"] == "withdrawal":
                # Its debit was counted as possible already.
                cashu = reply["cashu"]
                world.books.receive(cashu, token_msat(cashu), "late DM withdrawal")
    unanswered = [
        kind for client in world.npubs for kind, ident, _ in client.late
        if ident not in client.replies
    ]  # fmt: skip
    unsent = sum(client.unsent for client in world.npubs)
    if unanswered or unsent:
        world.log(f"DMs never answered: {sorted(unanswered)}; not accepted by the relay: {unsent}")
    for client in world.npubs:
        for ident, replies in client.replies.items():
            if len({json.dumps(r, sort_keys=True) for r in replies}) > 1:
                world.books.violation("dm_answered_twice", f"{client.name} job {ident}: {replies}")


async def _claim_change(world: World, payment: XCashuPayment) -> None:
    books = world.books
    try:
        response = await world.http.get(
            world.stack.url + "/v1/wallet/change", headers={"X-Cashu": payment.token}
        )
    except httpx.TransportError as exc:
        books.violation("claim_failed", f"{type(exc).__name__}: {exc}")
        return
    if response.status_code == 401:  # the node never took it: it must be unspent
        if payment.token in books.unknown:
            books.returned(payment.token, "change claim: unknown token")
        elif payment.token in books.taken:
            books.violation("taken_token_unknown", "the node answered for a token it forgets")
        return
    if response.status_code != 200:
        books.violation("claim_failed", f"{response.status_code} {response.text[:200]}")
        return
    if payment.token in books.unknown:
        books.taken_by_node(payment.token, "change claimed")
    change = 0
    for token in response.json()["tokens"]:
        books.receive(token, token_msat(token), "change claim")
        change += token_msat(token)
    if payment.cost_msat is not None:
        books.check_payment("X-Cashu job", payment.msat, change, payment.cost_msat, payment.unit)


async def _drain_http(world: World, account: str, credential: str) -> None:
    books = world.books
    headers = {"Authorization": f"Bearer {credential}"}
    response = await world.http.get(world.stack.url + "/v1/wallet/balance", headers=headers)
    if response.status_code == 401 and credential in books.unknown:
        books.returned(credential, f"token key: {response.status_code} {response.text[:200]}")
        return
    if response.status_code != 200:
        books.violation("balance_failed", f"{account}: {response.status_code} {response.text}")
        return
    if credential in books.unknown:  # redeemed (now, or by a request whose answer was lost)
        msat = books.unknown[credential]
        books.taken_by_node(credential, "token key has a balance")
        books.account(account).lo += msat
    view: dict[str, Any] = response.json()
    books.check_account(account, int(view["balance"]))
    available = int(view["available"])
    # All of it in msat if the node holds msat proofs; else the whole sats (the msat
    # remainder stays on the node's books and is counted there).
    for body in ({"amount": available, "unit": "msat"}, {"amount": available, "unit": "sat"}):
        if available < (1 if body["unit"] == "msat" else 1000):
            continue
        headers["Idempotency-Key"] = secrets.token_hex(8)
        drained = await world.http.post(
            world.stack.url + "/v1/wallet/withdraw", json=body, headers=headers
        )
        if drained.status_code == 200:
            token = drained.json()["token"]
            books.receive(token, token_msat(token), "drain withdrawal")
            return
        if "withdrawal_too_large" not in drained.text:
            books.violation("drain_failed", f"{account}: {drained.status_code} {drained.text}")
            return
    if available >= 1000:
        books.violation("drain_failed", f"{account}: {available} msat could not be withdrawn")


async def _drain_npub(world: World, client: dm_ops.DmClient) -> None:
    books = world.books
    reply = await client.ask({"type": "balance", "id": secrets.token_hex(6)}, "nip17")
    if reply is None:
        books.violation("dm_unanswered", f"{client.name}: no balance reply at the end")
        return
    books.check_account(client.name, int(reply["balance_msat"]))
    if reply["balance_msat"] >= 1000:
        out = await client.ask({"type": "withdraw", "id": secrets.token_hex(6)}, "nip17")
        if out is None or out["type"] != "withdrawal":
            books.violation("drain_failed", f"{client.name}: {out}")
            return
        books.receive(out["cashu"], token_msat(out["cashu"]), "npub drain")
