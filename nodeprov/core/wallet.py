"""The node's Cashu wallet: the only module that imports ``cashu`` (for its BDHKE crypto).

Receive swaps a user's proofs for fresh ones at the mint so the node owns them; send hands
out proofs (from the pool when an exact set exists, else after one swap); melt pays a
Lightning invoice. Each step is journalled (``core.journal``) before the mint is called,
so :meth:`Wallet.recover` can finish or undo anything a crash interrupted: outputs the
mint signed are recovered with NUT-09 restore, inputs it never saw are released.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
import httpx

# Only the crypto subpackage of cashu is imported: unlike cashu.core.settings (pulled in
# by most of the package) it reads no .env file and leaves sys.tracebacklimit alone.
from cashu.core.crypto import b_dhke
from cashu.core.crypto.secp import PrivateKey, PublicKey

from nodeprov.core import journal, liabilities
from nodeprov.core.denominations import complete_split, covering_subset, exact_subset
from nodeprov.core.journal import BlindedOutput, Op
from nodeprov.core.keysets import Keyset, MintKeysets
from nodeprov.core.ledger import (
    Ledger,
    add_asset,
    credit,
    debit,
    ensure_account,
    log,
    mark_processed,
    unmark_processed,
)
from nodeprov.core.live_ops import LiveOps
from nodeprov.core.mint_api import SPENT_CODE, MintApi
from nodeprov.core.money import Unit, ceil_div, check_unit, from_msat_floor, to_msat
from nodeprov.errors import (
    InsufficientBalance,
    InvalidToken,
    MintError,
    MintUnavailable,
    NodeprovError,
    TokenAlreadySpent,
    TokenTooSmall,
    UnsupportedUnit,
    UntrustedMint,
)
from nodeprov.protocol.cashu_token import (
    Dleq,
    Proof,
    Token,
    parse_token,
    serialize_token,
    token_fingerprint,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    """A token taken in: what was credited and what the mint kept as input fee."""

    credited_msat: int
    mint_url: str
    unit: Unit
    token_amount: int
    fee: int
    fingerprint: str


@dataclass(frozen=True)
class Sent:
    """A token given out: its text and value (in ``unit``), and the swap fee it cost."""

    token: str
    amount: int
    unit: Unit
    mint_url: str
    fee: int
    debited_msat: int


def _norm(url: str) -> str:
    return url.rstrip("/")


class Wallet:
    """Proofs at the trusted mints, kept in the ledger's database."""

    def __init__(
        self,
        ledger: Ledger,
        mints: Sequence[str],
        units: Sequence[str],
        client: httpx.AsyncClient,
    ) -> None:
        self.ledger = ledger
        self.units = tuple(check_unit(u) for u in units)
        self._apis = {_norm(m): MintApi(_norm(m), client) for m in mints}
        self._keysets = {m: MintKeysets(api, self.units) for m, api in self._apis.items()}
        # Ops awaited by a live request of this process: recovery leaves them alone.
        self.live = LiveOps()

    @property
    def mints(self) -> tuple[str, ...]:
        return tuple(self._apis)

    def api(self, mint_url: str) -> MintApi:
        try:
            return self._apis[_norm(mint_url)]
        except KeyError:
            accepted = ", ".join(self._apis)
            raise UntrustedMint(
                f"tokens from {mint_url} are not accepted here; accepted mints: {accepted}"
            ) from None

    async def start(self) -> None:
        """Load keysets of every trusted mint (a mint that is down is retried on first use)."""
        for mint_url in self._apis:
            try:
                await self._keysets[mint_url].load()
            except MintUnavailable as exc:
                logger.warning("mint not reachable at start: %s", exc)

    async def keyset(self, mint_url: str, keyset_id: str) -> Keyset:
        """The keyset ``keyset_id`` (full or short id) of a trusted mint."""
        return await self._keysets[mint_url].get(keyset_id)

    async def active_keyset(self, mint_url: str, unit: str) -> Keyset:
        return await self._keysets[mint_url].active(unit)

    def known_keyset(self, mint_url: str, keyset_id: str) -> Keyset:
        """A keyset already loaded; never asks the mint, so it is safe inside a ledger write."""
        keyset = self._keysets[mint_url].find(keyset_id)
        if keyset is None:
            raise MintUnavailable(f"keyset {keyset_id} of {mint_url} is not loaded yet")
        return keyset

    async def pool_keysets(self, mint_url: str, unit: str) -> Keyset:
        """Load the keysets of a pool's proofs now; returns the active keyset for outputs.

        Called before a write transaction that picks proofs from the pool, so that the
        input fee is computed from loaded keysets: no mint round trip holds the writer.
        """
        active = await self.active_keyset(mint_url, unit)
        rows = await self.ledger.db.fetchall(
            "SELECT DISTINCT keyset_id FROM proofs WHERE mint_url = ? AND unit = ? "
            "AND state = 'unspent'",
            (mint_url, unit),
        )
        for row in rows:
            await self.keyset(mint_url, str(row[0]))
        return active

    async def load_output_keyset(self, op_id: int) -> None:
        """Load the keyset of an op's outputs before a write transaction unblinds them."""
        op = await self.op(op_id)
        if op.outputs:
            await self.keyset(op.mint_url, op.outputs[0].keyset_id)

    def make_outputs(self, keyset: Keyset, amounts: list[int], role: str) -> list[BlindedOutput]:
        outputs = []
        for amount in amounts:
            secret = secrets.token_hex(32)
            B_, r = blind(secret)
            outputs.append(BlindedOutput(amount, keyset.id, secret, r, B_, role))
        return outputs

    def unblind_signatures(
        self, keyset: Keyset, outputs: Sequence[BlindedOutput], signatures: Sequence[Any]
    ) -> list[Proof]:
        """Turn the mint's blind signatures on ``outputs`` into proofs, checking their DLEQ."""
        proofs = []
        for output, sig in zip(outputs, signatures, strict=True):
            # A blank output (NUT-08 melt change) takes the amount the mint signed it for.
            amount = int(sig.get("amount", output.amount))
            A = _point(keyset.keys[amount])
            dleq = sig.get("dleq")
            if dleq and not verify_signature_dleq(output.B_, sig["C_"], dleq["e"], dleq["s"], A):
                raise MintError("the mint's DLEQ proof does not verify")
            C = unblind(sig["C_"], output.r, A)
            proofs.append(
                Proof(
                    amount=amount,
                    keyset_id=output.keyset_id,
                    secret=output.secret,
                    C=C,
                    dleq=Dleq(e=dleq["e"], s=dleq["s"], r=output.r) if dleq else None,
                )
            )
        return proofs

    # --- receive -------------------------------------------------------------------

    async def receive(
        self, text: str, account_id: str, account_kind: str, *, ref: str = ""
    ) -> Received:
        """Swap a token's proofs into the node and credit ``account_id`` with their value."""
        token = parse_token(text)
        mint_url = self.api(token.mint).url
        unit = self._unit(token)
        inputs, fee = await self._check_inputs(mint_url, unit, token)
        value = token.amount - fee
        if value <= 0:
            raise TokenTooSmall(
                f"the token is worth {token.amount} {unit} and the mint's input fee is {fee}"
            )
        keyset = await self.active_keyset(mint_url, unit)
        outputs = self.make_outputs(keyset, complete_split(value), "keep")
        fingerprint = token_fingerprint(token)
        async with self.ledger.db.write() as conn:
            if not await mark_processed(conn, "token", fingerprint):
                raise TokenAlreadySpent("this token was already received")
            await ensure_account(conn, account_id, account_kind)
            op_id = await journal.insert_op(
                conn,
                kind="receive",
                mint_url=mint_url,
                unit=unit,
                account_id=account_id,
                amount=token.amount,
                fee=fee,
                fingerprint=fingerprint,
                inputs=inputs,
                outputs=outputs,
                ref=ref or fingerprint,
            )
        with self.live.track(op_id):
            try:
                signatures = await self._apis[mint_url].swap(
                    [p.to_wire() for p in inputs], [o.to_wire() for o in outputs]
                )
            except MintUnavailable:
                if await self._resolve(op_id) != "done":
                    raise
            except MintError as exc:
                spent = exc.mint_code == SPENT_CODE
                await self._fail_receive(op_id, spent=spent, error=exc.message)
                if spent:
                    raise TokenAlreadySpent("the mint says this token is already spent") from None
                raise InvalidToken(f"the mint refused this token: {exc.message}") from None
            else:
                await self._finish_receive(op_id, signatures)
        await self._require_done(op_id)
        return Received(to_msat(value, unit), mint_url, unit, token.amount, fee, fingerprint)

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

    def _unit(self, token: Token) -> Unit:
        if token.unit not in self.units:
            raise UnsupportedUnit(
                f"tokens in {token.unit!r} are not accepted here; units: {', '.join(self.units)}"
            )
        return check_unit(token.unit)

    async def _check_inputs(
        self, mint_url: str, unit: str, token: Token
    ) -> tuple[list[Proof], int]:
        inputs: list[Proof] = []
        fee_ppk = 0
        for proof in token.proofs:
            keyset = await self.keyset(mint_url, proof.keyset_id)
            if keyset.unit != unit:
                raise InvalidToken(f"proof of keyset {keyset.id} is {keyset.unit}, not {unit}")
            key = keyset.keys.get(proof.amount)
            if key is None:
                raise InvalidToken(f"the mint has no key for amount {proof.amount}")
            if proof.dleq is not None and not verify_proof_dleq(proof, _point(key)):
                raise InvalidToken("a proof's DLEQ does not verify: not signed by this mint")
            fee_ppk += keyset.fee_ppk
            inputs.append(
                Proof(proof.amount, keyset.id, proof.secret, proof.C, witness=proof.witness)
            )
        return inputs, ceil_div(fee_ppk, 1000)

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
            await journal.set_op_state(conn, op_id, "failed", error=error)
            if not spent and op.fingerprint:
                # The mint never took the proofs: the same token may be offered again.
                await unmark_processed(conn, "token", op.fingerprint)

    # --- send ----------------------------------------------------------------------

    async def send(
        self,
        account_id: str,
        amount_msat: int,
        *,
        mint_url: str | None = None,
        unit: str | None = None,
        kind: str = "withdrawal",
        ref: str = "",
    ) -> Sent:
        """Debit ``amount_msat`` (whole units of the mint) and return it as a token.

        The mint's input fee for a needed swap comes out of the token's value.
        """
        mint_url, unit_ = await self.choose_pool(amount_msat, mint_url, unit)
        value = from_msat_floor(amount_msat, unit_)
        if value <= 0:
            raise TokenTooSmall(f"{amount_msat} msat is less than one {unit_}")
        debit_msat = to_msat(value, unit_)
        keyset = await self.pool_keysets(mint_url, unit_)
        async with self.ledger.db.write() as conn:
            await debit(conn, account_id, debit_msat, kind, ref)
            counts = await journal.pool_counts(conn, mint_url, unit_)
            exact = exact_subset(counts, value)
            chosen = exact or covering_subset(counts, value)
            if chosen is None:
                raise MintError(f"the node holds less than {value} {unit_} at {mint_url}")
            proofs = await journal.take_proofs(conn, mint_url, unit_, chosen)
            if exact is not None:
                token = serialize_token(Token(mint_url, unit_, tuple(proofs)))
                op_id = await journal.insert_op(
                    conn, kind="send", state="done", mint_url=mint_url, unit=unit_,
                    account_id=account_id, amount=value, debit_msat=debit_msat, token=token,
                    inputs=(), outputs=(), ref=ref,
                )  # fmt: skip
                await journal.set_proof_state(conn, [p.secret for p in proofs], "sent", op_id)
                await add_asset(conn, mint_url, unit_, -debit_msat)
                if kind != "change":  # change is what the pool's tied amount is kept for
                    await liabilities.check_move(conn, mint_url, unit_, account_id)
                return Sent(token, value, unit_, mint_url, 0, debit_msat)
            fee = self.input_fee(mint_url, proofs)
            if value - fee <= 0:
                raise TokenTooSmall(f"the mint's fee of {fee} {unit_} exceeds {value} {unit_}")
            total = sum(p.amount for p in proofs)
            outputs = self.make_outputs(keyset, complete_split(value - fee), "send")
            outputs += self.make_outputs(keyset, complete_split(total - value), "keep")
            op_id = await journal.insert_op(
                conn, kind="send", mint_url=mint_url, unit=unit_, account_id=account_id,
                amount=value, debit_msat=debit_msat, fee=fee, inputs=proofs, outputs=outputs,
                ref=ref,
            )  # fmt: skip
            await journal.set_proof_state(conn, [p.secret for p in proofs], "reserved", op_id)
            if kind != "change":
                await liabilities.check_move(conn, mint_url, unit_, account_id)
        with self.live.track(op_id):
            try:
                signatures = await self._apis[mint_url].swap(
                    [p.to_wire() for p in proofs], [o.to_wire() for o in outputs]
                )
            except MintUnavailable:
                if await self._resolve(op_id) != "done":
                    raise
            except MintError:
                await self._reverse_send(op_id, inputs_spent=False)
                raise
            else:
                await self._finish_send(op_id, signatures, deliver=True)
        op = await self._require_done(op_id)
        assert op.token is not None
        return Sent(op.token, value - fee, unit_, mint_url, fee, debit_msat)

    async def choose_pool(
        self, amount_msat: int, mint_url: str | None, unit: str | None
    ) -> tuple[str, Unit]:
        if mint_url is not None and unit is not None:
            return self.api(mint_url).url, check_unit(unit)
        rows = await self.ledger.db.fetchall(
            "SELECT mint_url, unit, value_msat FROM assets ORDER BY value_msat DESC"
        )
        for row in rows:
            if (
                (mint_url is None or _norm(mint_url) == row["mint_url"])
                and (unit is None or unit == row["unit"])
                and row["mint_url"] in self._apis
                and row["value_msat"] >= amount_msat
            ):
                return row["mint_url"], check_unit(row["unit"])
        raise MintError("no single mint holds enough to pay this amount out")

    def input_fee(self, mint_url: str, proofs: Sequence[Proof]) -> int:
        """The mint's input fee for spending ``proofs`` (their keysets must be loaded)."""
        ppk = sum(self.known_keyset(mint_url, p.keyset_id).fee_ppk for p in proofs)
        return ceil_div(ppk, 1000)

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

    async def _keep_late_swap(
        self, conn: aiosqlite.Connection, op: Op, signatures: Sequence[Any]
    ) -> None:
        """A send reversed elsewhere whose swap landed after all: its outputs are the node's.

        The reversal gave the account its money back and returned the inputs to the pool;
        now the inputs are spent and every output (``send`` and ``keep``) is ours. The
        mint's fee is the account's, as for any swap it asked for.
        """
        cursor = await conn.execute(
            "SELECT COUNT(*) FROM proofs WHERE op_id = ? AND state = 'unspent' AND secret IN "
            f"({', '.join('?' * len(op.inputs))})",
            (op.id, *(p.secret for p in op.inputs)),
        )
        row = await cursor.fetchone()
        if row is None or int(row[0]) != len(op.inputs):
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
            assert op.account_id is not None
            await credit(conn, op.account_id, op.debit_msat, "reversal", op.ref or "")
            if inputs_spent:
                lost = to_msat(sum(p.amount for p in op.inputs), check_unit(op.unit))
                await add_asset(conn, op.mint_url, op.unit, -lost)
                await log(conn, "operator", "loss", 0, op.ref or "", f"inputs spent: {lost}")

    # --- recovery ------------------------------------------------------------------

    async def op(self, op_id: int) -> Op:
        row = await self.ledger.db.fetchone("SELECT * FROM wallet_ops WHERE id = ?", (op_id,))
        if row is None:
            raise KeyError(op_id)
        return journal.ops_from_rows([row])[0]

    async def recover(self, *, older_than: int | None = None) -> dict[str, int]:
        """Finish or undo pending swaps; counts by outcome.

        At start-up every pending op is an orphan. While the node runs, pass ``older_than``
        (a time) so that swaps still awaited by a live request are left alone.
        """
        rows = await self.ledger.db.fetchall(
            "SELECT * FROM wallet_ops WHERE state = 'pending' AND kind IN ('receive', 'send') "
            "AND updated_at <= ? ORDER BY id",
            (older_than if older_than is not None else 2**62,),
        )
        outcome: dict[str, int] = {}
        for op in journal.ops_from_rows(rows):
            if op.id in self.live:
                continue  # a request of this process is still waiting for the mint
            try:
                result = await self._resolve(op.id, deliver=False)
            except MintUnavailable as exc:
                logger.warning("op %s stays pending: %s", op.id, exc)
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

    async def pending_op_for(self, fingerprint: str) -> Op | None:
        row = await self.ledger.db.fetchone(
            "SELECT * FROM wallet_ops WHERE fingerprint = ? ORDER BY id DESC LIMIT 1",
            (fingerprint,),
        )
        return journal.ops_from_rows([row])[0] if row else None

    async def balances(self) -> dict[tuple[str, str], int]:
        """Value of the proofs held, per (mint, unit), in the mint's unit."""
        rows = await self.ledger.db.fetchall(
            "SELECT mint_url, unit, SUM(amount) FROM proofs WHERE state IN ('unspent', 'reserved') "
            "GROUP BY mint_url, unit"
        )
        return {(r[0], r[1]): int(r[2]) for r in rows}


# --- BDHKE (NUT-00) and DLEQ (NUT-12) ------------------------------------------------


def blind(secret: str) -> tuple[str, str]:
    """``B_ = hash_to_curve(secret) + r*G`` with a fresh random ``r``; returns (B_, r) hex."""
    B_, r = b_dhke.step1_alice(secret)
    return B_.format().hex(), r.to_hex()


def unblind(C_: str, r: str, A: PublicKey) -> str:
    """``C = C_ - r*A``: the mint's signature on our secret, unblinded (hex)."""
    C = b_dhke.step3_alice(_point(C_), PrivateKey(bytes.fromhex(r)), A)
    return str(C.format().hex())


def hash_to_curve_hex(secret: str) -> str:
    """``Y = hash_to_curve(secret)``: how NUT-07 identifies a proof without revealing it."""
    return str(b_dhke.hash_to_curve(secret.encode()).format().hex())


def verify_signature_dleq(B_: str, C_: str, e: str, s: str, A: PublicKey) -> bool:
    """NUT-12: the mint proves ``C_ = a*B_`` for the same ``a`` as ``A = a*G``."""
    try:
        return bool(b_dhke.alice_verify_dleq(_point(B_), _point(C_), _scalar(e), _scalar(s), A))
    except ValueError:
        return False


def verify_proof_dleq(proof: Proof, A: PublicKey) -> bool:
    """NUT-12 for a received proof: rebuild ``B_``/``C_`` from ``secret``, ``r`` and ``C``."""
    dleq = proof.dleq
    if dleq is None:
        return True
    try:
        return bool(
            b_dhke.carol_verify_dleq(
                proof.secret, _scalar(dleq.r), _point(proof.C), _scalar(dleq.e), _scalar(dleq.s), A
            )
        )
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def _point(hex_text: str) -> PublicKey:
    """A curve point from hex; cached, since a mint's keys are parsed on every signature."""
    return PublicKey(bytes.fromhex(hex_text))


def _scalar(hex_text: str) -> PrivateKey:
    return PrivateKey(bytes.fromhex(hex_text))
