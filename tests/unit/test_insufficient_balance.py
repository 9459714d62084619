"""The one "insufficient balance" message every refusal uses (clients parse it)."""

from __future__ import annotations

from nodeprov.errors import InsufficientBalance, PaymentTooSmall


def test_message_floors_what_is_there_and_rounds_up_what_is_needed() -> None:
    error = InsufficientBalance.of(1_999, 2_001)
    assert error.message == (
        "Insufficient balance. Current: 1 sats, Required: 3 sats "
        "(1999 msat available, 2001 msat required)"
    )
    assert error.details == {"available_msat": 1_999, "required_msat": 2_001}
    assert (error.status, error.to_openai()["error"]["code"]) == (402, "insufficient_balance")


def test_hint_is_appended_and_nothing_available_reads_zero() -> None:
    error = InsufficientBalance.of(0, 1, "; deposit first")
    assert error.message == (
        "Insufficient balance. Current: 0 sats, Required: 1 sats "
        "(0 msat available, 1 msat required); deposit first"
    )


def test_a_suggestion_keeps_the_class_the_details_and_the_parsed_prefix() -> None:
    error = PaymentTooSmall.for_token(1_500, 0, "sat", 2_600)
    hinted = error.suggest_max_tokens("max_tokens", 42)
    assert type(hinted) is PaymentTooSmall and hinted.code == "token_too_small"
    assert hinted.details == {**error.details, "max_tokens": 42}
    assert hinted.message.startswith("Insufficient payment. Current: 1 sats, Required: 3 sats")
    assert hinted.message.endswith(" With max_tokens at most 42 the request would fit.")
