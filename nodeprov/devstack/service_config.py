"""The environment of the dev mint and the config file of the dev relay."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

MINT_DERIVATION_PATHS = ["m/0'/0'/0'", "m/0'/1'/0'"]  # sat keyset, msat keyset


def mint_env(workdir: Path) -> dict[str, str]:
    """The mint's environment: FakeWallet for sat + msat, no fees, no rate limit, own HOME."""
    drop = ("MINT_", "FAKEWALLET_", "LIGHTNING_", "WALLET_", "SOCKS_", "HTTP_PROXY", "HTTPS_")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(drop)}
    for key in ("DEBUG", "CASHU_DIR", "TOR", "ALL_PROXY"):
        env.pop(key, None)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    key_file = workdir / "mint.key"  # kept: a new key would change the keysets
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
    env.update(
        {
            "HOME": str(home),
            "CASHU_DIR": str(home / ".cashu"),
            "PYTHONUNBUFFERED": "1",
            "DEBUG": "false",
            "MINT_BACKEND_BOLT11_SAT": "FakeWallet",
            "MINT_BACKEND_BOLT11_MSAT": "FakeWallet",
            "MINT_DERIVATION_PATH_LIST": json.dumps(MINT_DERIVATION_PATHS),
            "MINT_PRIVATE_KEY": key_file.read_text().strip(),
            "MINT_DATABASE": str(workdir / "db"),
            "MINT_INPUT_FEE_PPK": "0",
            "MINT_RATE_LIMIT": "false",
            "FAKEWALLET_DELAY_INCOMING_PAYMENT": "0",
            "FAKEWALLET_DELAY_OUTGOING_PAYMENT": "0",
            "FAKEWALLET_BRR": "true",
            "FAKEWALLET_BALANCE_SAT": str(10**12),
        }
    )
    return env


def relay_config(workdir: Path, port: int) -> dict[str, Any]:
    """nostr-relay's config (JSON is valid YAML); big events for gift wraps."""
    console = {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}
    return {
        "DEBUG": False,
        "relay_name": "nodeprov dev relay",
        "relay_description": "nostr-relay started by `nodeprov start --dev`",
        "storage": {
            "sqlalchemy.url": f"sqlite+aiosqlite:///{workdir / 'nostr.sqlite3'}",
            "num_concurrent_reqs": 10,
            "num_concurrent_adds": 2,
            "validators": [
                "nostr_relay.validators.is_not_too_large",
                "nostr_relay.validators.is_signed",
                "nostr_relay.validators.is_recent",
            ],
        },
        "verification": {"nip05_verification": "disabled"},
        "authentication": {"enabled": False},
        "message_timeout": 1800,
        "subscription_limit": 64,
        "max_limit": 6000,
        "max_event_size": 262144,
        "gunicorn": {
            "bind": f"127.0.0.1:{port}",
            "host": "127.0.0.1",
            "workers": 1,
            "loglevel": "warning",
        },
        "logging": {
            "version": 1,
            "handlers": {"console": console},
            "root": {"level": "WARNING", "handlers": ["console"]},
        },
    }
