"""The Nostr key file: written aside, synced and linked into place, 0600 from creation."""

from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.identity import load_or_create_keys
from nodeprov.errors import ConfigError


def test_a_failed_first_write_leaves_no_key_file_and_the_next_start_creates_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "data" / "nostr.key"
    real_fdopen = os.fdopen

    class Full:
        """A file whose every write fails as on a full disk."""

        def __init__(self, fd: int) -> None:
            self.file = real_fdopen(fd, "w")

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r": Full(fd))
    with pytest.raises(OSError):
        load_or_create_keys(path)
    monkeypatch.undo()  # space again
    assert list(path.parent.iterdir()) == []  # neither an empty key nor a temporary left
    keys = load_or_create_keys(path)
    assert keys.npub.startswith("npub")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_keys(path) == keys


def test_concurrent_first_starts_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "data" / "nostr.key"
    with ThreadPoolExecutor(8) as pool:
        npubs = {k.npub for k in pool.map(lambda _: load_or_create_keys(path), range(16))}
    assert len(npubs) == 1
    assert [p.name for p in path.parent.iterdir()] == ["nostr.key"]


def test_an_empty_key_file_left_by_an_older_version_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "nostr.key"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"empty .*delete it"):
        load_or_create_keys(path)
