"""A closed-loop HTTP/1.1 load generator on asyncio (uvloop if present), one process of it.

    python -m bench._load URL [--clients C] [--seconds D] [--warmup W] [--header 'K: V']...
                          [--body JSON] [--requests N] [--tokens FILE]
                          [--token-header NAME] [--keys FILE] [--hold]

Each client owns one kept-alive connection and sends the next request as soon as the answer
to the last one is read (closed loop). Answers are parsed by hand (Content-Length or chunked),
so the generator costs a fraction of what it measures; run it against the upstream directly
to see its own ceiling. Prints one JSON object: ``ok``, ``errors`` (by status or exception),
``seconds`` and per-request ``lat_us`` (and for streams ``ttft_us`` and ``tail_us``: the time
from the first to the last ``data:`` chunk).

Modes: by time (``--seconds`` after ``--warmup`` seconds), by count (``--requests`` after
``--warmup`` requests), a token per request (``--tokens``: one per line, sent as
``--token-header``; stops when they run out), one API key per client (``--keys``: client i
sends ``Authorization: Bearer`` key i modulo their number), and ``--hold``: every client opens
one stream and keeps it open; once each has its first chunk or its error, one JSON line says
how many are open, and the streams stay open until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench._common import die_with_parent, run

DEFAULT_BODY = (
    '{"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
)


@dataclass
class Answer:
    """One answer: status, when its first ``data:`` chunk came, and its last."""

    status: int
    first_data: float | None = None
    last_data: float | None = None
    close: bool = False


@dataclass
class Stats:
    """What the clients of this process measured."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    lat_us: list[int] = field(default_factory=list)
    ttft_us: list[int] = field(default_factory=list)
    tail_us: list[int] = field(default_factory=list)


class Connection:
    """One kept-alive HTTP/1.1 connection that sends a request and reads its whole answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, limit=1 << 20
            )
        self.writer.write(request)

    async def answer(self, keep_open: asyncio.Event | None = None) -> Answer:
        """Read the answer; with ``keep_open``, return after the first data chunk and drain."""
        reader = self.reader
        assert reader is not None
        head = await reader.readuntil(b"\r\n\r\n")
        answer = Answer(int(head[9:12]))
        length = -1
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                answer.close = b"close" in value.lower()
        if length >= 0:
            await reader.readexactly(length)
        elif chunked:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                data = await reader.readexactly(size + 2)
                if b"data:" in data:
                    now = time.perf_counter()
                    if answer.first_data is None:
                        answer.first_data = now
                        if keep_open is not None:
                            return answer
                    answer.last_data = now
        else:
            await reader.read()
            answer.close = True
        if answer.close:
            self.close()
        return answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def build(method: str, path: str, host: str, headers: list[str], body: bytes) -> bytes:
    """The bytes of one request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += ["Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Generator:
    """The clients of one process and their shared plan."""

    def __init__(self, args: argparse.Namespace) -> None:
        url = urlsplit(args.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.path = url.path
        self.netloc = url.netloc
        self.args = args
        self.body = args.body.encode()
        self.stats = Stats()
        self.tokens: list[str] = []
        if args.tokens:
            with open(args.tokens) as f:
                self.tokens = [line.strip() for line in f if line.strip()]
        self.plain = build("POST", self.path, self.netloc, args.header, self.body)
        self.per_client: list[bytes] = []
        if args.keys:
            with open(args.keys) as f:
                keys = [line.strip() for line in f if line.strip()]
            self.per_client = [
                build("POST", self.path, self.netloc,
                      [*args.header, f"Authorization: Bearer {key}"], self.body)
                for key in keys
            ]  # fmt: skip
        self.started = 0  # requests begun (count mode)

    def request(self, client: int = 0) -> bytes | None:
        """The next request to send, or None when the plan is done (count or token mode)."""
        if self.args.tokens:
            if not self.tokens:
                return None
            token = self.tokens.pop(0)
            headers = [*self.args.header, f"{self.args.token_header}: {token}"]
            return build("POST", self.path, self.netloc, headers, self.body)
        if self.args.requests:
            if self.started >= self.args.requests + self.args.warmup:
                return None
            self.started += 1
        if self.per_client:
            return self.per_client[client % len(self.per_client)]
        return self.plain

    def record(self, answer: Answer, began: float, measured: bool) -> None:
        if not 200 <= answer.status < 300:
            self.stats.errors[str(answer.status)] += 1
            return
        if not measured:
            return
        self.stats.ok += 1
        self.stats.lat_us.append(int((time.perf_counter() - began) * 1e6))
        if answer.first_data is not None:
            self.stats.ttft_us.append(int((answer.first_data - began) * 1e6))
            last = answer.last_data or answer.first_data
            self.stats.tail_us.append(int((last - answer.first_data) * 1e6))

    async def client(self, window: tuple[float, float], index: int = 0) -> None:
        """One closed-loop client; by time, measures answers completed inside ``window``."""
        conn = Connection(self.host, self.port)
        by_time = not (self.args.requests or self.args.tokens)
        done = 0
        try:
            while True:
                if by_time and time.perf_counter() >= window[1]:
                    return
                request = self.request(index)
                if request is None:
                    return
                began = time.perf_counter()
                try:
                    await conn.send(request)
                    answer = await conn.answer()
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    self.stats.errors[type(exc).__name__] += 1
                    conn.close()
                    await asyncio.sleep(0.01)
                    continue
                done += 1
                if by_time:
                    now = time.perf_counter()
                    measured = window[0] <= began and now <= window[1]
                else:
                    measured = done > self.args.warmup
                self.record(answer, began, measured)
        finally:
            conn.close()

    async def closed_loop(self) -> dict[str, object]:
        start = time.perf_counter() + self.args.warmup
        window = (start, start + self.args.seconds)
        t0 = time.perf_counter()
        await asyncio.gather(*(self.client(window, i) for i in range(self.args.clients)))
        by_time = not (self.args.requests or self.args.tokens)
        seconds = self.args.seconds if by_time else time.perf_counter() - t0
        return self.result(seconds)

    def result(self, seconds: float) -> dict[str, object]:
        s = self.stats
        return {"ok": s.ok, "errors": dict(s.errors), "seconds": seconds,
                "lat_us": s.lat_us, "ttft_us": s.ttft_us, "tail_us": s.tail_us}  # fmt: skip

    async def hold(self) -> dict[str, object]:
        """Open one stream per client, report how many are open, keep them until stdin closes."""
        release = asyncio.Event()
        conns = [Connection(self.host, self.port) for _ in range(self.args.clients)]

        async def one(conn: Connection) -> None:
            began = time.perf_counter()
            try:
                await conn.send(self.plain)
                answer = await conn.answer(keep_open=release)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.stats.errors[type(exc).__name__] += 1
                conn.close()
                return
            if answer.first_data is None or not 200 <= answer.status < 300:
                self.stats.errors[str(answer.status)] += 1
                conn.close()
                return
            self.stats.ok += 1
            self.stats.lat_us.append(int((time.perf_counter() - began) * 1e6))

        await asyncio.gather(*(one(c) for c in conns))
        print(json.dumps({"open": self.stats.ok, "errors": dict(self.stats.errors)}), flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        drains = [asyncio.create_task(drain(c)) for c in conns if c.reader is not None]
        await reader.read()  # until the harness closes our stdin
        for task in drains:
            task.cancel()
        for conn in conns:
            conn.close()
        return self.result(0.0)


async def drain(conn: Connection) -> None:
    """Read and drop what an open stream sends, so the node never blocks writing to us."""
    assert conn.reader is not None
    while await conn.reader.read(65536):
        pass


def raise_fd_limit() -> None:
    """Up to the hard limit: a thousand open streams need more than the usual 1,024 files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(args: argparse.Namespace) -> None:
    gen = Generator(args)
    result = await (gen.hold() if args.hold else gen.closed_loop())
    print(json.dumps(result), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", default=DEFAULT_BODY)
    parser.add_argument("--tokens", default="")
    parser.add_argument("--token-header", default="X-Cashu")
    parser.add_argument("--keys", default="")
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args(argv)
    if args.requests or args.tokens:
        args.warmup = int(args.warmup)
    return args


if __name__ == "__main__":
    die_with_parent()
    raise_fd_limit()
    run(main(parse()))
