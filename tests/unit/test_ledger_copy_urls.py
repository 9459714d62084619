"""What ``nodeprov ledger copy`` prints of a PostgreSQL URL: never its password."""

from __future__ import annotations

import pytest

from nodeprov.core.db_base import url_password, url_without_password


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        (
            "postgresql://nodeprov:s3cret@db:5432/books",
            "postgresql://nodeprov@db:5432/books",
            "s3cret",
        ),
        ("postgresql://u:p%40ss@db/books", "postgresql://u@db/books", "p@ss"),
        ("postgresql://u:p@ss@db/books", "postgresql://u@db/books", "p@ss"),
        (
            "postgresql://u@db/books?password=x1&sslmode=require",
            "postgresql://u@db/books?sslmode=require",
            "x1",
        ),
        ("postgres://db/books", "postgres://db/books", ""),
        ("postgresql://u@[::1]:5432/books", "postgresql://u@[::1]:5432/books", ""),
    ],
)
def test_the_password_is_left_out_of_the_url_shown(url: str, shown: str, password: str) -> None:
    assert url_without_password(url) == shown
    assert url_password(url) == password
