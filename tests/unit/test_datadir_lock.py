"""One owner per data dir: the lock is on the directory, the lock file only names the holder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeprov.core.datadir import LOCK_FILE, DataDirBusy, DataDirLock


def test_a_removed_lock_file_does_not_let_a_second_owner_in(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with DataDirLock.acquire(data):  # the running daemon
        (data / LOCK_FILE).unlink()  # a "stale lock file" removed by hand or a clean-up
        with pytest.raises(DataDirBusy) as refused:
            DataDirLock.acquire(data).release()
        assert refused.value.pid is None  # who holds it is unknown now; that it is held is not
    with DataDirLock.acquire(data):  # released: the next owner gets in
        pass


def test_the_second_start_is_told_who_holds_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with DataDirLock.acquire(data, "start"):
        assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\nstart\n"
        with pytest.raises(DataDirBusy, match=f"already running \\(pid {os.getpid()}, "):
            DataDirLock.acquire(data, "wallet withdraw")
        assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\nstart\n"  # left as it was
    assert (data / LOCK_FILE).read_text() == ""  # released
