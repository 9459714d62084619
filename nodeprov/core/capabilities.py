"""What this node supports, by name: listed in ``/v1/info`` and in its Nostr announcements.

Names are stable strings a client can test for before it picks a way to pay or to ask:

- ``openai_http``: the OpenAI-compatible HTTP API;
- ``api_keys``: ``sk-…`` keys funded by Cashu tokens or Lightning (``/v1/wallet/…``);
- ``token_as_key``: a Cashu token used as the bearer key;
- ``x_cashu``: a per-request token in ``X-Cashu`` with change returned (NUT-24);
- ``lightning_topup``: keys funded by paying a bolt11 invoice from the node's mint;
- ``nip98``: ``Authorization: Nostr …`` (NIP-98) pays from the signer's npub account;
- ``child_keys``: an API key makes child keys that spend from it up to a limit
  (``/v1/wallet/child-key``);
- ``nip17_dm`` / ``nip04_dm``: jobs and payments over encrypted Nostr DMs;
- ``nip90:5050``: NIP-90 text generation jobs (kind 5050 requests, 7000/6050 answers).
"""

from __future__ import annotations

from nodeprov.config import Config

HTTP_CAPABILITIES = (
    "openai_http", "api_keys", "token_as_key", "x_cashu", "lightning_topup", "nip98",
    "child_keys",
)  # fmt: skip


def node_capabilities(config: Config) -> tuple[str, ...]:
    """The capability names this node's config turns on, in a fixed order."""
    found = list(HTTP_CAPABILITIES)
    if config.nostr.relays:
        found.append("nip17_dm")
        if config.nostr.accept_nip04:
            found.append("nip04_dm")
        found.append("nip90:5050")
    return tuple(found)
