"""The admin app: login/logout, the session and CSRF guard, rendering, security headers.

Mounted at ``/admin`` by the main app; every link is built from the mount's ``root_path``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodeprov.admin_password import verify_password
from nodeprov.config import Config
from nodeprov.core.ledger import Ledger
from nodeprov.core.metrics import Metrics
from nodeprov.core.payments import Payments
from nodeprov.core.wallet import Wallet
from nodeprov.http.admin.format import sat_text, when, when_short
from nodeprov.http.admin.security import (
    DEVICE_COOKIE,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    KnownDevices,
    Session,
    Sessions,
    Throttle,
    same,
)

logger = logging.getLogger(__name__)

MAX_FORM_BYTES = 16 * 1024
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
]
ASSET_TYPES = {"css": "text/css", "js": "text/javascript", "ico": "image/x-icon"}
Form = dict[str, str]
Handler = Callable[[Request, Session, Form], Awaitable[Response]]


class AdminCore(Protocol):
    """What the dashboard needs of the core (the daemon's ``Core`` has it)."""

    @property
    def ledger(self) -> Ledger: ...
    @property
    def wallet(self) -> Wallet: ...
    @property
    def payments(self) -> Payments: ...


class SecurityHeaders:
    """Adds no-store, anti-framing and a strict CSP to every admin response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class Forbidden(Exception):
    """A POST without a valid CSRF token (or an unreadable form): 403."""


def base(request: Request) -> str:
    """The mount point (``/admin``), from which every link is built."""
    return str(request.scope.get("root_path", "")).rstrip("/")


async def read_form(request: Request) -> Form:
    """An urlencoded form body (first value per field), at most MAX_FORM_BYTES."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise Forbidden("expected a form post")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Forbidden("form too large")
    form: Form = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(key, value)
    return form


class AdminBase:
    """Shared state and plumbing; the pages live in :class:`nodeprov.http.admin.pages.Pages`."""

    def __init__(
        self, core: AdminCore, config: Config, password_hash: str, metrics: Metrics | None = None
    ) -> None:
        self.core = core
        self.config = config
        self.metrics = metrics  # the channels' counters (None: the activity page says so)
        self.password_hash = password_hash
        # A ledger on PostgreSQL may be served by several processes: a login made at one
        # must hold at the others, so sessions are signed with a key they all derive.
        shared = (
            core.payments.derived_secret("admin-session\0" + password_hash)
            if config.ledger_on_postgres
            else None
        )
        self.sessions = Sessions(config.admin.session_seconds, key=shared)
        self.throttle = Throttle()
        self.devices = KnownDevices(password_hash)
        self._verifying = asyncio.Semaphore(2)  # the KDF is costly: bound concurrent checks
        self.verify: Callable[[str, str], bool] = verify_password
        self.sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("nodeprov.http.admin", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters.update(
            sat=sat_text, when=when, short=when_short, q=lambda s: quote(str(s), safe="")
        )
        assets = resources.files("nodeprov.http.admin") / "static"
        self.assets = {
            name: (assets / name).read_bytes() for name in ("admin.css", "admin.js", "favicon.ico")
        }

    # --- rendering ------------------------------------------------------------------

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        context.setdefault("nav", "")
        page = self.env.get_template(template).render(
            base=base(request),
            csrf=session.csrf if session else "",
            logged_in=session is not None,
            node=self.config.node.name,
            **context,
        )
        return HTMLResponse(page, status_code=status)

    def redirect(self, request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(base(request) + path, status_code=303)

    def _cookie(
        self, request: Request, response: Response, name: str, value: str, age: int
    ) -> None:
        response.set_cookie(
            name, value, max_age=age, path=base(request) or "/", httponly=True,
            samesite="strict", secure=request.url.scheme == "https",
        )  # fmt: skip

    # --- the guard ------------------------------------------------------------------

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Require a live session; on POST also the session's CSRF token."""

        async def endpoint(request: Request) -> Response:
            session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if request.method in ("GET", "HEAD"):
                    return self.redirect(request, "/login")
                return self.render(request, "denied.html", None, 403, reason="Please log in.")
            form: Form = {}
            if request.method == "POST":
                try:
                    form = await read_form(request)
                except Forbidden as exc:
                    return self.render(request, "denied.html", session, 403, reason=str(exc))
                if not same(form.get("csrf"), session.csrf):
                    reason = "The form's security token is missing or wrong; reload the page."
                    return self.render(request, "denied.html", session, 403, reason=reason)
            return await handler(request, session, form)

        return endpoint

    # --- login / logout ---------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.sessions.get(request.cookies.get(SESSION_COOKIE)):
            return self.redirect(request, "/")
        return self._login_page(request, None, 200)

    def _login_page(self, request: Request, error: str | None, status: int) -> Response:
        nonce = secrets.token_urlsafe(32)  # double-submit: the same value in cookie and form
        response = self.render(request, "login.html", None, status, nonce=nonce, error=error)
        self._cookie(request, response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def login(self, request: Request) -> Response:
        ip = request.client.host if request.client else "?"
        try:
            form = await read_form(request)
        except Forbidden as exc:
            return self.render(request, "denied.html", None, 403, reason=str(exc))
        if not same(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            reason = "The login form expired or was not sent by this site; reload it."
            return self.render(request, "denied.html", None, 403, reason=reason)
        password = form.get("password", "")
        device = self.devices.check(request.cookies.get(DEVICE_COOKIE))
        if device is not None:
            ok = await self._check(password, refuse_when_busy=False)
        else:
            ok = await self._check_from(ip, password)
        if ok is None:
            return self._busy(request)
        if not ok:
            logger.warning("admin login failed from %s", ip)
            if device is not None:
                self.devices.failed(device)
            else:
                self.throttle.failed(ip)
            return self._login_page(request, "Wrong password.", 401)
        if device is not None:
            self.devices.succeeded(device)
        else:  # a known browser's login leaves its address's record (others may share it)
            self.throttle.succeeded(ip)
        session = self.sessions.create()
        response = self.redirect(request, "/")
        self._cookie(request, response, SESSION_COOKIE, session.id, self.sessions.seconds)
        self._cookie(request, response, DEVICE_COOKIE, self.devices.issue(), self.devices.seconds)
        response.delete_cookie(LOGIN_COOKIE, path=base(request) or "/")
        logger.info("admin login from %s", ip)
        return response

    async def _check_from(self, ip: str, password: str) -> bool | None:
        """Check a password from an unknown browser: one check per address at a time,
        after the address's delay (waited outside the check slots); None: refused, busy."""
        if not self.throttle.begin(ip):
            return None
        try:
            if (delay := self.throttle.delay(ip)) > 0:
                await self.sleep(delay)
            return await self._check(password, refuse_when_busy=self.throttle.flooded())
        finally:
            self.throttle.end(ip)

    async def _check(self, password: str, *, refuse_when_busy: bool) -> bool | None:
        """Run the KDF in one of the check slots; None if all are busy and
        ``refuse_when_busy`` (under a flood nobody queues behind the guesses)."""
        if refuse_when_busy and self._verifying.locked():
            return None
        async with self._verifying:  # held for the KDF only
            return await asyncio.to_thread(self.verify, password, self.password_hash)

    def _busy(self, request: Request) -> Response:
        error = "Too many logins at once. Try again in a moment."
        response = self._login_page(request, error, 429)
        response.headers["Retry-After"] = "1"
        return response

    async def logout(self, request: Request, session: Session, form: Form) -> Response:
        self.sessions.drop(session.id)
        response = self.redirect(request, "/login")
        response.delete_cookie(SESSION_COOKIE, path=base(request) or "/")
        return response

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.assets:
            return Response("not found", status_code=404, media_type="text/plain")
        kind = ASSET_TYPES[name.rpartition(".")[2]]
        return Response(self.assets[name], media_type=kind)


def routes_of(pages: Any, table: Sequence[tuple[str, str, str]]) -> list[Route]:
    """Routes from ``(method, path, handler name)``; all but login and assets are guarded."""
    out = []
    for method, path, name in table:
        handler = getattr(pages, name)
        if name not in ("login_form", "login", "asset"):
            handler = pages.guarded(handler)
        out.append(Route(path, handler, methods=[method], name=name))
    return out
