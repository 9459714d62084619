"""A child-key request's options (Routstr's field names) and a child's spending room: pure."""

from __future__ import annotations

from typing import Any

import pytest

from nodeprov.errors import InvalidRequest
from nodeprov.protocol.child_keys import (
    MAX_COUNT,
    MAX_LABEL,
    ChildKeyRequest,
    parse_child_key_request,
    remaining_msat,
    spendable_msat,
)

NOW = 1_800_000_000


def test_an_empty_request_asks_for_one_unlimited_child_without_expiry() -> None:
    assert parse_child_key_request({}, NOW) == ChildKeyRequest(1, None, None, None)


def test_routstr_field_names_set_count_limit_and_expiry_and_label_is_ours() -> None:
    got = parse_child_key_request(
        {"count": 3, "balance_limit": 5000, "validity_date": NOW + 60, "label": "ci runner"}, NOW
    )
    assert got == ChildKeyRequest(3, 5000, NOW + 60, "ci runner")


def test_expires_at_is_taken_as_our_name_for_validity_date() -> None:
    assert parse_child_key_request({"expires_at": NOW + 1}, NOW).expires_at == NOW + 1


def test_query_string_digits_are_whole_numbers() -> None:
    got = parse_child_key_request({"count": "2", "balance_limit": "7"}, NOW)
    assert (got.count, got.limit_msat) == (2, 7)


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"count": 0}, "count"),
        ({"count": MAX_COUNT + 1}, "count"),
        ({"count": 1.5}, "count"),
        ({"balance_limit": -1}, "balance_limit"),
        ({"balance_limit": 0}, "balance_limit"),
        ({"balance_limit": 1.0}, "balance_limit"),
        ({"balance_limit": True}, "balance_limit"),
        ({"balance_limit": "12abc"}, "balance_limit"),
        ({"validity_date": NOW}, "validity_date"),
        ({"validity_date": NOW - 5}, "validity_date"),
        ({"expires_at": NOW + 5, "validity_date": NOW + 6}, "validity_date"),
        ({"label": 5}, "label"),
        ({"label": "x" * (MAX_LABEL + 1)}, "label"),
        ({"label": "line\nbreak"}, "label"),
        ({"balance_limit_reset": "daily"}, "balance_limit_reset"),
    ],
)
def test_bad_options_are_refused_naming_the_field(params: dict[str, Any], names: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_child_key_request(params, NOW)
    assert names in refused.value.message


def test_a_null_balance_limit_reset_is_accepted_as_no_reset() -> None:
    assert parse_child_key_request({"balance_limit_reset": None}, NOW).count == 1


def test_an_empty_label_is_no_label() -> None:
    assert parse_child_key_request({"label": "  "}, NOW).label is None


def test_remaining_is_the_limit_less_spent_and_reserved_and_none_without_limit() -> None:
    assert remaining_msat(None, 10, 5) is None
    assert remaining_msat(100, 30, 20) == 50
    assert remaining_msat(100, 100, 0) == 0


def test_what_a_child_can_spend_now_is_the_smaller_of_its_room_and_the_parents_balance() -> None:
    assert spendable_msat(1000, None, 0, 0) == 1000
    assert spendable_msat(1000, 300, 100, 50) == 150
    assert spendable_msat(80, 300, 100, 50) == 80
    assert spendable_msat(-5, 300, 0, 0) == 0
