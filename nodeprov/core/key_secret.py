"""The node's API-key secret: derives the key a ``/v1/wallet/create`` token is worth.

``POST /v1/wallet/create`` must answer a repeated call with the same token (a client that
lost the first answer) with the same key, yet keys are stored only hashed. So the key is
derived: ``sk-`` + HMAC-SHA256(secret, token fingerprint). Without the secret, knowing a
token (as its mint does, once it is spent) does not give the key; with it, only someone
who also holds the token's proofs can name it. The file is 0600 from creation and written
under a temporary name first, so a crash never leaves a half-written secret in place.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from pathlib import Path

from nodeprov.core.datadir import read_or_create_secret_file
from nodeprov.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_FILE = "api_key.secret"
_BYTES = 32


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret at ``path``; create it (random, mode 0600, never overwriting) if missing."""
    text = read_or_create_secret_file(path, lambda: secrets.token_hex(_BYTES), "the API-key secret")
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != _BYTES:
        raise ConfigError(f"{path} does not hold a {_BYTES}-byte hex secret")
    return value


def node_secret(given: str, path: Path) -> bytes:
    """``given`` (hex, from ``node.api_key_secret``) when set, else the file at ``path``."""
    if not given:
        return load_or_create_secret(path)
    try:
        value = bytes.fromhex(given.strip())
    except ValueError:
        value = b""
    if len(value) != _BYTES:
        raise ConfigError(f"node.api_key_secret must be {_BYTES * 2} hex digits")
    return value


def derive_api_key(secret: bytes, fingerprint: str) -> str:
    """The API key a token with ``fingerprint`` is worth at this node (same format as random)."""
    mac = hmac.new(secret, b"nodeprov/api-key/v1\0" + fingerprint.encode(), hashlib.sha256)
    return "sk-" + base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
