"""``nodeprov demo``: a scripted tour of a running dev node, every step printed with amounts.

Tokens come from the local FakeWallet mint. A step whose channel is not running prints
``skipped: <why>``; a step that runs and fails prints ``FAILED: <why>`` and the tour goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from nodeprov.config import Config
from nodeprov.core.ledger import Ledger
from nodeprov.core.node import open_books
from nodeprov.core.wallet import Wallet
from nodeprov.daemon import books
from nodeprov.devstack.processes import Say, StackPlan
from nodeprov.devstack.runner import http_base, node_npub
from nodeprov.devstack.tokens import mint_token
from nodeprov.errors import NodeprovError
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol import dm_jobs, nip19, nip59
from nodeprov.protocol.announcements import LISTING_KIND, parse_listing
from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.nostr_event import Event, Keys

DM_WAIT_SECONDS = 30.0
PROMPT = "Say hello to the demo tour."


class Skip(Exception):
    """The step cannot run here (its channel is not up); the message says why."""


class Tour:
    """State shared by the steps: config, clients, the key made in step 1."""

    def __init__(self, config: Config, amount: int, say: Say) -> None:
        self.config = config
        self.amount = amount
        self.say = say
        self.plan = StackPlan.from_config(config)
        self.base = http_base(config)
        self.http = httpx.AsyncClient(timeout=30.0, trust_env=False)
        self.model = config.nostr.default_model or next(iter(config.models), "demo-chat")
        self.api_key: str | None = None
        self.http_up = False
        self.info: dict[str, Any] = {}
        self.ledger: Ledger | None = None
        self.wallet: Wallet | None = None
        self.failed = 0
        self.minted_sat = 0

    async def token(self, sat: int) -> str:
        """A fresh token of ``sat`` from the dev mint (counted in the tour's total)."""
        if self.wallet is None or self.plan.mint_url is None:
            raise Skip("no local dev mint in the config")
        token = await mint_token(self.wallet, self.plan.mint_url, sat, "sat", memo="nodeprov demo")
        self.minted_sat += sat
        return token

    def chat_body(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": PROMPT}], **extra}

    def need_http(self) -> None:
        if not self.http_up:
            raise Skip(f"nothing answers at {self.base}/v1/info (HTTP channel not running)")

    async def balance_msat(self) -> int:
        response = await self.http.get(
            f"{self.base}/v1/wallet/balance", headers={"Authorization": f"Bearer {self.api_key}"}
        )
        response.raise_for_status()
        return int(response.json()["balance"])


async def run_demo(config: Config, *, amount: int = 2000, say: Say = print) -> bool:
    """Run the tour against the node ``config`` describes; False if a step failed."""
    tour = Tour(config, amount, say)
    say(f"nodeprov demo: touring {config.node.name} at {tour.base} (model {tour.model})")
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = await tour.http.get(f"{tour.base}/v1/info")
        tour.http_up = response.status_code == 200
        tour.info = response.json() if tour.http_up else {}
    mint_up = False
    if tour.plan.mint_url:
        with contextlib.suppress(httpx.HTTPError):
            mint_up = (await tour.http.get(f"{tour.plan.mint_url}/v1/info")).status_code == 200
    if not (tour.http_up or mint_up) or not config.ledger_path.exists():
        await tour.http.aclose()
        say(
            f"error: the dev node is not running (nothing answers at {tour.base} or"
            f" {tour.plan.mint_url}); start it first: `nodeprov start --dev` or `make run`"
        )
        return False
    ledger, wallet, client = await open_books(config)
    tour.ledger, tour.wallet = ledger, wallet
    try:
        await wallet.start()
        steps: list[tuple[str, Callable[[Tour], Awaitable[None]]]] = [
            ("1. an API key from a token", step_key),
            ("2. a paid streamed chat", step_stream),
            ("3. pay per request with X-Cashu, get change", step_x_cashu),
            ("4. a paid NIP-17 DM job", step_dm),
            ("5. the announcements on the relay", step_announcements),
            ("6. final balances", step_balances),
            ("7. the audit", step_audit),
        ]
        for title, step in steps:
            say("")
            say(f"== {title}")
            try:
                await step(tour)
            except Skip as exc:
                say(f"   skipped: {exc}")
            except (NodeprovError, httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                tour.failed += 1
                say(f"   FAILED: {getattr(exc, 'message', None) or exc}")
        say("")
        say(f"demo done: {tour.minted_sat} sat of test money minted, {tour.failed} step(s) failed.")
        return tour.failed == 0
    finally:
        await tour.http.aclose()
        await client.aclose()
        await ledger.db.close()


async def step_key(tour: Tour) -> None:
    tour.need_http()
    sat = max(100, tour.amount // 2)
    token = await tour.token(sat)
    tour.say(f"   minted a {sat} sat token at {tour.plan.mint_url}: {token[:40]}...")
    response = await tour.http.post(f"{tour.base}/v1/wallet/create", json={"cashu_token": token})
    data = _ok(response)
    tour.api_key = str(data["api_key"])
    tour.say(
        f"   POST /v1/wallet/create -> key {tour.api_key[:12]}..., balance {data['balance']} msat"
    )


async def step_stream(tour: Tour) -> None:
    tour.need_http()
    if tour.api_key is None:
        raise Skip("no API key (step 1 did not run)")
    before = await tour.balance_msat()
    body = tour.chat_body(stream=True, stream_options={"include_usage": True})
    headers = {"Authorization": f"Bearer {tour.api_key}"}
    text, usage = [], None
    async with tour.http.stream(
        "POST", f"{tour.base}/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            await response.aread()
            _ok(response)
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
            usage = chunk.get("usage") or usage
    tour.say(f"   streamed: {''.join(text)!r}")
    if usage:
        tour.say(
            f"   usage: {usage['prompt_tokens']} prompt + {usage['completion_tokens']}"
            " completion tokens"
        )
    after = await tour.balance_msat()
    tour.say(f"   balance {before} -> {after} msat: this chat cost {before - after} msat")


async def step_x_cashu(tour: Tour) -> None:
    tour.need_http()
    sat = max(50, tour.amount // 4)
    token = await tour.token(sat)
    response = await tour.http.post(
        f"{tour.base}/v1/chat/completions", json=tour.chat_body(), headers={"X-Cashu": token}
    )
    data = _ok(response)
    cost = response.headers.get("X-Cost-Msat", "?")
    answer = data["choices"][0]["message"]["content"]
    tour.say(f"   paid with a {sat} sat token in X-Cashu; answer: {answer!r}")
    change = response.headers.get("X-Cashu")
    if change:
        parsed = parse_token(change)
        tour.say(
            f"   cost {cost} msat; change {parsed.amount} {parsed.unit} in the X-Cashu"
            f" response header: {change[:40]}..."
        )
    else:
        tour.say(f"   cost {cost} msat; no change token (the payment was used up)")


async def step_dm(tour: Tour) -> None:
    relay = tour.plan.relay_url or next(iter(tour.config.nostr.relays), None)
    if relay is None:
        raise Skip("no relay in the config")
    npub = tour.info.get("npub") or node_npub(None, tour.config)
    if not npub:
        raise Skip("the node has no Nostr key yet (Nostr channel not running)")
    node_pubkey = nip19.decode_pubkey(str(npub))
    sat = max(50, tour.amount // 4)
    token = await tour.token(sat)
    me = Keys.generate()
    job_id = secrets.token_hex(8)
    request = {
        "type": "request",
        "id": job_id,
        "endpoint": "/v1/chat/completions",
        "body": tour.chat_body(),
        "cashu": token,
    }
    async with RelayPool([relay], connect_timeout=5.0) as pool:
        sub = pool.subscribe([{"kinds": [nip59.GIFT_WRAP_KIND], "#p": [me.public_key]}])
        await sub.wait_eose(5.0)
        wraps = nip59.build_dm(me, node_pubkey, json.dumps(request), self_copy=False)
        results = [await pool.publish(w.to_dict()) for w in wraps]
        if not all(r.ok for r in results):
            raise Skip(f"the relay {relay} did not accept the DM: {results}")
        tour.say(f"   sent a NIP-17 DM to {npub[:20]}... via {relay}, paying {sat} sat")
        reply = await _await_reply(sub, me, job_id)
    if reply is None:
        raise Skip(f"no reply within {DM_WAIT_SECONDS:.0f} s (is the Nostr channel running?)")
    if reply.get("type") == "error":
        raise ValueError(f"the node answered with an error: {reply.get('error')}")
    body = reply.get("body") or {}
    answer = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
    tour.say(f"   reply DM: {answer!r}")
    change = reply.get("change")
    change_text = "none"
    if change:
        parsed = parse_token(change)
        change_text = f"{parsed.amount} {parsed.unit} ({change[:30]}...)"
    tour.say(f"   cost {reply.get('cost_msat')} msat; change {change_text}")


async def _await_reply(sub: Any, me: Keys, job_id: str) -> dict[str, Any] | None:
    """The reply to ``job_id`` (parts joined), or None after DM_WAIT_SECONDS."""
    parts: dict[int, dm_jobs.Part] = {}
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DM_WAIT_SECONDS):
            async for _, raw in sub:
                try:
                    content = nip59.unwrap(Event.from_dict(raw), me).rumor.content
                except NodeprovError:
                    continue
                part = dm_jobs.parse_part(content)
                if part is not None and part.id == job_id:
                    parts[part.part] = part
                    if len(parts) < part.of:
                        continue
                    content = dm_jobs.join_parts([parts[k] for k in sorted(parts)])
                with contextlib.suppress(ValueError):
                    message = json.loads(content)
                    if isinstance(message, dict) and message.get("id") == job_id:
                        return message
    return None


async def step_announcements(tour: Tour) -> None:
    relay = tour.plan.relay_url or next(iter(tour.config.nostr.relays), None)
    npub = tour.info.get("npub") or node_npub(None, tour.config)
    if relay is None or not npub:
        raise Skip("no relay or no node key (Nostr channel not running)")
    author = nip19.decode_pubkey(str(npub))
    found: dict[int, dict[str, Any]] = {}
    async with RelayPool([relay], connect_timeout=5.0) as pool:
        sub = pool.subscribe([{"authors": [author], "kinds": [0, 10050, LISTING_KIND, 31990]}])
        await sub.wait_eose(5.0)
        while len(sub):
            _, event = await sub.__anext__()
            found.setdefault(int(event["kind"]), event)
    if LISTING_KIND not in found:
        raise Skip(f"no kind {LISTING_KIND} listing by {npub[:20]}... on {relay}")
    kinds = ", ".join(str(k) for k in sorted(found))
    tour.say(f"   events by the node on {relay}: kinds {kinds}")
    listing = parse_listing(Event.from_dict(found[LISTING_KIND]))
    tour.say(f"   kind {LISTING_KIND}: {listing.name!r}, endpoints {', '.join(listing.endpoints)}")
    tour.say(f"   mints {', '.join(listing.mints)}; units {', '.join(listing.units)}")
    for model in listing.models:
        prices = ", ".join(f"{k} {v} msat" for k, v in sorted(model.prices.items()))
        tour.say(f"   model {model.id}: {prices}")


async def step_balances(tour: Tour) -> None:
    if tour.api_key is not None and tour.http_up:
        tour.say(f"   API key {tour.api_key[:12]}...: {await tour.balance_msat()} msat left")
    assert tour.ledger is not None and tour.wallet is not None
    for (mint, unit), held in sorted((await tour.wallet.balances()).items()):
        tour.say(f"   node holds {held} {unit} at {mint}")
    totals = await books(tour.ledger)
    tour.say(
        f"   books: users {totals.users_msat} msat ({totals.held_msat} held),"
        f" operator earned {totals.operator_msat} msat"
    )


async def step_audit(tour: Tour) -> None:
    assert tour.ledger is not None
    report = await tour.ledger.audit()
    for line in report.lines:
        mark = "ok" if line.ok else "MISMATCH"
        tour.say(
            f"   {mark}: {line.mint_url} {line.unit}: books {line.books_msat} msat,"
            f" proofs {line.proofs_msat} msat"
        )
    tour.say(
        f"   assets {report.assets_msat} msat, owed {report.liabilities_msat} msat:"
        f" {'books balance' if report.ok else 'books do NOT balance'}"
    )
    if not report.ok:
        raise ValueError("the audit found a mismatch (see `nodeprov wallet audit`)")


def _ok(response: httpx.Response) -> dict[str, Any]:
    """The JSON body of a 2xx answer; otherwise a ValueError with the node's error message."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 300 or not isinstance(data, dict):
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:200]
        raise ValueError(
            f"{response.request.method} {response.url.path} -> {response.status_code}: {message}"
        )
    return data
