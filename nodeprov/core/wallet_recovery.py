"""Finishing and undoing journalled swaps, for live requests and for recovery.

A receive or send is journalled as ``pending`` before the mint is called; this module
writes its outcome (proofs stored, balances moved) in one transaction, or undoes it, and
:meth:`WalletRecovery.recover` settles the pending ops nobody is waiting for: outputs the
mint already signed are restored (NUT-09), inputs it never saw are released (NUT-07).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nodeprov.core import journal
from nodeprov.core.bdhke import hash_to_curve_hex
from nodeprov.core.db import Conn
from nodeprov.core.journal import Op
from nodeprov.core.ledger import add_asset, credit, debit, log, unmark_processed
from nodeprov.core.mint_access import MintAccess
from nodeprov.core.money import check_unit, to_msat
from nodeprov.errors import InsufficientBalance, MintError, MintUnavailable, NodeprovError
from nodeprov.protocol.cashu_token import Token, proof_ids, serialize_token

logger = logging.getLogger("nodeprov.core.wallet")


class WalletRecovery(MintAccess):
    """The journal's outcomes: finish, undo, and recover pending receives and sends."""

    async def _require_done(self, op_id: int) -> Op:
        """The op, if it ended ``done``; else it was given up under us (another process)."""
        op = await self.op(op_id)
        if op.state == "done":
            return op
        # Its journalled outputs still let an operator restore (NUT-09) what the mint signed.
        logger.error("%s op %s finished at the mint but was already %s", op.kind, op.id, op.state)
        if op.kind == "send":
            raise MintError(
                f"the mint's swap landed after the node had given up on this payout (op {op.id});"
                " the amount is back on the account: try again"
            )
        raise MintError(
            f"the mint took this token after the node had given up on it (op {op.id}); nothing"
            " was credited: the operator can restore it from the wallet journal"
        )

    async def _finish_receive(self, op_id: int, signatures: Sequence[Any]) -> None:
        await self.load_output_keyset(op_id)
        async with self.ledger.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":
                return
            keyset = self.known_keyset(op.mint_url, op.outputs[0].keyset_id)
            proofs = self.unblind_signatures(keyset, op.outputs, signatures)
            await journal.store_proofs(conn, op.mint_url, op.unit, proofs, "unspent", op.id)
            await journal.set_op_state(conn, op.id, "done")
            value_msat = to_msat(sum(p.amount for p in proofs), check_unit(op.unit))
            await add_asset(conn, op.mint_url, op.unit, value_msat)
            assert op.account_id is not None
            await credit(conn, op.account_id, value_msat, "deposit", op.fingerprint or "")

    async def _fail_receive(self, op_id: int, *, spent: bool, error: str) -> None:
        async with self.ledger.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":  # finished (or failed) by another process meanwhile
                return
            await journal.set_op_state(conn, op_id, "failed", error=error)
            if not spent and op.fingerprint:
                # The mint never took the proofs: the same token may be offered again.
                await unmark_processed(conn, "token", op.fingerprint)
                ids = proof_ids(p.secret for p in op.inputs)
                await journal.mark_taken(conn, ids, taken=False)

    async def _finish_send(self, op_id: int, signatures: Sequence[Any], *, deliver: bool) -> None:
        """Store a swap's outputs; undelivered sends (recovery) go back to the account."""
        await self.load_output_keyset(op_id)
        async with self.ledger.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state == "failed" and deliver:
                await self._keep_late_swap(conn, op, signatures)
            if op.state != "pending":
                return
            keyset = self.known_keyset(op.mint_url, op.outputs[0].keyset_id)
            proofs = self.unblind_signatures(keyset, op.outputs, signatures)
            send = [p for p, o in zip(proofs, op.outputs, strict=True) if o.role == "send"]
            keep = [p for p, o in zip(proofs, op.outputs, strict=True) if o.role == "keep"]
            unit = check_unit(op.unit)
            await journal.set_proof_state(conn, [p.secret for p in op.inputs], "spent", op.id)
            await journal.store_proofs(conn, op.mint_url, op.unit, keep, "unspent", op.id)
            fee_msat = to_msat(op.fee, unit)
            if deliver:
                token = serialize_token(Token(op.mint_url, op.unit, tuple(send)))
                await journal.store_proofs(conn, op.mint_url, op.unit, send, "sent", op.id)
                await journal.set_op_state(conn, op.id, "done", token=token)
                await add_asset(conn, op.mint_url, op.unit, -op.debit_msat)
            else:
                await journal.store_proofs(conn, op.mint_url, op.unit, send, "unspent", op.id)
                await journal.set_op_state(conn, op.id, "reversed")
                await add_asset(conn, op.mint_url, op.unit, -fee_msat)
                assert op.account_id is not None
                await credit(
                    conn, op.account_id, op.debit_msat - fee_msat, "reversal", op.ref or ""
                )

    async def _keep_late_swap(self, conn: Conn, op: Op, signatures: Sequence[Any]) -> None:
        """A send reversed elsewhere whose swap landed after all: its outputs are the node's.

        The reversal gave the account its money back and returned the inputs to the pool;
        now the inputs are spent and every output (``send`` and ``keep``) is ours. The
        mint's fee is the account's, as for any swap it asked for.
        """
        # Locked, not counted: another process's payout may be taking them from the pool
        # right now; once it commits they are no longer this op's, unspent, and stay its.
        cursor = await conn.execute(
            "SELECT secret FROM proofs WHERE op_id = ? AND state = 'unspent' AND secret IN "
            f"({', '.join('?' * len(op.inputs))}) FOR UPDATE",
            (op.id, *(p.secret for p in op.inputs)),
        )
        if len(list(await cursor.fetchall())) != len(op.inputs):
            logger.error("send op %s: late swap, but its inputs left the pool meanwhile", op.id)
            return
        keyset = self.known_keyset(op.mint_url, op.outputs[0].keyset_id)
        proofs = self.unblind_signatures(keyset, op.outputs, signatures)
        await journal.set_proof_state(conn, [p.secret for p in op.inputs], "spent", op.id)
        await journal.store_proofs(conn, op.mint_url, op.unit, proofs, "unspent", op.id)
        fee_msat = to_msat(op.fee, check_unit(op.unit))
        await add_asset(conn, op.mint_url, op.unit, -fee_msat)
        await journal.set_op_state(conn, op.id, "reversed", error="swap landed after reversal")
        if fee_msat:
            assert op.account_id is not None
            try:
                await debit(conn, op.account_id, fee_msat, "swap_fee", op.ref or "")
            except InsufficientBalance:
                await log(conn, "operator", "loss", 0, op.ref or "", f"swap fee: {fee_msat}")

    async def _reverse_send(
        self, op_id: int, *, inputs_spent: bool, error: str | None = None
    ) -> None:
        async with self.ledger.db.write() as conn:
            op = await journal.get_op(conn, op_id)
            if op.state != "pending":
                return
            await journal.set_proof_state(
                conn, [p.secret for p in op.inputs], "spent" if inputs_spent else "unspent"
            )
            await journal.set_op_state(conn, op.id, "failed", error=error)
            if inputs_spent:
                # The pool's row before the account's, the order every payout locks them in.
                lost = to_msat(sum(p.amount for p in op.inputs), check_unit(op.unit))
                await add_asset(conn, op.mint_url, op.unit, -lost)
                await log(conn, "operator", "loss", 0, op.ref or "", f"inputs spent: {lost}")
            assert op.account_id is not None
            await credit(conn, op.account_id, op.debit_msat, "reversal", op.ref or "")

    async def recover(self, *, older_than: int | None = None) -> dict[str, int]:
        """Finish or undo pending swaps; counts by outcome.

        At start-up every pending op is an orphan. While the node runs, pass ``older_than``
        (a time) so that swaps still awaited by a live request are left alone. A mint that
        is unreachable is asked once per round; its other ops wait for the next round.
        """
        rows = await self.ledger.db.fetchall(
            "SELECT * FROM wallet_ops WHERE state = 'pending' AND kind IN ('receive', 'send') "
            "AND updated_at <= ? ORDER BY id",
            (older_than if older_than is not None else 2**62,),
        )
        outcome: dict[str, int] = {}
        down: set[str] = set()  # unreachable this round: one timeout per mint, not per op
        for op in journal.ops_from_rows(rows):
            if op.mint_url in down:
                outcome["pending"] = outcome.get("pending", 0) + 1
                continue
            if not self.recoverable(op.id, op.mint_url):
                continue
            try:
                result = await self._resolve(op.id, deliver=False)
            except MintUnavailable as exc:
                logger.warning("op %s stays pending: %s; %s left for now", op.id, exc, op.mint_url)
                down.add(op.mint_url)
                result = "pending"
            except NodeprovError as exc:  # a 4xx: one bad record must not stop start-up
                logger.error("%s op %s: %s; marked failed", op.kind, op.id, exc.message)
                error = journal.RECOVERY_FAILED + exc.message
                if op.kind == "receive":
                    await self._fail_receive(op.id, spent=False, error=error)
                else:
                    await self._reverse_send(op.id, inputs_spent=False, error=error)
                result = "failed"
            outcome[result] = outcome.get(result, 0) + 1
        return outcome

    async def _resolve(self, op_id: int, *, deliver: bool = True) -> str:
        """Decide a pending op from the mint's view: restore signed outputs, else check inputs."""
        op = await self.op(op_id)
        if op.state != "pending":
            return op.state
        api = self._apis[op.mint_url]
        signed = await api.restore([o.to_wire() for o in op.outputs]) if op.outputs else {}
        if op.outputs and all(o.B_ in signed for o in op.outputs):
            signatures = [signed[o.B_] for o in op.outputs]
            if op.kind == "receive":
                await self._finish_receive(op.id, signatures)
            else:
                await self._finish_send(op.id, signatures, deliver=deliver)
            return (await self.op(op.id)).state
        states = await api.check_state([hash_to_curve_hex(p.secret) for p in op.inputs])
        if any(s == "PENDING" for s in states):
            return "pending"
        spent = any(s == "SPENT" for s in states)
        if op.kind == "receive":
            await self._fail_receive(op.id, spent=spent, error="recovered")
            return "failed"
        await self._reverse_send(op.id, inputs_spent=spent)
        return "failed"
