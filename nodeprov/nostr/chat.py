"""Plain-text DMs for people in ordinary Nostr apps: pasted tokens are deposited, the rest is
a chat with the default model (short per-npub history), answered in plain text with the cost.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from nodeprov.core.payments import Payer, PaymentFailed
from nodeprov.errors import InsufficientBalance, NodeprovError
from nodeprov.nostr.dm_handlers import (
    DmContext,
    balance_of,
    deposit,
    earlier_outcome,
    missing_msat,
    models_listing,
    payment_request,
    run_job,
)
from nodeprov.protocol.cashu_token import find_tokens

log = logging.getLogger(__name__)

MAX_SESSIONS = 10_000


def sats(msat: int) -> str:
    """``1234`` -> ``"1.234 sat"``; exact, no float."""
    whole, frac = divmod(msat, 1000)
    text = f"{whole}.{frac:03d}".rstrip("0").rstrip(".")
    return f"{text} sat"


def _answer(data: dict[str, Any]) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return "(no answer)"
    return content if isinstance(content, str) else "(no text answer)"


class ChatSessions:
    """Per-npub conversation turns (user, assistant), at most ``turns`` each, in memory."""

    def __init__(self, turns: int) -> None:
        self.turns = turns
        self._history: dict[str, deque[tuple[str, str]]] = {}

    def messages(self, sender: str, text: str) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for user, assistant in self._history.get(sender, ()):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return [*out, {"role": "user", "content": text}]

    def add(self, sender: str, user: str, assistant: str) -> None:
        if self.turns <= 0:
            return
        if sender not in self._history and len(self._history) >= MAX_SESSIONS:
            self._history.pop(next(iter(self._history)))
        self._history.setdefault(sender, deque(maxlen=self.turns)).append((user, assistant))

    def reset(self, sender: str) -> None:
        self._history.pop(sender, None)


def default_model(ctx: DmContext) -> str | None:
    configured = ctx.config.nostr.default_model
    if configured:
        return configured
    models = ctx.upstreams.models()
    return models[0] if models else None


def help_text(ctx: DmContext) -> str:
    lines = [
        f"{ctx.config.node.name}: LLM chat paid with Cashu eCash.",
        "Send a message to chat; paste a cashuA…/cashuB… token to top up.",
        "/new starts a new conversation, /balance shows your balance, /help this text.",
        "Prices (msat):",
    ]
    for model in models_listing(ctx):
        lines.append(f"  {model['id']}: {model['pricing']}")
    return "\n".join(lines)


async def handle_plain(
    ctx: DmContext, sessions: ChatSessions, sender: str, text: str, event_id: str, resumed: bool
) -> str:
    """The plain-text reply to one DM."""
    command = text.strip().lower()
    if command == "/new":
        sessions.reset(sender)
        return "Started a new conversation."
    if command == "/balance":
        return f"Balance: {sats(await balance_of(ctx, sender))}"
    if command == "/help":
        return help_text(ctx)
    notes: list[str] = []
    for index, token in enumerate(find_tokens(text)):
        text = text.replace(token, " ")
        try:
            credited = await deposit(ctx, sender, token, f"dm:{event_id}:{index}")
            notes.append(f"Deposited {sats(credited)}.")
        except NodeprovError as exc:
            notes.append(f"Token not accepted: {exc.message}")
    prompt = text.strip()
    if not prompt:
        if not notes:
            return help_text(ctx)
        return " ".join([*notes, f"Balance: {sats(await balance_of(ctx, sender))}."])
    model = default_model(ctx)
    if model is None:
        return "No model is configured for chat here."
    body = {"model": model, "messages": sessions.messages(sender, prompt)}
    prefix = " ".join(notes) + "\n\n" if notes else ""
    payer, ref = Payer("npub", sender, "nostr"), "dm:" + event_id
    earlier = await earlier_outcome(ctx, ref, payer) if resumed else None
    if earlier is not None:  # settled before a restart: reply from it, pay nothing again
        answer = _answer(earlier.data)
        balance = earlier.balance_msat or 0
        return f"{prefix}{answer}\n\n— cost {sats(earlier.charged_msat)}, balance {sats(balance)}"
    try:
        data, settled = await run_job(ctx, payer, "/v1/chat/completions", body, ref)
    except (InsufficientBalance, PaymentFailed) as exc:
        inner = exc.error if isinstance(exc, PaymentFailed) else exc
        if not isinstance(inner, InsufficientBalance):
            return f"{prefix}Error: {inner.message}"
        required = inner.details.get("required_msat")
        available = inner.details.get("available_msat") or 0
        creq = payment_request(ctx, missing_msat(inner))
        return (
            f"{prefix}This message costs up to {sats(int(required or 0))}; your balance is "
            f"{sats(int(available))}. Pay this request with a Cashu wallet, or paste a "
            f"cashu token into this chat:\n\n{creq}"
        )
    except NodeprovError as exc:
        return f"{prefix}Error: {exc.message}"
    answer = _answer(data)
    sessions.add(sender, prompt, answer)
    balance = settled.balance_msat if settled.balance_msat is not None else 0
    return f"{prefix}{answer}\n\n— cost {sats(settled.charged_msat)}, balance {sats(balance)}"
