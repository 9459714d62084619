"""The soak's own books: the money as the clients see it, kept outside the node (sans-I/O).

Every token the faucet gives a client is counted as issued. A token the client hands to the
node ends in one of three places: definitely taken (the node answered; its proofs must be
spent at the end), definitely returned (the node refused it; its proofs must still be
unspent) or unknown (the answer was lost to a fault; either is fine, and the final drain
tells). Tokens the node gives back (change, refunds, withdrawals) join the client's wallet.

An account on the node (API key, token used as a key, npub) is tracked as a range
``[lo, hi]`` msat: certain moves shift both ends, a move whose outcome was lost widens it.

At the end everything is drained back into client tokens and the node's leftovers are read
from its own books, so that ``issued == unspent in client hands + left on the node``: any
sat lost, created or paid twice breaks the equation. Each check that fails is a
:class:`Violation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["AccountRange", "Books", "Violation", "paid_for"]


@dataclass(frozen=True)
class Violation:
    """One broken rule: what, and the operation it was seen in."""

    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


@dataclass
class AccountRange:
    """What one account on the node should hold, msat: between ``lo`` and ``hi``."""

    lo: int = 0
    hi: int = 0

    def credit(self, msat: int, *, certain: bool = True) -> None:
        self.hi += msat
        if certain:
            self.lo += msat

    def debit(self, msat: int, *, certain: bool = True, at_most: int | None = None) -> None:
        """A certain debit of ``msat``, or (not certain) anything from 0 up to ``at_most``."""
        if certain:
            self.lo -= msat
            self.hi -= msat
        else:
            self.lo -= msat if at_most is None else at_most

    def holds(self, balance_msat: int) -> bool:
        return self.lo <= balance_msat <= self.hi


def paid_for(cost_msat: int, unit: str) -> int:
    """What a token of ``unit`` pays for ``cost_msat`` (a sat token pays whole sats, rounded up)."""
    return -(-cost_msat // 1000) * 1000 if unit == "sat" else cost_msat


@dataclass
class Books:
    """The clients' side of the money (all amounts msat)."""

    issued_msat: int = 0
    wallet: dict[str, int] = field(default_factory=dict)  # token -> msat, held by a client
    taken: dict[str, int] = field(default_factory=dict)  # token -> msat, the node took it
    unknown: dict[str, int] = field(default_factory=dict)  # token -> msat, outcome lost
    accounts: dict[str, AccountRange] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # token -> why it is where it is
    evidence: list[str] = field(default_factory=list)  # whole tokens behind violations
    history: dict[str, list[str]] = field(default_factory=dict)  # token -> its moves

    def _moved(self, token: str, move: str) -> None:
        self.history.setdefault(token, []).append(move)

    answered: int = 0  # jobs answered (their cost known)
    charged_msat: int = 0  # what the node said those jobs cost

    # --- tokens -------------------------------------------------------------------------

    def issue(self, token: str, msat: int) -> None:
        """The faucet gave a client ``token``."""
        if token in self.wallet or token in self.taken or token in self.unknown:
            self.violation("faucet_reissued", f"{short(token)} ({self.why.get(token)})")
        self._moved(token, "issued")
        self.issued_msat += msat
        self.wallet[token] = msat
        self.why[token] = "issued by the faucet"

    def hand_over(self, token: str) -> int:
        """The client sends ``token`` to the node; its outcome is unknown until settled."""
        self._moved(token, "handed over")
        msat = self.wallet.pop(token)
        self.unknown[token] = msat
        return msat

    def taken_by_node(self, token: str, why: str) -> None:
        self._moved(token, "taken: " + why)
        self.taken[token] = self.unknown.pop(token)
        self.why[token] = why

    def returned(self, token: str, why: str) -> None:
        """The node refused the token without taking it: it is the client's again."""
        self._moved(token, "returned: " + why)
        self.wallet[token] = self.unknown.pop(token)
        self.why[token] = why

    def receive(self, token: str, msat: int, why: str) -> None:
        """Change, a refund or a withdrawal reached a client."""
        self._moved(token, "received: " + why)
        if token in self.wallet:
            return  # the same token seen twice (an answer and a later claim)
        self.wallet[token] = msat
        self.why[token] = why

    def account(self, name: str) -> AccountRange:
        return self.accounts.setdefault(name, AccountRange())

    def violation(self, rule: str, detail: str) -> Violation:
        found = Violation(rule, detail)
        self.violations.append(found)
        return found

    # --- checks -------------------------------------------------------------------------

    def check_payment(self, what: str, token_msat: int, change_msat: int, cost_msat: int,
                      unit: str) -> None:  # fmt: skip
        """A token paid one job: it must have paid exactly the cost (rounded to the unit)."""
        paid = token_msat - change_msat
        if paid != paid_for(cost_msat, unit):
            self.violation(
                "paid_wrong_amount",
                f"{what}: token {token_msat} msat, change {change_msat} msat, so paid {paid}; "
                f"the job cost {cost_msat} msat ({unit} token: should pay "
                f"{paid_for(cost_msat, unit)})",
            )

    def check_account(self, name: str, balance_msat: int) -> None:
        expected = self.account(name)
        if not expected.holds(balance_msat):
            self.violation(
                "account_balance",
                f"{name}: the node reports {balance_msat} msat, the client's books say "
                f"{expected.lo}..{expected.hi}",
            )

    def check_proofs(
        self, states: Mapping[str, str], secrets_of: Mapping[str, Iterable[str]]
    ) -> int:
        """Check the proofs' states at the mint; return the msat unspent in client hands.

        ``states``: proof secret -> "UNSPENT" | "SPENT" | "PENDING"; ``secrets_of``: token ->
        its proofs' secrets. A client's token must be wholly unspent, a taken one wholly
        spent, an unknown one either; no proof may be in two tokens.
        """
        seen: dict[str, str] = {}
        for token, secrets in secrets_of.items():
            for secret in secrets:
                other = seen.setdefault(secret, token)
                if other != token:
                    self.violation(
                        "proof_given_twice", f"a proof is in two tokens: {short(other)}, "
                        f"{short(token)}"
                    )  # fmt: skip
        unspent = 0
        for token, msat in self.wallet.items():
            bad = [s for s in secrets_of[token] if states.get(s) != "UNSPENT"]
            if bad:
                self.evidence.append(f"client_token_spent {self.history.get(token)}: {token}")
                self.violation(
                    "client_token_spent",
                    f"{short(token)} ({msat} msat) is in a client's hands "
                    f"({self.why.get(token)}) but {len(bad)} of its "
                    f"proofs are {states.get(bad[0])} at the mint",
                )
            else:
                unspent += msat
        for token, msat in self.taken.items():
            if any(states.get(s) == "UNSPENT" for s in secrets_of[token]):
                self.violation(
                    "taken_token_unspent",
                    f"{short(token)} ({msat} msat): the node answered as if it took it "
                    f"({self.why.get(token)}), but it is unspent at the mint",
                )
        for token, msat in self.unknown.items():
            found = {states.get(s) for s in secrets_of[token]}
            if found == {"UNSPENT"}:
                unspent += msat
            elif found != {"SPENT"}:
                self.violation(
                    "token_half_spent", f"{short(token)} ({msat} msat): proofs {sorted(found)}"
                )  # fmt: skip
        return unspent

    def check_conservation(self, unspent_msat: int, left_on_node_msat: int) -> None:
        """Everything issued is unspent in client hands or still owed by the node."""
        if unspent_msat + left_on_node_msat != self.issued_msat:
            self.violation(
                "money_not_conserved",
                f"issued {self.issued_msat} msat to clients; they hold {unspent_msat} msat "
                f"unspent and the node owes {left_on_node_msat} msat: "
                f"{self.issued_msat - unspent_msat - left_on_node_msat:+d} msat unaccounted",
            )


def short(token: str) -> str:
    return token[:12] + "…" + token[-6:]
