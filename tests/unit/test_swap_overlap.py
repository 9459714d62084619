"""The overlap gate's bounds: slots per client, a bounded memory of failed swaps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from nodeprov.core.overlap import SwapOverlap
from nodeprov.http.openai_routes import client_of


def test_each_client_has_its_own_slots_and_the_extra_request_waits() -> None:
    gate = SwapOverlap(per_client=2)
    assert gate.take("a") and gate.take("a")
    assert not gate.take("a")  # at its limit: swaps first
    assert gate.take("b")  # another client is not affected
    assert gate.waited == 1
    gate.give_back("a")
    assert gate.open_starts("a") == 1
    assert gate.take("a")
    for _ in range(2):
        gate.give_back("a")
    gate.give_back("b")
    assert gate.open_starts("a") == gate.open_starts("b") == 0


def test_the_memory_of_failed_swaps_is_bounded_and_forgets_the_oldest() -> None:
    gate = SwapOverlap(remember=3)
    gate.failed(["p1", "p2"])
    gate.failed(["p3", "p4"])
    assert not gate.failed_before(["p1"])
    assert gate.failed_before(["x", "p2"]) and gate.failed_before(["p4"])
    gate.failed(["p2"])  # seen again: now the newest
    gate.failed(["p5"])
    assert gate.failed_before(["p2"]) and not gate.failed_before(["p3"])


@pytest.mark.parametrize(
    ("host", "client"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::/64"),
        ("2001:db8::ffff:1", "2001:db8::/64"),  # the same /64: one client
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("testclient", "testclient"),
    ],
)
def test_the_client_is_its_address_and_an_ipv6_one_its_64(host: str, client: str) -> None:
    request: Any = SimpleNamespace(client=SimpleNamespace(host=host))
    assert client_of(request) == client


def test_no_address_no_overlap() -> None:
    request: Any = SimpleNamespace(client=None)
    assert client_of(request) is None


def test_failed_swaps_trip_the_overlap_off_node_wide_for_a_while() -> None:
    now = [1000.0]
    gate = SwapOverlap(
        per_client=2, trip_after=3, window=60.0, cooldown=120.0, clock=lambda: now[0]
    )
    assert gate.take("a")
    gate.give_back("a")
    for i in range(3):
        gate.failed([f"p{i}"])
    assert gate.tripped
    assert not gate.take("b")  # nobody overlaps while tripped: they swap first
    now[0] += 119.0
    assert not gate.take("b")
    now[0] += 2.0
    assert not gate.tripped and gate.take("b")


def test_failures_spread_wider_than_the_window_never_trip() -> None:
    now = [0.0]
    gate = SwapOverlap(trip_after=3, window=60.0, cooldown=120.0, clock=lambda: now[0])
    for i in range(10):
        gate.failed([f"p{i}"])
        now[0] += 31.0
    assert not gate.tripped
