"""Secrets machines share: the Nostr key (NODEPROV_NOSTR__KEY) and the API-key secret
(NODEPROV_NODE__API_KEY_SECRET) come from the environment, never touch the disk, never show."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from nodeprov.core.identity import node_keys
from nodeprov.core.key_secret import derive_api_key, node_secret
from nodeprov.errors import ConfigError
from nodeprov.protocol.nostr_event import Keys
from tests.unit.test_config import MINIMAL, load


def test_a_nostr_key_from_the_environment_is_used_and_never_written_or_shown(
    tmp_path: Path,
) -> None:
    keys = Keys.generate()
    for given in (keys.nsec, keys.secret_key):  # nsec or hex (all-digit hex stays text)
        config = load(tmp_path, MINIMAL, {"NODEPROV_NOSTR__KEY": given})
        assert node_keys(config).npub == keys.npub
        assert not config.nostr_key_path.exists()  # no key file was made
        assert given not in repr(config) and keys.secret_key not in repr(config)


def test_without_a_nostr_key_in_the_environment_the_key_file_is_made_and_kept(
    tmp_path: Path,
) -> None:
    config = load(tmp_path, MINIMAL)
    made = node_keys(config)
    assert config.nostr_key_path.is_file() and node_keys(config) == made


def test_a_bad_nostr_key_names_the_setting_not_the_value(tmp_path: Path) -> None:
    bad = "nsec1" + "q" * 58
    config = load(tmp_path, MINIMAL, {"NODEPROV_NOSTR__KEY": bad})
    with pytest.raises(ConfigError) as info:
        node_keys(config)
    assert "NODEPROV_NOSTR__KEY" in info.value.message and bad not in info.value.message


def test_machines_with_one_api_key_secret_derive_the_same_keys(tmp_path: Path) -> None:
    shared = secrets.token_hex(32)
    env = {"NODEPROV_NODE__API_KEY_SECRET": shared}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = load(tmp_path / "a", MINIMAL, env), load(tmp_path / "b", MINIMAL, env)
    secret_a = node_secret(a.node.api_key_secret, a.api_key_secret_path)
    secret_b = node_secret(b.node.api_key_secret, b.api_key_secret_path)
    assert secret_a == secret_b == bytes.fromhex(shared)
    assert derive_api_key(secret_a, "fp") == derive_api_key(secret_b, "fp")
    assert not a.api_key_secret_path.exists() and shared not in repr(a)
    # Without it each data dir makes its own (0600) file.
    c = load(tmp_path, MINIMAL)
    assert node_secret(c.node.api_key_secret, c.api_key_secret_path) != secret_a
    assert c.api_key_secret_path.stat().st_mode & 0o777 == 0o600


def test_a_bad_api_key_secret_is_one_clear_error(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL, {"NODEPROV_NODE__API_KEY_SECRET": "abcd"})
    with pytest.raises(ConfigError, match="64 hex digits"):
        node_secret(config.node.api_key_secret, config.api_key_secret_path)


def test_the_banner_shows_the_postgresql_ledger_without_its_password(tmp_path: Path) -> None:
    url = "postgresql://books:s3cret@db.internal:5432/nodeprov"
    config = load(tmp_path, MINIMAL, {"NODEPROV_LEDGER__URL": url})
    shown = config.ledger_shown
    assert shown == "postgresql://books:***@db.internal:5432/nodeprov" and "s3cret" not in shown
    assert load(tmp_path, MINIMAL).ledger_shown == str(tmp_path / "data" / "ledger.sqlite3")


def test_the_banner_hides_a_password_given_as_a_url_parameter_too(tmp_path: Path) -> None:
    url = "postgresql://books@db.internal:5432/nodeprov?password=s3cret&sslmode=require"
    shown = load(tmp_path, MINIMAL, {"NODEPROV_LEDGER__URL": url}).ledger_shown
    assert "s3cret" not in shown and "password=%2A%2A%2A" in shown and "sslmode=require" in shown
