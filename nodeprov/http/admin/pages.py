"""The dashboard's pages: overview, keys (and child keys), transactions, wallet, money moves.

Money leaves only through the core: ``payments.withdraw`` (a token) and ``Melter`` (bolt11).
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nodeprov.core import accounts_admin
from nodeprov.core import admin_queries as queries
from nodeprov.core.ledger import OPERATOR, Account, now
from nodeprov.core.melt import Melter, MeltQuote
from nodeprov.core.wallet import Sent
from nodeprov.errors import NodeprovError
from nodeprov.http.admin.app import Form, routes_of
from nodeprov.http.admin.dashboards import Dashboards
from nodeprov.http.admin.format import parse_sat
from nodeprov.http.admin.security import Session

PAGE_SIZE = 50
KIND_LABELS = {"api_key": "API key", "token": "token as key", "npub": "Nostr npub"}
BOLT11_PREFIXES = ("lnbc", "lntb", "lntbs", "lnbcrt", "lnsb")


def _pool(form: Form) -> tuple[str | None, str | None]:
    """The (mint, unit) chosen in a form's ``pool`` select (``auto``: let the wallet pick)."""
    mint, sep, unit = form.get("pool", "auto").rpartition("|")
    return (mint, unit) if sep and mint else (None, None)


def _bolt11(text: str) -> str:
    invoice = text.strip().lower().removeprefix("lightning:")
    if not invoice.startswith(BOLT11_PREFIXES) or not invoice.isalnum() or len(invoice) > 4000:
        raise ValueError("that is not a bolt11 invoice (it starts with lnbc…)")
    return invoice


class Pages(Dashboards):
    """Every page handler; ``routes()`` lists them."""

    def routes(self) -> list[Route]:
        return routes_of(
            self,
            [
                ("GET", "/login", "login_form"),
                ("POST", "/login", "login"),
                ("POST", "/logout", "logout"),
                ("GET", "/static/{name}", "asset"),
                ("GET", "/", "overview"),
                ("GET", "/activity", "activity"),
                ("GET", "/keys", "keys"),
                ("GET", "/keys/{account_id}", "key"),
                ("POST", "/keys/{account_id}/withdraw", "key_withdraw"),
                ("POST", "/keys/{account_id}/revoke", "key_revoke"),
                ("GET", "/children/{child_id}", "child"),
                ("POST", "/children/{child_id}/revoke", "child_revoke"),
                ("GET", "/transactions", "transactions"),
                ("GET", "/wallet", "wallet_page"),
                ("POST", "/wallet/withdraw", "wallet_withdraw"),
                ("POST", "/wallet/payout/quote", "payout_quote"),
                ("POST", "/wallet/payout/pay", "payout_pay"),
            ],
        )

    # --- keys -----------------------------------------------------------------------

    async def keys(self, request: Request, session: Session, form: Form) -> Response:
        kind = request.query_params.get("kind", "")
        query = request.query_params.get("q", "").strip()[:200]
        error = None
        if query:
            # A child key (its id, key or masked key) has a page of its own.
            child = await self.core.payments.children.find(query)
            if child is not None:
                return self.redirect(request, f"/children/{quote(child.id, safe='')}")
            # A key (full or masked as /v1/wallet/balance shows it), a token, an npub, an id.
            try:
                accounts = await accounts_admin.search_accounts(self.core.ledger, query)
            except NodeprovError as exc:
                accounts, error = [], exc.message
            accounts = [a for a in accounts if a.kind in queries.USER_KINDS]
            if len(accounts) == 1:
                return self.redirect(request, f"/keys/{quote(accounts[0].id, safe='')}")
            if not accounts and error is None:
                error = f"No account matches {query!r}."
        else:
            kinds = (kind,) if kind in queries.USER_KINDS else queries.USER_KINDS
            accounts = []
            for k in kinds:
                accounts += await self.core.ledger.accounts(k)
            accounts.sort(key=lambda a: (-(a.last_used_at or a.created_at), a.id))
        return self.render(
            request, "keys.html", session, nav="keys", accounts=accounts, kind=kind,
            kinds=KIND_LABELS, query=query, error=error,
        )  # fmt: skip

    async def _user_account(self, request: Request) -> Account | None:
        account = await self.core.ledger.account(request.path_params["account_id"])
        return account if account and account.kind in queries.USER_KINDS else None

    async def key(self, request: Request, session: Session, form: Form) -> Response:
        return await self._key_page(request, session)

    async def _key_page(
        self, request: Request, session: Session, error: str | None = None, status: int = 200
    ) -> Response:
        account = await self._user_account(request)
        if account is None:
            return self.render(request, "denied.html", session, 404, reason="No such key.")
        return self.render(
            request, "key.html", session, status, nav="keys", account=account,
            kinds=KIND_LABELS, pools=await self._pools(), error=error,
            history=await self.core.ledger.transactions(account.id, PAGE_SIZE),
            children=await self.core.payments.children.of_parent(account.id), now=now(),
        )  # fmt: skip

    async def key_withdraw(self, request: Request, session: Session, form: Form) -> Response:
        account = await self._user_account(request)
        if account is None:
            return self.render(request, "denied.html", session, 404, reason="No such key.")
        try:
            sent = await self._withdraw(account.id, form)
        except (ValueError, NodeprovError) as exc:
            return await self._key_page(request, session, _message(exc), _status(exc))
        back = f"/keys/{request.path_params['account_id']}"
        return self._token_page(request, session, sent, f"key {account.id}", back)

    async def key_revoke(self, request: Request, session: Session, form: Form) -> Response:
        account = await self._user_account(request)
        if account is None:
            return self.render(request, "denied.html", session, 404, reason="No such key.")
        await accounts_admin.revoke(self.core.ledger, account.id)
        return self.redirect(request, f"/keys/{request.path_params['account_id']}")

    # --- child keys -----------------------------------------------------------------

    async def child(self, request: Request, session: Session, form: Form) -> Response:
        child = await self.core.payments.children.get(request.path_params["child_id"])
        if child is None:
            return self.render(request, "denied.html", session, 404, reason="No such child key.")
        return self.render(
            request, "child.html", session, nav="keys", child=child, now=now(),
            parent=await self.core.ledger.account(child.parent_id),
        )  # fmt: skip

    async def child_revoke(self, request: Request, session: Session, form: Form) -> Response:
        children = self.core.payments.children
        child = await children.get(request.path_params["child_id"])
        if child is None:
            return self.render(request, "denied.html", session, 404, reason="No such child key.")
        await children.revoke(child.id, parent_id=None)
        return self.redirect(request, f"/children/{quote(child.id, safe='')}")

    # --- transactions ---------------------------------------------------------------

    async def transactions(self, request: Request, session: Session, form: Form) -> Response:
        params = request.query_params
        before = params.get("before", "")
        account = params.get("account", "").strip() or None
        rows, next_before = await queries.transactions_page(
            self.core.ledger,
            before=int(before) if before.isdigit() else None,
            limit=PAGE_SIZE,
            account_id=account,
        )
        return self.render(
            request, "transactions.html", session, nav="transactions",
            groups=queries.group_requests(rows), next_before=next_before,
            account=account or "", first=not before.isdigit(),
            total=await queries.count_transactions(self.core.ledger),
        )  # fmt: skip

    # --- wallet ---------------------------------------------------------------------

    async def _pools(self) -> list[tuple[str, str, int]]:
        """(mint, unit, amount in unit) of every pool of proofs the node holds."""
        held = await self.core.wallet.balances()
        return sorted((m, u, n) for (m, u), n in held.items())

    async def wallet_page(self, request: Request, session: Session, form: Form) -> Response:
        return await self._wallet(request, session)

    async def _wallet(
        self,
        request: Request,
        session: Session,
        error: str | None = None,
        status: int = 200,
        quote: dict[str, Any] | None = None,
        notice: str | None = None,
    ) -> Response:
        operator = await self.core.ledger.account(OPERATOR)
        return self.render(
            request, "wallet.html", session, status, nav="wallet", operator=operator,
            pools=await self._pools(), mints=self.core.wallet.mints, error=error,
            quote=quote, notice=notice,
        )  # fmt: skip

    async def _withdraw(self, account_id: str, form: Form) -> Sent:
        amount = parse_sat(form.get("amount", ""))
        mint, unit = _pool(form)
        return await self.core.payments.withdraw(account_id, amount, mint_url=mint, unit=unit)

    async def wallet_withdraw(self, request: Request, session: Session, form: Form) -> Response:
        try:
            sent = await self._withdraw(OPERATOR, form)
        except (ValueError, NodeprovError) as exc:
            return await self._wallet(request, session, _message(exc), _status(exc))
        return self._token_page(request, session, sent, "operator earnings", "/wallet")

    def _token_page(
        self, request: Request, session: Session, sent: Sent, source: str, back: str
    ) -> Response:
        return self.render(
            request, "token.html", session, nav="wallet" if back == "/wallet" else "keys",
            sent=sent, source=source, back=back,
        )  # fmt: skip

    async def payout_quote(self, request: Request, session: Session, form: Form) -> Response:
        mint, unit = _pool(form)
        try:
            invoice = _bolt11(form.get("bolt11", ""))
            quote = await Melter(self.core.wallet).quote(invoice, mint_url=mint, unit=unit or "sat")
        except (ValueError, NodeprovError) as exc:
            return await self._wallet(request, session, _message(exc), _status(exc))
        handle = secrets.token_urlsafe(12)
        session.data["quotes"] = {handle: quote}  # only the latest quote can be paid
        shown = {"handle": handle, "quote": quote, "invoice": invoice}
        return await self._wallet(request, session, quote=shown)

    async def payout_pay(self, request: Request, session: Session, form: Form) -> Response:
        quotes: dict[str, MeltQuote] = session.data.get("quotes", {})
        quote = quotes.pop(form.get("quote", ""), None)
        if quote is None:
            error = "That quote is no longer open; ask for a new one."
            return await self._wallet(request, session, error, 400)
        try:
            melted = await Melter(self.core.wallet).pay(OPERATOR, quote, ref="admin payout")
        except NodeprovError as exc:
            return await self._wallet(request, session, _message(exc), _status(exc))
        if melted.state == "paid":
            notice = f"Paid {melted.amount} {melted.unit}; it cost {melted.cost_msat} msat in all."
        else:
            notice = (
                f"The payment of {melted.amount} {melted.unit} is pending at the mint; it is "
                "settled automatically (the amount stays reserved until then)."
            )
        return await self._wallet(request, session, notice=notice)


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, NodeprovError) else str(exc)


def _status(exc: Exception) -> int:
    return exc.status if isinstance(exc, NodeprovError) else 400
