"""The one "insufficient balance" message every refusal uses (clients parse it)."""

from __future__ import annotations

from nodeprov.errors import InsufficientBalance


def test_message_floors_what_is_there_and_rounds_up_what_is_needed() -> None:
    error = InsufficientBalance.of(1_999, 2_001)
    assert error.message == "Insufficient balance. Current: 1 sats, Required: 3 sats"
    assert error.details == {"available_msat": 1_999, "required_msat": 2_001}
    assert (error.status, error.to_openai()["error"]["code"]) == (402, "insufficient_balance")


def test_hint_is_appended_and_nothing_available_reads_zero() -> None:
    error = InsufficientBalance.of(0, 1, "; deposit first")
    assert error.message == "Insufficient balance. Current: 0 sats, Required: 1 sats; deposit first"
