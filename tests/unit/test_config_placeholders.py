"""Reserved example domains are placeholders; real hosts that merely look alike are not."""

from __future__ import annotations

import pytest

from nodeprov.config_placeholders import is_placeholder_host


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "mint.example.com",
        "LLM.Example.Org.",
        "example.net",
        "a.example",
        "x.invalid",
    ],
)
def test_reserved_example_domains_are_placeholders(host: str) -> None:
    assert is_placeholder_host(host)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "mint.minibits.cash", "myexample.com", "example.company.com", ""],
)
def test_real_hosts_are_not(host: str) -> None:
    assert not is_placeholder_host(host)
