"""The soak's outside money check (``tests/soak/books.py``) catches what it is there to catch."""

from __future__ import annotations

from tests.soak.books import AccountRange, Books, paid_for


def books_with(*tokens: tuple[str, int]) -> Books:
    books = Books()
    for token, msat in tokens:
        books.issue(token, msat)
    return books


def test_money_in_client_hands_or_on_the_node_is_conserved() -> None:
    books = books_with(("a", 5000), ("b", 3000))
    books.hand_over("b")
    books.taken_by_node("b", "key created")
    unspent = books.check_proofs({"a1": "UNSPENT", "b1": "SPENT"}, {"a": ["a1"], "b": ["b1"]})
    books.check_conservation(unspent, left_on_node_msat=3000)
    assert books.violations == []


def test_a_sat_lost_by_the_node_breaks_conservation() -> None:
    books = books_with(("a", 5000))
    books.hand_over("a")
    books.taken_by_node("a", "key created")
    unspent = books.check_proofs({"a1": "SPENT"}, {"a": ["a1"]})
    books.check_conservation(unspent, left_on_node_msat=4000)
    assert [v.rule for v in books.violations] == ["money_not_conserved"]
    assert "+1000 msat unaccounted" in books.violations[0].detail


def test_change_that_is_already_spent_is_a_violation() -> None:
    books = books_with(("a", 5000))
    books.hand_over("a")
    books.taken_by_node("a", "X-Cashu answered")
    books.receive("change", 2000, "change")
    books.check_proofs({"a1": "SPENT", "c1": "SPENT"}, {"a": ["a1"], "change": ["c1"]})
    assert [v.rule for v in books.violations] == ["client_token_spent"]


def test_a_refused_token_the_node_swapped_anyway_is_a_violation() -> None:
    books = books_with(("a", 1000))
    books.hand_over("a")
    books.returned("a", "refused")
    books.check_proofs({"a1": "SPENT"}, {"a": ["a1"]})
    assert [v.rule for v in books.violations] == ["client_token_spent"]


def test_a_token_whose_answer_was_lost_may_be_on_either_side() -> None:
    books = books_with(("a", 1000), ("b", 2000))
    books.hand_over("a")
    books.hand_over("b")
    unspent = books.check_proofs({"a1": "UNSPENT", "b1": "SPENT"}, {"a": ["a1"], "b": ["b1"]})
    assert unspent == 1000
    assert books.violations == []


def test_a_proof_in_two_tokens_is_a_violation() -> None:
    books = books_with(("a", 1000))
    books.receive("b", 1000, "change")
    books.check_proofs({"p": "UNSPENT"}, {"a": ["p"], "b": ["p"]})
    assert "proof_given_twice" in [v.rule for v in books.violations]


def test_a_sat_token_pays_whole_sats_rounded_up() -> None:
    assert paid_for(1001, "sat") == 2000
    assert paid_for(1000, "sat") == 1000
    assert paid_for(1001, "msat") == 1001
    books = Books()
    books.check_payment("job", 8000, 6000, 1001, "sat")
    assert books.violations == []
    books.check_payment("job", 8000, 5000, 1001, "sat")
    assert [v.rule for v in books.violations] == ["paid_wrong_amount"]


def test_an_account_range_widens_for_lost_answers() -> None:
    account = AccountRange()
    account.credit(10_000)
    account.debit(1_200)
    account.debit(0, certain=False, at_most=2_000)
    account.credit(500, certain=False)
    assert (account.lo, account.hi) == (6_800, 9_300)
    assert account.holds(8_800) and not account.holds(9_301) and not account.holds(6_799)
