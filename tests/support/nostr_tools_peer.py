"""A second independent Nostr peer: nostr-tools (JavaScript) in a Node.js child process.

``tests/support/nostr_tools/peer.mjs`` does the Nostr side (keys, NIP-17 gift wraps, NIP-04,
relay I/O) with nostr-tools; this drives it over stdin/stdout and joins ``part`` replies.
:func:`ensure_installed` runs ``npm ci`` from the lock file once per lock file version.
Without Node.js the tests that use it skip, unless ``NODEPROV_REQUIRE_NODE=1`` (CI sets it),
where a missing Node.js is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from nodeprov.protocol.dm_jobs import join_parts, parse_part
from tests.support.nostr_client import Reply

PEER_DIR = Path(__file__).parent / "nostr_tools"
SCRIPT = PEER_DIR / "peer.mjs"
LOCK = PEER_DIR / "package-lock.json"
STAMP = PEER_DIR / "node_modules" / ".nodeprov-lock-sha256"
LINE_LIMIT = 64 * 1024 * 1024  # one stdout line carries a whole DM


class Unavailable(Exception):
    """Node.js or npm is missing here (the message says which)."""


def ensure_installed() -> str:
    """The ``node`` binary, with nostr-tools installed by ``npm ci`` from the lock file."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        raise Unavailable("Node.js is not installed (Debian: apt-get install nodejs npm)")
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if not STAMP.is_file() or STAMP.read_text().strip() != digest:
        npm = shutil.which("npm")
        if npm is None:
            raise Unavailable("npm is not installed (Debian: apt-get install npm)")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PEER_DIR, check=True, timeout=600,
        )  # fmt: skip
        STAMP.write_text(digest + "\n")
    return node


def node_required() -> bool:
    """CI sets ``NODEPROV_REQUIRE_NODE=1``: there the peer must run, never skip."""
    return os.environ.get("NODEPROV_REQUIRE_NODE", "") not in ("", "0")


class ToolsPeer:
    """One nostr-tools client with its own key, talking to ``node_pubkey`` on ``relay_url``."""

    def __init__(self, proc: asyncio.subprocess.Process, pubkey: str) -> None:
        self.proc = proc
        self.pubkey = pubkey
        self.dms: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.acks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, node: str, relay_url: str, node_pubkey: str) -> ToolsPeer:
        proc = await asyncio.create_subprocess_exec(
            node, str(SCRIPT), relay_url, node_pubkey, cwd=PEER_DIR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT,
        )  # fmt: skip
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        hello = json.loads(first) if first else {}
        if not hello.get("ready"):
            proc.kill()
            await proc.wait()
            raise AssertionError(f"nostr-tools peer did not start: {first!r}")
        return cls(proc, hello["pubkey"])

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            msg = json.loads(line)
            if "dm" in msg:
                await self.dms.put((msg["nip"], msg["dm"]))
            elif "sent" in msg:
                await self.acks.put(msg)
            else:
                self.errors.append(str(msg.get("error", msg)))

    async def send(self, text: str, nip: str = "nip17") -> str:
        """Publish one DM; returns its event id once the relay accepted it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"send": text, "nip": nip}).encode() + b"\n")
        await self.proc.stdin.drain()
        ack = await asyncio.wait_for(self.acks.get(), 90)
        assert ack["ok"], f"relay refused the DM: {ack}; peer errors: {self.errors}"
        return str(ack["sent"])

    async def replies(self, n: int = 1, within: float = 60.0) -> list[Reply]:
        """Wait for ``n`` complete replies (``part`` messages are joined into one)."""
        done: list[Reply] = []
        parts: dict[str, list[str]] = {}
        deadline = time.monotonic() + within
        while len(done) < n:
            left = deadline - time.monotonic()
            try:
                nip, text = await asyncio.wait_for(self.dms.get(), max(left, 0.01))
            except TimeoutError:
                raise AssertionError(
                    f"got {len(done)} of {n} replies: {done}; peer errors: {self.errors}"
                ) from None
            part = parse_part(text)
            if part is None:
                done.append(Reply(nip, text, [text]))
                continue
            got = parts.setdefault(part.id, [])
            got.append(text)
            if len(got) == part.of:
                done.append(Reply(nip, join_parts(got), got))
        return done

    async def ask(self, text: str, nip: str = "nip17", within: float = 60.0) -> Reply:
        await self.send(text, nip)
        return (await self.replies(1, within))[0]

    async def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
