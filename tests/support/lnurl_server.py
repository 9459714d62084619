"""A real LNURL-pay server on 127.0.0.1 for payout tests (its own thread and event loop).

``GET /.well-known/lnurlp/<user>`` answers a payRequest whose callback is
``/lnurlp/cb/<user>``; the callback asks a real mint (``POST /v1/mint/quote/bolt11``, a
FakeWallet backend) for an invoice of the requested msat, so another mint can pay it.

Knobs (plain attributes, thread-safe enough for tests): ``fail_next`` answers that many
requests with 500; ``wrong_amount`` returns invoices for 1 sat more than asked;
``redirect_next`` (a URL, ``{user}`` filled in) answers the next payRequest with a 302
there; ``callback_base`` replaces ``http://127.0.0.1:<port>`` in the callback URL.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class LnurlServer:
    """LNURL-pay for any user at ``http://127.0.0.1:<port>``, invoices from ``payee_mint``."""

    def __init__(self, payee_mint: str, *, min_sendable: int = 1000) -> None:
        self.payee_mint = payee_mint.rstrip("/")
        self.min_sendable = min_sendable
        self.max_sendable = 10**11
        self.fail_next = 0
        self.wrong_amount = False
        self.redirect_next: str | None = None
        self.callback_base: str | None = None
        self.requests: list[str] = []  # "<path>?<query>" of every request
        self.invoices: list[tuple[int, str]] = []  # (amount_msat, bolt11) handed out
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        app = Starlette(
            routes=[
                Route("/.well-known/lnurlp/{user}", self._pay_request),
                Route("/lnurlp/cb/{user}", self._callback),
            ]
        )
        # loop="none": Server.run would otherwise install uvloop's loop policy for the whole
        # test process (asyncio subprocesses and other loops would then be uvloop's).
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", loop="none"
        )
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def address(self, user: str = "operator") -> str:
        return f"{user}@127.0.0.1:{self.port}"

    def start(self) -> LnurlServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the LNURL test server did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def _failing(self, request: Request) -> bool:
        self.requests.append(f"{request.url.path}?{request.url.query}")
        if self.fail_next > 0:
            self.fail_next -= 1
            return True
        return False

    def _pay_request(self, request: Request) -> Response:
        if self._failing(request):
            return Response("upstream trouble", status_code=500)
        user = request.path_params["user"]
        if self.redirect_next is not None:
            target, self.redirect_next = self.redirect_next.format(user=user), None
            return Response(status_code=302, headers={"Location": target})
        callback_base = self.callback_base or f"http://127.0.0.1:{self.port}"
        return JSONResponse(
            {
                "tag": "payRequest",
                "callback": f"{callback_base}/lnurlp/cb/{user}",
                "minSendable": self.min_sendable,
                "maxSendable": self.max_sendable,
                "metadata": f'[["text/plain","pay {user}"]]',
            }
        )

    def _callback(self, request: Request) -> Response:
        if self._failing(request):
            return Response("upstream trouble", status_code=500)
        try:
            amount = int(request.query_params["amount"])
        except (KeyError, ValueError):
            return JSONResponse({"status": "ERROR", "reason": "amount missing"})
        if not self.min_sendable <= amount <= self.max_sendable:
            return JSONResponse({"status": "ERROR", "reason": "amount out of range"})
        if self.wrong_amount:
            amount += 1000
        # A sat invoice when the amount is whole sats, else an msat one (exact either way).
        unit, value = ("sat", amount // 1000) if amount % 1000 == 0 else ("msat", amount)
        quote = httpx.post(
            f"{self.payee_mint}/v1/mint/quote/bolt11",
            json={"amount": value, "unit": unit},
            timeout=10,
        )
        quote.raise_for_status()
        invoice = str(quote.json()["request"])
        self.invoices.append((amount, invoice))
        return JSONResponse({"pr": invoice, "routes": []})
