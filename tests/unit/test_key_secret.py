"""The API-key secret file and the keys derived from it."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nodeprov.core.key_secret import SECRET_FILE, derive_api_key, load_or_create_secret
from nodeprov.errors import ConfigError


def test_secret_is_created_0600_once_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "data" / SECRET_FILE
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: load_or_create_secret(path), range(16)))
    assert len(secrets) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [SECRET_FILE]  # no temporary left
    assert load_or_create_secret(path) == secrets.pop()


def test_loose_mode_is_tightened_and_garbage_refused(tmp_path: Path) -> None:
    path = tmp_path / SECRET_FILE
    secret = load_or_create_secret(path)
    path.chmod(0o644)
    assert load_or_create_secret(path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("not hex\n")
    with pytest.raises(ConfigError, match="secret"):
        load_or_create_secret(path)
    path.write_text("")  # never left by a crash (written aside, then linked), but refused
    with pytest.raises(ConfigError):
        load_or_create_secret(path)


def test_derived_keys_depend_on_secret_and_token() -> None:
    a, b = b"\1" * 32, b"\2" * 32
    key = derive_api_key(a, "f" * 64)
    assert key.startswith("sk-") and len(key) == 46
    assert derive_api_key(a, "f" * 64) == key
    assert derive_api_key(b, "f" * 64) != key
    assert derive_api_key(a, "e" * 64) != key
