"""What the soak runs against: the real mint and relay, the test upstream, and ``nodeprov start``.

The daemon is a subprocess on a config written here; it can be killed (SIGKILL), restarted,
stopped, and asked things with the ``nodeprov`` CLI (``status``, ``wallet audit``, ``wallet
withdraw``), as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_upstream import FakeUpstream
from tests.support.services import MintHandle, RelayHandle, free_port, start_mint, start_relay

ROOT = Path(__file__).resolve().parents[2]
NODEPROV = str(Path(sys.executable).parent / "nodeprov")

# msat prices: 1000 per request, 2 per input token, 5 per output token (exact, no fee).
REQUEST_MSAT, INPUT_MSAT, OUTPUT_MSAT = 1000, 2, 5
# The upstream misbehaves per model (switches in the name, see tests/support/fake_upstream).
MODELS = (
    "soak-chat",
    "soak-chat+slow-0.5",
    "soak-chat+drip-0.05",
    "soak-chat+fail-500",
    "soak-chat+fail-429",
    "soak-chat+drop-4",
    "soak-chat+nousage",
    "soak-chat+earlyusage",
)
LEASE_SECONDS = 6
START_TIMEOUT = 60.0


def job_cost(usage: dict[str, Any]) -> int:
    """msat a job costs at the advertised prices, from the usage the upstream reported."""
    return (
        REQUEST_MSAT
        + INPUT_MSAT * int(usage.get("prompt_tokens", 0))
        + OUTPUT_MSAT * int(usage.get("completion_tokens", 0))
    )


class NodeDidNotStart(Exception):
    """``nodeprov start`` did not answer within the start timeout."""


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Stack:
    """The mint, the relay, the upstream and the node; ``async with Stack(dir) as stack``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mint: MintHandle | None = None
        self.relay: RelayHandle | None = None
        self.upstream = FakeUpstream(models=MODELS, api_key="sk-soak")
        self.port = 0
        self.name = f"soak-node-{secrets.token_hex(4)}"
        self.config = workdir / "nodeprov.toml"
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ledger_path(self) -> Path:
        return self.workdir / "data" / "ledger.sqlite3"

    @property
    def mint_url(self) -> str:
        assert self.mint is not None
        return self.mint.url

    @property
    def relay_url(self) -> str:
        assert self.relay is not None
        return self.relay.url

    async def __aenter__(self) -> Stack:
        self.mint = await asyncio.to_thread(start_mint, workdir=self.workdir / "mint")
        self.relay = await asyncio.to_thread(start_relay, workdir=self.workdir / "relay")
        self.upstream.start()
        self.port = free_port()
        self._write_config()
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.kill()
        self.upstream.stop()
        if self.relay is not None:
            self.relay.close()
        if self.mint is not None:
            self.mint.close()

    def _write_config(self) -> None:
        prices = "\n".join(
            f'[models."{m}"]\nrequest_msat = {REQUEST_MSAT}\n'
            f"input_per_1m_msat = {INPUT_MSAT * 1_000_000}\n"
            f"output_per_1m_msat = {OUTPUT_MSAT * 1_000_000}\n"
            "context_tokens = 4096\nmax_output_tokens = 64\n"
            for m in MODELS
        )
        models = ", ".join(f'"{m}"' for m in MODELS)
        self.config.write_text(
            f"""
[node]
name = "{self.name}"
data_dir = "{self.workdir / "data"}"
http_url = "{self.url}"

[http]
host = "127.0.0.1"
port = {self.port}

[nostr]
relays = ["{self.relay_url}"]
default_model = "soak-chat"
rate_limit_per_minute = 0
max_concurrent_jobs_per_sender = 4

[wallet]
mints = ["{self.mint_url}"]
units = ["sat", "msat"]
mint_timeout_seconds = 5

[ledger]
hold_timeout_seconds = {LEASE_SECONDS}

[admin]
password_hash = ""

[[upstreams]]
name = "soak"
base_url = "{self.upstream.url}"
api_key = "sk-soak"
models = [{models}]
timeout_seconds = 20

{prices}
"""
        )

    # --- the daemon ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> float:
        """Start ``nodeprov start``; return the seconds until it answered."""
        started = time.monotonic()
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, at once
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - kept as a Popen to kill -9 it
                [NODEPROV, "-c", str(self.config), "start"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.starts += 1
        async with httpx.AsyncClient(timeout=1.0) as http:
            while time.monotonic() - started < START_TIMEOUT:
                if self.proc.poll() is not None:
                    raise NodeDidNotStart(f"exited with {self.proc.returncode}: {self.log_tail()}")
                try:
                    response = await http.get(self.url + "/v1/info")
                    if response.status_code == 200 and response.json().get("name") == self.name:
                        return time.monotonic() - started
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.1)
        self.kill()
        raise NodeDidNotStart(f"no answer after {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no cleanup (a power cut, an OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    async def stop(self) -> int:
        """SIGTERM and wait (a graceful stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, 60)

    async def second_start(self) -> CliResult:
        """``nodeprov start`` again on the live data dir (it must refuse and exit)."""
        proc = await asyncio.create_subprocess_exec(
            NODEPROV, "-c", str(self.config), "start", cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
            return CliResult(-9, out.decode(), err.decode() + "\n(still running after 30 s)")
        return CliResult(proc.returncode or 0, out.decode(), err.decode())

    async def cli(self, *args: str) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            NODEPROV, "-c", str(self.config), *args, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        return CliResult(proc.returncode or 0, out.decode(), err.decode())

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def node_pubkey(self) -> str:
        from nodeprov.protocol.nostr_event import Keys

        secret = (self.workdir / "data" / "nostr.key").read_text().strip()
        return str(Keys.parse(secret).public_key)
