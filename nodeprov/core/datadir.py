"""The data dir: private to its user (0700, files 0600) and owned by one process at a time.

Ownership is an OS lock (``flock``) on the data dir itself, not the mere presence of a pid
file: the kernel drops the lock when its holder exits, however it exits, so a process
killed with SIGKILL never blocks the next start. The lock is on the directory, not on a
file in it, because a file can be deleted (a "stale lock" clean-up) and a new one created
and locked by a second owner; the directory cannot be replaced under a running ledger.
``<data_dir>/nodeprov.lock`` (pid and command of the holder) only says who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from nodeprov.errors import NodeprovError

log = logging.getLogger(__name__)

LOCK_FILE = "nodeprov.lock"
DIR_MODE = 0o700
FILE_MODE = 0o600


class DataDirBusy(NodeprovError):
    """Another process owns the data dir (a running daemon or a money-moving command)."""

    code = "data_dir_busy"

    def __init__(self, data_dir: Path, pid: int | None, command: str) -> None:
        self.data_dir, self.pid, self.command = data_dir, pid, command
        super().__init__(f"already running (pid {pid or '?'}, data dir {data_dir})")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700; tighten it if it is looser."""
    path = path.expanduser()
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("data dir %s had mode %o; setting 0700", path, mode)
        path.chmod(DIR_MODE)
    return path


def read_or_create_secret_file(path: Path, make: Callable[[], str], what: str) -> str:
    """The text of the 0600 file at ``path``, written first with ``make()`` if it is missing.

    Written to a temporary file, fsynced, then linked into place: a crash never leaves a
    half-written file, and of two concurrent creators the first one's content wins.
    """
    if not path.exists():
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(make() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if another process created it first
                log.info("created %s at %s", what, path)
            except FileExistsError:
                pass  # created concurrently: that one stands
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s %s had mode %o; setting 0600", what, path, mode)
        path.chmod(FILE_MODE)
    return path.read_text().strip()


def private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600 before anyone else creates it (no truncation)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


class DataDirLock:
    """The exclusive, non-blocking lock that makes this process the data dir's one owner."""

    def __init__(self, data_dir: Path, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd  # the directory's descriptor, which holds the flock

    @classmethod
    def acquire(cls, data_dir: Path, command: str = "start") -> DataDirLock:
        """Take the lock or raise :class:`DataDirBusy` at once (never waits)."""
        data_dir = private_dir(data_dir).resolve()
        path = data_dir / LOCK_FILE
        # Not inherited by child processes (Python's default): a dev-stack child that
        # outlives a killed daemon must not keep holding the data dir.
        fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid, holder = _holder(path)
            raise DataDirBusy(data_dir, pid, holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            _write_holder(path, f"{os.getpid()}\n{command}\n")
        except BaseException:
            os.close(fd)
            raise
        return cls(data_dir, fd)

    def release(self) -> None:
        """Give the data dir up (also done by the kernel when the process ends)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            _write_holder(self.data_dir / LOCK_FILE, "")
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _write_holder(path: Path, text: str) -> None:
    """Say who holds the lock (0600 from creation; written in place, read only as a hint)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)
    finally:
        os.close(fd)


def _holder(path: Path) -> tuple[int | None, str]:
    """The pid and command written by the lock's holder (None, "" while it writes, or gone)."""
    try:
        with open(path, "rb") as file:
            lines = file.read(256).decode(errors="replace").splitlines()
    except OSError:
        return None, ""
    pid = int(lines[0]) if lines and lines[0].isdigit() else None
    return pid, lines[1] if len(lines) > 1 else ""
