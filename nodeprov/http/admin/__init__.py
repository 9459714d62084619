"""The operator's dashboard at ``/admin/``: login, overview, keys, transactions, wallet."""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.middleware import Middleware

from nodeprov.admin_password import load_or_create
from nodeprov.config import Config
from nodeprov.core.metrics import Metrics
from nodeprov.http.admin.app import AdminCore, SecurityHeaders
from nodeprov.http.admin.pages import Pages

__all__ = ["AdminCore", "build_admin_app"]


def build_admin_app(
    core: AdminCore,
    config: Config,
    *,
    password_hash: str | None = None,
    metrics: Metrics | None = None,
) -> Starlette:
    """The dashboard as an ASGI app to mount at ``/admin``; ``metrics``: the channels'
    counters its activity page shows.

    Without ``password_hash`` the hash comes from :func:`load_or_create`; a password
    generated on first start is printed once to stderr.
    """
    if password_hash is None:
        password_hash, generated = load_or_create(config)
        if generated is not None:
            print(
                f"\n  Admin dashboard password (shown once, stored hashed): {generated}\n"
                "  Change it with `nodeprov admin set-password`.\n",
                file=sys.stderr,
                flush=True,
            )
    pages = Pages(core, config, password_hash, metrics)
    app = Starlette(routes=pages.routes(), middleware=[Middleware(SecurityHeaders)])
    app.state.admin = pages  # its throttle and sessions, for tests and diagnostics
    return app
