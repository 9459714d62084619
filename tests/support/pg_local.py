"""A throwaway PostgreSQL server for tests: ``initdb`` into a temp dir, ``pg_ctl`` on a free port.

Debian's PostgreSQL 15 binaries refuse to run as root, so when the tests run as root the
cluster belongs to the unprivileged ``postgres`` user (``nobody`` if there is none).
Skips the calling test when the binaries are missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.services import free_port

BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), Path("/usr/lib/postgresql/16/bin"))


def _bin(name: str) -> Path | None:
    for d in BIN_DIRS:
        if (d / name).is_file():
            return d / name
    found = shutil.which(name)
    return Path(found) if found else None


@dataclass
class LocalPostgres:
    """A running cluster: ``url`` reaches its ``postgres`` database over TCP (trust auth)."""

    data: Path
    port: int
    user: str | None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        pg_ctl = _bin("pg_ctl")
        assert pg_ctl is not None
        return subprocess.run(
            [str(pg_ctl), "-D", str(self.data / "db"), *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _runas() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with_user = [p for p in pwd.getpwall() if p.pw_name == name]
        if with_user:
            return name
    pytest.skip("running as root and no unprivileged user to run PostgreSQL as")


@contextmanager
def local_postgres() -> Iterator[LocalPostgres]:
    """Start a fresh cluster on a free 127.0.0.1 port; always stopped and removed after."""
    initdb = _bin("initdb")
    if initdb is None or _bin("pg_ctl") is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    user = _runas()
    root = Path(tempfile.mkdtemp(prefix="nodeprov-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    pg = LocalPostgres(root, free_port(), user)
    try:
        done = subprocess.run(
            [str(initdb), "-D", str(root / "db"), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            user=user,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={pg.port} -c unix_socket_directories={root}"
            " -c fsync=off -c max_connections=200"
        )
        started = pg.ctl("-l", str(root / "log"), "-o", options, "-w", "-t", "60", "start")
        assert started.returncode == 0, started.stderr + _log(root)
        yield pg
    finally:
        pg.ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _log(root: Path) -> str:
    try:
        return (root / "log").read_text()[-4000:]
    except OSError:
        return ""
