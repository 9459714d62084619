"""The proxy examples, really running: a streamed answer passes chunk by chunk over TLS, and
the node behind them sees the client's address, not one the client made up.

nginx (a throwaway certificate) and Caddy (its own local CA) serve the examples' TLS sites on
free ports in front of a small event-stream server standing in for the node. That server holds
its second chunk back until the client has read the first: a proxy that buffered would never
let the client see it.
"""

from __future__ import annotations

import http.server
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from tests.support.contrib import CONTRIB, self_signed, tool
from tests.support.services import free_port

NGINX = CONTRIB / "proxy" / "nginx.conf"
CADDY = CONTRIB / "proxy" / "Caddyfile"
# Only the bound on a deadlock (a buffering proxy); nothing here is timed.
DEADLOCK_SECONDS = 60


class _Node(http.server.BaseHTTPRequestHandler):
    """An event stream whose second chunk waits for the client to have read the first."""

    protocol_version = "HTTP/1.1"
    first_read = threading.Event()
    seen: ClassVar[dict[str, Any]] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen.update(
            forwarded_for=self.headers.get("X-Forwarded-For"),
            proto=self.headers.get("X-Forwarded-Proto"),
        )
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._chunk(b'data: {"n": 1}\n\n')
        type(self).seen["first_read_in_time"] = type(self).first_read.wait(DEADLOCK_SECONDS)
        self._chunk(b'data: {"n": 2}\n\n')
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def node() -> Iterator[int]:
    _Node.first_read.clear()
    _Node.seen.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Node)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    _Node.first_read.set()
    server.shutdown()
    server.server_close()


def _nginx(tmp_path: Path, node: int, port: int) -> list[str]:
    """The nginx example's sites on free ports (TLS on ``port``), proxying to ``node``."""
    nginx = tool("nginx", "nginx-light")
    cert, key = self_signed(tmp_path)
    site = NGINX.read_text()
    site = re.sub(r"/etc/letsencrypt/\S+/fullchain\.pem", str(cert), site)
    site = re.sub(r"/etc/letsencrypt/\S+/privkey\.pem", str(key), site)
    site = site.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{node};")
    site = site.replace("listen 443 ssl", f"listen 127.0.0.1:{port} ssl")
    site = site.replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
    site = site.replace("listen 127.0.0.1:8081;", f"listen 127.0.0.1:{free_port()};")
    site = "\n".join(line for line in site.splitlines() if "[::]" not in line)
    (tmp_path / "site.conf").write_text(site)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    lines = [f"access_log {tmp_path}/access.log;", f"include {tmp_path}/site.conf;"]
    lines += [f"{kind}_temp_path {tmp_path}/{kind};" for kind in kinds]
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        f"error_log {tmp_path}/error.log;\nevents {{}}\n"
        + "http {\n"
        + "".join(f"  {line}\n" for line in lines)
        + "}\n"
    )
    return [nginx, "-p", str(tmp_path), "-e", f"{tmp_path}/error.log", "-c", str(main)]


def _caddy(tmp_path: Path, node: int, port: int) -> list[str]:
    """The Caddyfile with its site on 127.0.0.1:``port`` (Caddy's own local CA), to ``node``."""
    caddy = tool("caddy", "caddy")
    text = CADDY.read_text()
    assert text.count("llm.example.com {") == 1 and text.count("127.0.0.1:8000") == 1
    text = text.replace("llm.example.com {", f"https://127.0.0.1:{port} {{\n\ttls internal")
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{node}")
    options = f"admin off\nskip_install_trust\nstorage file_system {tmp_path}/caddy"
    config = tmp_path / "Caddyfile"
    config.write_text("{\n" + options + "\n}\n" + text)
    return [caddy, "run", "--config", str(config), "--adapter", "caddyfile"]


@pytest.fixture(params=["nginx", "caddy"])
def proxy(request: pytest.FixtureRequest, tmp_path: Path, node: int) -> Iterator[int]:
    """The example proxy running in front of ``node``; yields its TLS port."""
    port = free_port()
    argv = (_nginx if request.param == "nginx" else _caddy)(tmp_path, node, port)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    log = (tmp_path / "proxy.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=tmp_path)
    try:
        _wait_listening(port, process, tmp_path / "proxy.log")
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until a TLS handshake succeeds (Caddy listens before its certificate is issued)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(f"the proxy exited: {log.read_text()}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
                context.wrap_socket(sock),
            ):
                return
        except OSError:  # ssl.SSLError included
            time.sleep(0.05)
    raise AssertionError(f"the proxy did not start serving TLS: {log.read_text()}")


def test_a_stream_passes_chunk_by_chunk_through_the_proxy_example(proxy: int) -> None:
    url = f"https://127.0.0.1:{proxy}/v1/chat/completions"
    events: list[str] = []
    with (
        httpx.Client(verify=False, timeout=DEADLOCK_SECONDS * 2) as client,
        client.stream("POST", url, json={"stream": True}) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                _Node.first_read.set()  # the node sends the rest only now
    assert events == ['{"n": 1}', '{"n": 2}', "[DONE]"]
    assert _Node.seen["first_read_in_time"], "the first chunk was held back by the proxy"


def test_the_node_behind_the_proxy_example_sees_the_client_address_not_a_made_up_one(
    proxy: int,
) -> None:
    _Node.first_read.set()
    url = f"https://127.0.0.1:{proxy}/v1/chat/completions"
    headers = {"X-Forwarded-For": "203.0.113.9"}
    with httpx.Client(verify=False, timeout=DEADLOCK_SECONDS * 2) as client:
        answer = client.post(url, json={}, headers=headers)
    assert answer.status_code == 200
    assert _Node.seen["forwarded_for"] == "127.0.0.1"
    assert _Node.seen["proto"] == "https"
