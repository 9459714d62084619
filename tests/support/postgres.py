"""A throwaway PostgreSQL server for the tests and the benchmark.

:meth:`PostgresServer.start` runs ``initdb`` into a fresh temporary directory (trust auth, UTF8,
superuser ``postgres``) and starts ``postgres`` on a free 127.0.0.1 port, with its unix socket
inside that directory. ``initdb`` and ``postgres`` refuse to run as root, so as root both run
as ``nobody`` (``setpriv``) and the directory is handed to that user. The server runs in its
own process group with a parent-death signal; :meth:`PostgresServer.stop` always ends it (fast
shutdown, then immediate, then SIGKILL to the group) and removes the directory.

Binaries come from PATH, else the newest ``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql``
package). Without them :func:`find_bin_dir` returns None and the tests that need PostgreSQL skip,
unless ``NODEPROV_REQUIRE_POSTGRES=1`` (CI sets it), where that is an error.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from tests.support.services import free_port

__all__ = [
    "MISSING_MESSAGE",
    "PostgresServer",
    "PostgresStartError",
    "PostgresUnavailable",
    "children_of",
    "find_bin_dir",
    "postgres_required",
]

LOOPBACK = "127.0.0.1"
SUPERUSER = "postgres"
MISSING_MESSAGE = (
    "PostgreSQL is not installed (Debian package `postgresql`: "
    "apt-get install postgresql, or run .ci/install-postgres)"
)
UNPRIVILEGED_USER = "nobody"
# A unix socket path is limited to 107 bytes; ".s.PGSQL.65535" takes 14 of them.
MAX_SOCKET_DIR = 90
STOP_STEP_SECONDS = 10.0

# A test server trades durability for speed: a crash loses the test's data, nothing else.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
BASE_SETTINGS: dict[str, str] = {
    "max_connections": "300",
    "shared_buffers": "32MB",
    "listen_addresses": LOOPBACK,
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
}
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_LIVE: set[PostgresServer] = set()


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries (initdb, postgres) are not installed here."""


class PostgresStartError(RuntimeError):
    """The server did not come up; the message carries the tail of its log."""


def postgres_required() -> bool:
    """CI sets ``NODEPROV_REQUIRE_POSTGRES=1``: there PostgreSQL must run, never skip."""
    return os.environ.get("NODEPROV_REQUIRE_POSTGRES", "") not in ("", "0")


def _version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits)


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``/``postgres``: PATH first, else the newest Debian one."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        # Debian links only some tools into PATH: use the real directory for all of them.
        real = Path(on_path).resolve().parent
        if (real / "postgres").is_file():
            return real
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    candidates = [p for p in candidates if (p / "postgres").is_file()]
    if not candidates:
        return None
    return max(candidates, key=_version_key)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _searchable_by_all(path: Path) -> bool:
    """Whether every directory from / down to ``path`` lets other users through (o+x)."""
    for part in [path, *path.parents]:
        try:
            if not part.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def children_of(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":  # state, ppid
            found.append(int(entry.name))
    return found


class _Runner:
    """How to run a PostgreSQL binary: as ourselves, or as ``nobody`` when we are root."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.demote = os.geteuid() == 0
        self.uid, self.gid = os.getuid(), os.getgid()
        self.prefix: list[str] = []
        setpriv = shutil.which("setpriv")
        if self.demote:
            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
            if setpriv is None:
                raise PostgresStartError("running as root needs `setpriv` (util-linux)")
            self.prefix = [
                setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            ]  # fmt: skip
        # Linux sends the parent-death signal when the *thread* that forked dies: only the main
        # thread lives as long as the session. SIGINT is PostgreSQL's fast shutdown.
        if setpriv is not None and threading.current_thread() is threading.main_thread():
            self.prefix = [*(self.prefix or [setpriv]), "--pdeathsig=INT"]
        if self.prefix:
            self.prefix.append("--")

    def argv(self, binary: str, *args: str) -> list[str]:
        return [*self.prefix, str(self.bin_dir / binary), *args]

    def env(self, home: Path) -> dict[str, str]:
        # No PG* variables of the caller (PGDATA, PGPORT, ...) and no locale surprises.
        keep = {k: v for k, v in os.environ.items() if not k.upper().startswith("PG")}
        keep.update({"HOME": str(home), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"})
        return keep


class PostgresServer:
    """A running throwaway PostgreSQL (superuser ``postgres``, trust auth, 127.0.0.1:port)."""

    def __init__(self, runner: _Runner, root: Path, settings: Mapping[str, str]) -> None:
        self._runner = runner
        self.root = root
        self.data_dir = root / "data"
        self.socket_dir = root / "sock"
        self.log_path = root / "postgres.log"
        self.settings = dict(settings)
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # ------------------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        base_dir: Path | None = None,
        *,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> PostgresServer:
        """``initdb`` a fresh cluster under ``base_dir`` (or the temp dir) and start it.

        ``durable=True`` keeps fsync, synchronous_commit and full_page_writes at PostgreSQL's
        defaults (for measurements); ``settings`` adds or overrides server settings. As root,
        a ``base_dir`` that ``nobody`` cannot reach (e.g. pytest's 0700 tree) is replaced by
        the system temp dir.
        """
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(MISSING_MESSAGE)
        runner = _Runner(bin_dir)
        parent = base_dir
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
            too_long = len(f"{parent.resolve()}/nodeprov-pg-XXXXXXXX/sock") > MAX_SOCKET_DIR
            if too_long or (runner.demote and not _searchable_by_all(parent.resolve())):
                parent = None
        root = Path(tempfile.mkdtemp(prefix="nodeprov-pg-", dir=parent))
        merged = {**BASE_SETTINGS, **({} if durable else FAST_SETTINGS), **(settings or {})}
        server = cls(runner, root, merged)
        try:
            server._init_cluster()
            server._launch(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _init_cluster(self) -> None:
        self.socket_dir.mkdir()
        if self._runner.demote:
            os.chown(self.root, self._runner.uid, self._runner.gid)
            os.chown(self.socket_dir, self._runner.uid, self._runner.gid)
        argv = self._runner.argv(
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "-A", "trust",
            "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        with open(self.log_path, "ab") as log:
            done = subprocess.run(
                argv, cwd=self.root, env=self._runner.env(self.root), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, timeout=120, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise PostgresStartError(
                f"initdb exited with {done.returncode}; log ({self.log_path}):\n"
                f"{_tail(self.log_path)}"
            )

    def _launch(self, timeout: float) -> None:
        for attempt in range(3):
            self.port = free_port()
            options = {
                **self.settings, "port": str(self.port),
                "unix_socket_directories": str(self.socket_dir),
            }  # fmt: skip
            args = ["-D", str(self.data_dir)]
            for key, value in options.items():
                args += ["-c", f"{key}={value}"]
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self._proc = subprocess.Popen(
                self._runner.argv("postgres", *args), cwd=self.root,
                env=self._runner.env(self.root), stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            _LIVE.add(self)
            if self._wait_ready(timeout):
                return
            in_use = "address already in use" in _tail(self.log_path, 20).lower()
            self._stop_process()
            if not in_use or attempt == 2:
                raise PostgresStartError(
                    f"postgres exited before it was ready; log ({self.log_path}):\n"
                    f"{_tail(self.log_path)}"
                )

    def _wait_ready(self, timeout: float) -> bool:
        """Poll until the server on our port is ours and answers; False if it exited."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                return False
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
                # Another server may have taken the port in between: check it is this one.
                if row is not None and Path(row[0]).resolve() == self.data_dir.resolve():
                    return True
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                self._stop_process()
                raise PostgresStartError(
                    f"postgres not ready on port {self.port} after {timeout:.0f}s; "
                    f"log ({self.log_path}):\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------------------ use

    @property
    def url(self) -> str:
        """The URL of the ``postgres`` maintenance database."""
        return self.url_for(SUPERUSER)

    def url_for(self, database: str) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/<database>``."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (also its process group id), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=SUPERUSER,
            autocommit=True,
        )  # fmt: skip

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database (from template0); returns its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        if not _NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        with self._admin() as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        return self.url_for(name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop a database (by name or URL), ending its sessions first; missing is fine."""
        name = urlsplit(name_or_url).path.lstrip("/") if "://" in name_or_url else name_or_url
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # ------------------------------------------------------------------------------ stop

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL.
            for sig in (signal.SIGINT, signal.SIGQUIT):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_STEP_SECONDS)
            if proc.poll() is None:
                # Each backend is a session of its own (setsid), so a group kill would miss
                # them: kill the postmaster's children one by one, then the postmaster.
                for child in children_of(proc.pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(child, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_STEP_SECONDS)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Stop the server (never leaves a process) and remove its directory. Idempotent."""
        try:
            self._stop_process()
        finally:
            _LIVE.discard(self)
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __repr__(self) -> str:
        return f"PostgresServer(url={self.url!r}, running={self.running})"

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.stop()
