"""The node's Cashu wallet: receive tokens into it, send tokens out of it.

Receive swaps a user's proofs for fresh ones at the mint so the node owns them; send hands
out proofs (from the pool when an exact set exists, else after one swap); melt
(``core.melt``) pays a Lightning invoice. Each step is journalled (``core.journal``) before
the mint is called, so :meth:`Wallet.recover` (``core.wallet_recovery``) can finish or undo
anything a crash interrupted. The crypto is in ``core.bdhke``, the only module that
imports ``cashu``; mint access and keysets are in ``core.mint_access``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from nodeprov.core import journal, liabilities
from nodeprov.core.bdhke import hash_to_curve_hex as hash_to_curve_hex
from nodeprov.core.bdhke import point, verify_proof_dleq
from nodeprov.core.denominations import complete_split, covering_subset, exact_subset
from nodeprov.core.ledger import add_asset, debit, ensure_account, mark_processed
from nodeprov.core.mint_access import KeysetNotLoaded, norm
from nodeprov.core.mint_api import SPENT_CODE
from nodeprov.core.money import Unit, ceil_div, check_unit, from_msat_floor, to_msat
from nodeprov.core.wallet_recovery import WalletRecovery
from nodeprov.errors import (
    InvalidToken,
    MintError,
    MintUnavailable,
    TokenAlreadySpent,
    TokenTooSmall,
    UnsupportedUnit,
    WithdrawalTooLarge,
)
from nodeprov.protocol.cashu_token import (
    Proof,
    Token,
    parse_token,
    proof_ids,
    serialize_token,
    token_fingerprint,
)

logger = logging.getLogger(__name__)

# The most proofs a token the node sends may carry as they are. A pool grown from many small
# payments can make an exact subset of thousands of proofs, a token no wallet reads; past
# this, the proofs are swapped into a short split (one mint round trip) instead.
MAX_SEND_PROOFS = 64


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
class Appraisal:
    """What a token is worth here, read from the token and the mint's keysets: no swap.

    The mint is trusted, the unit accepted, every proof of a known keyset of that unit (its
    DLEQ checked when present); ``fee`` is the mint's input fee for these proofs.
    """

    token: Token
    mint_url: str
    unit: Unit
    inputs: tuple[Proof, ...]
    fee: int

    @property
    def value(self) -> int:
        """The token's amount less the input fee, in ``unit``: what a receive credits."""
        return self.token.amount - self.fee

    @property
    def value_msat(self) -> int:
        return to_msat(self.value, self.unit)

    @property
    def proof_ids(self) -> tuple[str, ...]:
        """The ids of the token's proofs (:func:`~nodeprov.protocol.cashu_token.proof_ids`)."""
        return proof_ids(p.secret for p in self.inputs)


@dataclass(frozen=True)
class Sent:
    """A token given out: its text and value (in ``unit``), and the swap fee it cost."""

    token: str
    amount: int
    unit: Unit
    mint_url: str
    fee: int
    debited_msat: int


class Wallet(WalletRecovery):
    """Proofs at the trusted mints: take tokens in, give tokens out."""

    # --- receive -------------------------------------------------------------------

    async def appraise(self, text: str) -> Appraisal:
        """Check a token against what it says (mint, unit, keysets, fee) before any swap.

        Untrusted mint, unit not accepted, unknown keyset or amount, a bad DLEQ, or nothing
        left after the input fee: refused here, so the sender's proofs stay unspent.
        """
        token = parse_token(text)
        mint_url = self.api(token.mint).url
        unit = self._unit(token)
        inputs, fee = await self._check_inputs(mint_url, unit, token)
        if token.amount - fee <= 0:
            raise TokenTooSmall(
                f"the token is worth {token.amount} {unit} and the mint's input fee is {fee}"
            )
        return Appraisal(token, mint_url, unit, tuple(inputs), fee)

    async def receive(
        self, text: str | Appraisal, account_id: str, account_kind: str, *, ref: str = ""
    ) -> Received:
        """Swap a token's proofs into the node and credit ``account_id`` with their value.

        ``text`` may be the token's :meth:`appraise` result (checked already).
        """
        offer = text if isinstance(text, Appraisal) else await self.appraise(text)
        mint_url, unit = offer.mint_url, offer.unit
        keyset = await self.active_keyset(mint_url, unit)
        outputs = self.make_outputs(keyset, complete_split(offer.value), "keep")
        fingerprint = token_fingerprint(offer.token)
        async with self.ledger.db.write() as conn:
            if not await mark_processed(conn, "token", fingerprint):
                raise TokenAlreadySpent("this token was already received")
            await journal.mark_taken(conn, offer.proof_ids, taken=True)
            await ensure_account(conn, account_id, account_kind)
            op_id = await journal.insert_op(
                conn,
                kind="receive",
                mint_url=mint_url,
                unit=unit,
                account_id=account_id,
                amount=offer.token.amount,
                fee=offer.fee,
                fingerprint=fingerprint,
                inputs=offer.inputs,
                outputs=outputs,
                ref=ref or fingerprint,
            )
        with self.live.track(op_id):
            try:
                signatures = await self._apis[mint_url].swap(
                    [p.to_wire() for p in offer.inputs], [o.to_wire() for o in outputs]
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
        amount = offer.token.amount
        return Received(offer.value_msat, mint_url, unit, amount, offer.fee, fingerprint)

    async def seen_before(self, offer: Appraisal) -> bool:
        """Whether the ledger knows this token, or any of its proofs, as taken already."""
        return await journal.seen_before(
            self.ledger.db, token_fingerprint(offer.token), offer.proof_ids
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
            if proof.dleq is not None and not verify_proof_dleq(proof, point(key)):
                raise InvalidToken("a proof's DLEQ does not verify: not signed by this mint")
            fee_ppk += keyset.fee_ppk
            inputs.append(
                Proof(proof.amount, keyset.id, proof.secret, proof.C, witness=proof.witness)
            )
        return inputs, ceil_div(fee_ppk, 1000)

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
        args = (account_id, amount_msat, mint_url, unit, kind, ref)
        try:
            return await journal.retry_busy(lambda: self._send(*args))
        # Only the input fee inside the first write raises it (rolled back, before any mint
        # call); the later steps load their keyset before their own write.
        except KeysetNotLoaded as exc:
            await self.keyset(exc.mint_url, exc.keyset_id)
            return await journal.retry_busy(lambda: self._send(*args))

    async def _send(
        self,
        account_id: str,
        amount_msat: int,
        mint_url: str | None,
        unit: str | None,
        kind: str,
        ref: str,
    ) -> Sent:
        owner = account_id if kind != "change" else None
        mint_url, unit_ = await self.choose_pool(amount_msat, mint_url, unit, owner)
        value = from_msat_floor(amount_msat, unit_)
        if value <= 0:
            raise TokenTooSmall(f"{amount_msat} msat is less than one {unit_}")
        debit_msat = to_msat(value, unit_)
        keyset = await self.pool_keysets(mint_url, unit_)
        async with self.ledger.db.write() as conn:
            await liabilities.lock_pool(conn, mint_url, unit_)  # before the account's row
            await debit(conn, account_id, debit_msat, kind, ref)
            counts = await journal.pool_counts(conn, mint_url, unit_)
            exact = exact_subset(counts, value)
            if exact is not None and sum(exact.values()) > MAX_SEND_PROOFS:
                exact = None  # too long to send as is: swap it into a short split
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
        self,
        amount_msat: int,
        mint_url: str | None,
        unit: str | None,
        account_id: str | None = None,
    ) -> tuple[str, Unit]:
        """The (mint, unit) pool to pay ``amount_msat`` from: the largest that can.

        With ``account_id``, a pool qualifies only if the move leaves it what it owes
        (``core.liabilities``); the move itself is checked again when it is made.
        """
        if mint_url is not None and unit is not None:
            return self.api(mint_url).url, check_unit(unit)
        pools = await self._capacities(mint_url, unit, account_id)
        for pool, pool_unit, can in pools:
            if can >= amount_msat:
                return pool, check_unit(pool_unit)
        most = max((can for _, _, can in pools), default=0)
        where = f" in {unit}" if unit else " from one mint and unit"
        where += f" at {norm(mint_url)}" if mint_url else ""
        raise WithdrawalTooLarge(
            f"the node can pay at most {most} msat{where} now; {amount_msat} msat were asked",
            max_msat=most,
        )

    async def most_one_pool_pays(
        self, account_id: str, mint_url: str | None = None, unit: str | None = None
    ) -> int:
        """The most msat one pool (of ``mint_url``/``unit`` if given) can pay ``account_id``."""
        pools = await self._capacities(mint_url, unit, account_id)
        return max((can for _, _, can in pools), default=0)

    async def _capacities(
        self, mint_url: str | None, unit: str | None, account_id: str | None
    ) -> list[tuple[str, str, int]]:
        """(mint, unit, msat it can pay) of each trusted pool that matches, largest pool first.

        With ``account_id``, a pool pays only what leaves it what it owes others
        (``core.liabilities``).
        """
        rows = await self.ledger.db.fetchall(
            "SELECT mint_url, unit, value_msat FROM assets ORDER BY value_msat DESC"
        )
        pools = []
        for row in rows:
            if (
                (mint_url is None or norm(mint_url) == row["mint_url"])
                and (unit is None or unit == row["unit"])
                and row["mint_url"] in self._apis
            ):
                can = int(row["value_msat"])
                if account_id is not None:
                    fetch = liabilities.committed(self.ledger.db)
                    can = min(can, await liabilities.headroom(fetch, row[0], row[1], account_id))
                pools.append((str(row["mint_url"]), str(row["unit"]), can))
        return pools

    def input_fee(self, mint_url: str, proofs: Sequence[Proof]) -> int:
        """The mint's input fee for spending ``proofs`` (their keysets must be loaded)."""
        ppk = sum(self.known_keyset(mint_url, p.keyset_id).fee_ppk for p in proofs)
        return ceil_div(ppk, 1000)
