"""Start and stop the real components the tests run against: a nutshell mint and a Nostr relay.

Everything here is synchronous so that session fixtures (and ``.ci/run``-style scripts) can use
it without an event loop. Each server:

- binds 127.0.0.1 on a free port,
- runs in its own temporary directory (cwd, HOME, database, log file), so it never reads a stray
  ``.env`` or ``~/.cashu`` of the developer,
- runs in its own process group and is always stopped: SIGTERM to the group, SIGKILL after a
  grace period (and an ``atexit`` hook as a last resort).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from nodeprov.devstack.processes import Child

__all__ = [
    "MintHandle",
    "RelayHandle",
    "ServiceStartError",
    "free_port",
    "start_mint",
    "start_relay",
]

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
MINT_BIN = VENV_BIN / "mint"
RELAY_BIN = VENV_BIN / "nostr-relay"

# Derivation paths: the first one gives the sat keyset, the second the msat keyset.
MINT_DERIVATION_PATHS = ["m/0'/0'/0'", "m/0'/1'/0'"]


class ServiceStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(
    proc: Child,
    url: str,
    *,
    name: str,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    what: str,
) -> float:
    """Poll ``url`` until it answers 200 with JSON ``{"name": name}``; return the seconds it took.

    The name is unique per start: the port was only free when it was picked, so another server
    (another test session's) may hold it now, and its answer must not pass for ours. Ours then
    exits with "address already in use" and the caller retries on another port.
    """
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while True:
            if not proc.running():
                raise ServiceStartError(
                    f"{what} exited with code {proc.popen.returncode} before it was ready; "
                    f"log tail ({proc.log_path}):\n{_tail(proc.log_path)}"
                )
            try:
                response = client.get(url, headers=dict(headers or {}))
                if response.status_code == 200 and response.json().get("name") == name:
                    return time.monotonic() - started
            except (httpx.HTTPError, ValueError, AttributeError):
                pass
            if time.monotonic() > deadline:
                raise ServiceStartError(
                    f"{what} not ready at {url} after {timeout:.0f}s; "
                    f"log tail ({proc.log_path}):\n{_tail(proc.log_path)}"
                )
            time.sleep(0.05)


def _address_in_use(log_path: Path) -> bool:
    return "address already in use" in _tail(log_path, 80).lower()


def _clean_env(drop_prefixes: tuple[str, ...], drop_keys: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for key, value in os.environ.items():
        upper = key.upper()
        if upper.startswith(drop_prefixes) or upper in drop_keys:
            continue
        env[key] = value
    return env


# --------------------------------------------------------------------------------------- mint


class MintHandle:
    """A running nutshell mint (FakeWallet backend, sat + msat keysets)."""

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        input_fee_ppk: int,
        rate_limit: bool,
        owns_workdir: bool,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.input_fee_ppk = input_fee_ppk
        self.rate_limit = rate_limit
        self.extra_env = dict(extra_env or {})
        self.log_path = workdir / "mint.log"
        self.startup_seconds: float = 0.0
        self._owns_workdir = owns_workdir
        self._proc: Child | None = None
        self.name = f"nodeprov test mint {secrets.token_hex(8)}"
        # One key for the handle's life: a restarted mint must keep its keysets.
        self._private_key = secrets.token_hex(32)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def __repr__(self) -> str:
        return f"MintHandle(url={self.url!r}, input_fee_ppk={self.input_fee_ppk})"

    def _env(self) -> dict[str, str]:
        env = _clean_env(
            ("MINT_", "FAKEWALLET_", "LIGHTNING_", "WALLET_", "SOCKS_", "HTTP_PROXY", "HTTPS_"),
            ("DEBUG", "CASHU_DIR", "TOR", "ALL_PROXY"),
        )
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        env.update(
            {
                "HOME": str(home),
                "CASHU_DIR": str(home / ".cashu"),
                "PYTHONUNBUFFERED": "1",
                "DEBUG": "false",
                "MINT_BACKEND_BOLT11_SAT": "FakeWallet",
                "MINT_BACKEND_BOLT11_MSAT": "FakeWallet",
                "MINT_DERIVATION_PATH_LIST": json.dumps(MINT_DERIVATION_PATHS),
                "MINT_PRIVATE_KEY": self._private_key,
                "MINT_DATABASE": str(self.workdir / "db"),
                "MINT_INPUT_FEE_PPK": str(self.input_fee_ppk),
                "MINT_INFO_NAME": self.name,
                # nutshell rate-limits by IP (60 req/min, 20 tx/min): every test client is
                # 127.0.0.1, so leave it off unless a test wants it.
                "MINT_RATE_LIMIT": "true" if self.rate_limit else "false",
                "FAKEWALLET_DELAY_INCOMING_PAYMENT": "0",
                "FAKEWALLET_DELAY_OUTGOING_PAYMENT": "0",
                "FAKEWALLET_BRR": "true",
                # melts are paid from this fake balance; make it large enough for any test.
                "FAKEWALLET_BALANCE_SAT": str(10**12),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        if not MINT_BIN.exists():
            raise ServiceStartError(f"nutshell `mint` script not found at {MINT_BIN}")
        argv = [str(MINT_BIN), "--host", LOOPBACK, "--port", str(self.port)]
        self._proc = Child("mint", argv, cwd=self.workdir, env=self._env(), log_path=self.log_path)
        try:
            self.startup_seconds = _wait_ready(
                self._proc, f"{self.url}/v1/info", name=self.name, timeout=timeout, what="mint"
            )
            self._check_keysets()
        except BaseException:
            self._proc.stop_blocking()
            self._proc = None
            raise

    def _check_keysets(self) -> None:
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            keysets = client.get(f"{self.url}/v1/keysets").json()["keysets"]
        active = {k["unit"]: k for k in keysets if k.get("active")}
        missing = {"sat", "msat"} - set(active)
        if missing:
            raise ServiceStartError(
                f"mint at {self.url} has no active keyset for {sorted(missing)}: {keysets}"
            )
        wrong_fee = [k for k in active.values() if k.get("input_fee_ppk", 0) != self.input_fee_ppk]
        if wrong_fee:
            raise ServiceStartError(f"mint keysets have unexpected input_fee_ppk: {wrong_fee}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop_blocking()
            self._proc = None

    def close(self) -> None:
        """Stop and remove the temporary directory (if it was created by ``start_mint``)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> MintHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_mint(
    *,
    input_fee_ppk: int = 0,
    workdir: Path | None = None,
    port: int | None = None,
    rate_limit: bool = False,
    timeout: float = 30.0,
    extra_env: Mapping[str, str] | None = None,
) -> MintHandle:
    """Start a nutshell mint with FakeWallet for sat and msat; return when ``/v1/info`` answers.

    ``workdir`` defaults to a fresh temporary directory that ``close()`` removes again.
    ``extra_env`` overrides the mint's environment (e.g. ``{"FAKEWALLET_BRR": "false"}``).
    """
    owns = workdir is None
    base = Path(tempfile.mkdtemp(prefix="nodeprov-mint-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        handle = MintHandle(
            workdir=base,
            port=port if port is not None else free_port(),
            input_fee_ppk=input_fee_ppk,
            rate_limit=rate_limit,
            owns_workdir=owns,
            extra_env=extra_env,
        )
        try:
            handle.start(timeout=timeout)
            return handle
        except ServiceStartError:
            if attempt + 1 < attempts and _address_in_use(handle.log_path):
                continue  # lost the race for the port; try another one
            if owns:
                shutil.rmtree(base, ignore_errors=True)
            raise
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------- relay

_RELAY_CONFIG_TEMPLATE: dict[str, Any] = {
    "DEBUG": False,
    "relay_name": "nodeprov test relay",
    "relay_description": "nostr-relay started by the nodeprov test suite",
    "storage": {
        "num_concurrent_reqs": 10,
        "num_concurrent_adds": 2,
        "validators": [
            "nostr_relay.validators.is_not_too_large",
            "nostr_relay.validators.is_signed",
            "nostr_relay.validators.is_recent",
        ],
    },
    "verification": {"nip05_verification": "disabled"},
    "authentication": {"enabled": False},
    "message_timeout": 1800,
    "subscription_limit": 64,
    "max_limit": 6000,
    "logging": {
        "version": 1,
        "formatters": {"simple": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "simple",
                "stream": "ext://sys.stdout",
            }
        },
        "root": {"level": "WARNING", "handlers": ["console"]},
    },
}


class RelayHandle:
    """A running ``nostr-relay`` (uvicorn, sqlite). ``stop()``/``start()`` keep the same port."""

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        max_event_size: int,
        owns_workdir: bool,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.max_event_size = max_event_size
        self.config_path = workdir / "relay.yaml"
        self.log_path = workdir / "relay.log"
        self.db_path = workdir / "nostr.sqlite3"
        self.startup_seconds: float = 0.0
        self._owns_workdir = owns_workdir
        self._extra_config = dict(extra_config or {})
        self._proc: Child | None = None
        self.name = f"nodeprov test relay {secrets.token_hex(8)}"

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running()

    def __repr__(self) -> str:
        return f"RelayHandle(url={self.url!r}, running={self.running})"

    def _write_config(self) -> None:
        config: dict[str, Any] = json.loads(json.dumps(_RELAY_CONFIG_TEMPLATE))
        config["storage"]["sqlalchemy.url"] = f"sqlite+aiosqlite:///{self.db_path}"
        config["relay_name"] = self.name
        # `serve --use-uvicorn` takes host/port from the `gunicorn` section ("bind" -> port,
        # every other key goes to uvicorn.Config).
        config["gunicorn"] = {
            "bind": f"{LOOPBACK}:{self.port}",
            "host": LOOPBACK,
            "workers": 1,
            "loglevel": "warning",
        }
        # The default (4096, checked against len(content)) is too small for gift wraps.
        config["max_event_size"] = self.max_event_size
        config.update(self._extra_config)
        # JSON is valid YAML, so no yaml dependency is needed here.
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, on the same port and database) the relay."""
        if self.running:
            return
        if not RELAY_BIN.exists():
            raise ServiceStartError(f"`nostr-relay` script not found at {RELAY_BIN}")
        self._write_config()
        env = _clean_env((), ())
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env.update({"HOME": str(home), "PYTHONUNBUFFERED": "1"})
        argv = [str(RELAY_BIN), "-c", str(self.config_path), "serve", "--use-uvicorn"]
        self._proc = Child("relay", argv, cwd=self.workdir, env=env, log_path=self.log_path)
        try:
            self.startup_seconds = _wait_ready(
                self._proc,
                f"{self.http_url}/",
                name=self.name,
                headers={"Accept": "application/nostr+json"},
                timeout=timeout,
                what="nostr-relay",
            )
        except BaseException:
            self._proc.stop_blocking()
            self._proc = None
            raise

    def stop(self) -> None:
        """Stop the relay (SIGTERM to its group, SIGKILL after a grace period). Idempotent."""
        if self._proc is not None:
            self._proc.stop_blocking()
            self._proc = None

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout=timeout)

    def close(self) -> None:
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> RelayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_relay(
    *,
    workdir: Path | None = None,
    port: int | None = None,
    max_event_size: int = 262144,
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
) -> RelayHandle:
    """Start ``nostr-relay -c relay.yaml serve --use-uvicorn`` (sqlite); return once NIP-11 answers.

    ``extra_config`` is merged into the top level of the relay's config (e.g. ``rate_limits``).
    """
    owns = workdir is None
    base = Path(tempfile.mkdtemp(prefix="nodeprov-relay-")) if workdir is None else workdir
    base.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        handle = RelayHandle(
            workdir=base,
            port=port if port is not None else free_port(),
            max_event_size=max_event_size,
            owns_workdir=owns,
            extra_config=extra_config,
        )
        try:
            handle.start(timeout=timeout)
            return handle
        except ServiceStartError:
            if attempt + 1 < attempts and _address_in_use(handle.log_path):
                continue
            if owns:
                shutil.rmtree(base, ignore_errors=True)
            raise
    raise AssertionError("unreachable")
