"""A second independent Nostr peer: nostr-tools (JavaScript) in a Node.js child process.

``tests/support/nostr_tools/peer.mjs`` does the Nostr side (keys, NIP-17 gift wraps, NIP-04,
relay I/O) with nostr-tools; this drives it over stdin/stdout and joins ``part`` replies.
:func:`ensure_installed` runs ``npm ci`` from the lock file once per lock file version.
Without Node.js the tests that use it skip, unless ``NODEPROV_REQUIRE_NODE=1`` (CI sets it),
where a missing Node.js is an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from nodeprov.protocol.dm_jobs import join_parts, parse_part
from tests.support.nostr_client import Reply

PEER_DIR = Path(__file__).parent / "nostr_tools"
SCRIPT = PEER_DIR / "peer.mjs"
LOCK = PEER_DIR / "package-lock.json"
STAMP = PEER_DIR / "node_modules" / ".nodeprov-lock-sha256"


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


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=PEER_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


class ToolsPeer:
    """One nostr-tools client with its own key, talking to ``node_pubkey`` on ``relay_url``.

    A plain ``Popen`` with a reader thread, not an asyncio subprocess: an in-process uvicorn
    (the fake upstream) may have installed uvloop's policy, which has no child watcher for
    the asyncio loop the tests run on.
    """

    def __init__(self, proc: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.loop = loop
        self.pubkey = ""
        self.ready: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.dms: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.acks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.errors: list[str] = []
        self._reader = threading.Thread(target=self._read, name="nostr-tools-peer", daemon=True)
        self._reader.start()

    @classmethod
    async def start(cls, node: str, relay_url: str, node_pubkey: str) -> ToolsPeer:
        proc = await asyncio.to_thread(_spawn, [node, str(SCRIPT), relay_url, node_pubkey])
        peer = cls(proc, asyncio.get_running_loop())
        try:
            hello = await asyncio.wait_for(peer.ready.get(), 30)
        except TimeoutError:
            hello = {}
        if not hello.get("ready"):
            await peer.close()
            raise AssertionError(f"nostr-tools peer did not start: {peer.errors}")
        peer.pubkey = str(hello["pubkey"])
        return peer

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.loop.call_soon_threadsafe(self._dispatch, msg)
        self.loop.call_soon_threadsafe(self._dispatch, {"error": "the peer exited", "ready": False})

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "dm" in msg:
            self.dms.put_nowait((msg["nip"], msg["dm"]))
        elif "sent" in msg:
            self.acks.put_nowait(msg)
        elif "ready" in msg:
            if not msg["ready"]:
                self.errors.append(str(msg.get("error")))
            self.ready.put_nowait(msg)
        else:
            self.errors.append(str(msg.get("error", msg)))

    def _write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    async def send(self, text: str, nip: str = "nip17") -> str:
        """Publish one DM; returns its event id once the relay accepted it."""
        line = json.dumps({"send": text, "nip": nip}).encode() + b"\n"
        await asyncio.to_thread(self._write, line)
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
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()  # the peer exits when its stdin closes
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
        await asyncio.to_thread(self._reader.join, 10)
