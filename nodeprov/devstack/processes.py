"""The embedded dev stack: a local nutshell mint, a nostr-relay and the demo upstream.

Addresses come from the config (the loopback mint, relay and the ``demo`` upstream), data lives
under ``<data_dir>/devstack``. Children run in their own process group with a parent-death
signal, and are stopped (SIGTERM, then SIGKILL) on exit; a service already listening at an
address is reused when it answers like the expected one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from nodeprov.config import Config
from nodeprov.devstack.demo_upstream import DemoServer, DemoUpstream, bind
from nodeprov.devstack.service_config import mint_env, relay_config
from nodeprov.errors import NodeprovError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEMO_UPSTREAM = "demo"
STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 60.0
Say = Callable[[str], None]
_LIVE: set[Child] = set()


class StackError(NodeprovError):
    """The dev stack could not start (or a part of it died); the message says which and why."""

    code = "dev_stack_error"


def _is_local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in LOOPBACK_HOSTS


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme in ("https", "wss") else 80)


@dataclass(frozen=True)
class StackPlan:
    """Which local services the config points at; ``None`` means none configured."""

    data_dir: Path
    mint_url: str | None
    relay_url: str | None
    upstream_url: str | None
    models: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> StackPlan:
        """The first loopback mint and relay, and the upstream named ``demo`` if on loopback."""
        mint = next((m for m in config.wallet.mints if _is_local(m)), None)
        relay = next((r for r in config.nostr.relays if _is_local(r)), None)
        demo = next((u for u in config.upstreams if u.name == DEMO_UPSTREAM), None)
        upstream = demo.base_url if demo is not None and _is_local(demo.base_url) else None
        models = demo.models if demo is not None else ()
        return cls(config.node.data_dir / "devstack", mint, relay, upstream, tuple(models))


def bin_path(name: str) -> Path:
    """A console script of this virtualenv (next to the interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return local
    found = shutil.which(name)
    if found is None:
        raise StackError(
            f"the `{name}` command is not installed; run `make` (pip install -e '.[dev]')"
        )
    return Path(found)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# Exec'd in front of a child so that Linux SIGTERMs it if the daemon dies without cleanup.
_PDEATHSIG_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except OSError:\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class Child:
    """One child process in its own process group, logging to a file."""

    def __init__(
        self, what: str, argv: list[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
    ) -> None:
        self.what = what
        self.log_path = log_path
        on_main = threading.current_thread() is threading.main_thread()
        if sys.platform.startswith("linux") and on_main:
            argv = [sys.executable, "-c", _PDEATHSIG_LAUNCHER, *argv]
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; reap the leader."""
        await asyncio.to_thread(self.stop_blocking, grace)

    def stop_blocking(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """:meth:`stop` for synchronous callers (it blocks up to ``grace`` + 5 s)."""
        try:
            if self.popen.poll() is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
            self._signal_group(signal.SIGKILL)  # stragglers, or a leader that ignored SIGTERM
            if self.popen.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
        finally:
            self._log.close()
            _LIVE.discard(self)

    def kill_now(self) -> None:
        """Last resort at interpreter exit: SIGKILL the group."""
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.popen.wait(2.0)
        self._log.close()
        _LIVE.discard(self)


@atexit.register
def _kill_leftovers() -> None:
    for child in list(_LIVE):
        child.kill_now()


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def _probe(url: str, headers: Mapping[str, str] | None = None) -> Any:
    """The JSON at ``url``, or None if it does not answer 200 with JSON."""
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            response = await client.get(url, headers=dict(headers or {}))
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _http_of(ws_url: str) -> str:
    return "http" + ws_url[len("ws") :] if ws_url.startswith("ws") else ws_url


NIP11 = {"Accept": "application/nostr+json"}


@dataclass
class DevStack:
    """Starts what ``plan`` names, remembers what it started, stops exactly that."""

    plan: StackPlan
    say: Say = print
    children: list[Child] = field(default_factory=list)
    demo: DemoServer | None = None
    reused: list[str] = field(default_factory=list)

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Start mint, relay and demo upstream; on any failure stop what already started."""
        stop = stop or asyncio.Event()
        self.plan.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.plan.mint_url:
                await self._start_mint(self.plan.mint_url, stop)
            if self.plan.relay_url:
                await self._start_relay(self.plan.relay_url, stop)
            if self.plan.upstream_url:
                await self._start_demo(self.plan.upstream_url)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop everything this stack started (never what it reused). Idempotent."""
        if self.demo is not None:
            await self.demo.stop()
            self.demo = None
            self.say("dev stack: demo upstream stopped")
        for child in reversed(self.children):
            await child.stop()
            self.say(f"dev stack: {child.what} stopped (pid {child.pid})")
        self.children.clear()

    def check(self) -> None:
        """Raise :class:`StackError` if a child exited (it was not asked to)."""
        for child in self.children:
            if not child.running():
                raise StackError(
                    f"the dev {child.what} exited with code {child.popen.returncode};"
                    f" log tail ({child.log_path}):\n{_tail(child.log_path)}"
                )

    async def watch(self, stop: asyncio.Event) -> None:
        """Until ``stop``: check the children every second; a dead one raises StackError."""
        while not stop.is_set():
            self.check()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)

    # --- the parts ---------------------------------------------------------------------

    async def _reuse(self, what: str, url: str, probe: str, headers: Mapping[str, str]) -> bool:
        """True if ``url``'s port is taken by a compatible service; StackError if incompatible."""
        if not listening(_port(url)):
            return False
        if isinstance(await _probe(probe, headers), dict):
            self.say(f"dev stack: a {what} is already running at {url}; reusing it")
            self.reused.append(what)
            return True
        raise StackError(
            f"port {_port(url)} ({url}) is in use by something that is not a {what};"
            " stop it, or point the config at another port (see docs: NODEPROV_* overrides)"
        )

    async def _spawn(
        self, what: str, argv: list[str], workdir: Path, env: Mapping[str, str]
    ) -> Child:
        log_path = workdir / f"{what.split()[-1]}.log"
        child = Child(what, argv, cwd=workdir, env=env, log_path=log_path)
        self.children.append(child)
        return child

    async def _wait_ready(
        self,
        child: Child,
        url: str,
        stop: asyncio.Event,
        headers: Mapping[str, str] | None = None,
    ) -> float:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            while True:
                if stop.is_set():
                    raise StackError(f"interrupted while the dev {child.what} was starting")
                if not child.running():
                    raise StackError(
                        f"the dev {child.what} exited with code {child.popen.returncode}"
                        f" before it was ready; log tail ({child.log_path}):\n"
                        f"{_tail(child.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(url, headers=dict(headers or {}))
                    if response.status_code == 200:
                        return time.monotonic() - started
                if time.monotonic() - started > START_TIMEOUT_SECONDS:
                    raise StackError(
                        f"the dev {child.what} did not answer at {url} within"
                        f" {START_TIMEOUT_SECONDS:.0f} s; log: {child.log_path}"
                    )
                await asyncio.sleep(0.1)

    async def _start_mint(self, url: str, stop: asyncio.Event) -> None:
        if await self._reuse("Cashu mint", url, f"{url.rstrip('/')}/v1/info", {}):
            return
        workdir = self.plan.data_dir / "mint"
        (workdir / "db").mkdir(parents=True, exist_ok=True)
        self.say(f"dev stack: starting the mint (nutshell, FakeWallet, sat + msat) at {url} ...")
        child = await self._spawn(
            "mint",
            [str(bin_path("mint")), "--host", "127.0.0.1", "--port", str(_port(url))],
            workdir,
            mint_env(workdir),
        )
        seconds = await self._wait_ready(child, f"{url.rstrip('/')}/v1/info", stop)
        self.say(
            f"dev stack: mint ready in {seconds:.1f} s (pid {child.pid}, log {child.log_path})"
        )

    async def _start_relay(self, url: str, stop: asyncio.Event) -> None:
        http = _http_of(url).rstrip("/") + "/"
        if await self._reuse("Nostr relay", url, http, NIP11):
            return
        workdir = self.plan.data_dir / "relay"
        (workdir / "home").mkdir(parents=True, exist_ok=True)
        config_path = workdir / "relay.yaml"
        config_path.write_text(json.dumps(relay_config(workdir, _port(url)), indent=2))
        self.say(f"dev stack: starting the relay (nostr-relay, sqlite) at {url} ...")
        env = {**os.environ, "HOME": str(workdir / "home"), "PYTHONUNBUFFERED": "1"}
        argv = [str(bin_path("nostr-relay")), "-c", str(config_path), "serve", "--use-uvicorn"]
        child = await self._spawn("relay", argv, workdir, env)
        seconds = await self._wait_ready(child, http, stop, NIP11)
        self.say(
            f"dev stack: relay ready in {seconds:.1f} s (pid {child.pid}, log {child.log_path})"
        )

    async def _start_demo(self, base_url: str) -> None:
        base = base_url.rstrip("/")
        if await self._reuse("OpenAI-compatible server", base_url, f"{base}/models", {}):
            return
        try:
            sock = bind("127.0.0.1", _port(base_url))
        except OSError as exc:
            raise StackError(f"cannot listen at {base_url} for the demo upstream: {exc}") from None
        self.demo = DemoServer(DemoUpstream(self.plan.models), sock)
        await self.demo.start()
        self.say(
            f"dev stack: demo upstream at {base_url} (canned answers, not a real LLM;"
            f" models {', '.join(self.demo.upstream.models)})"
        )
