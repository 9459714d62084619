"""The node's Nostr identity: a secret key file (nsec), created on first start with mode 0600.

The file is written under a temporary name, synced, then linked into place, so a failed or
interrupted first write (disk full, kill -9) never leaves an empty or half-written key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from nodeprov.config import Config
from nodeprov.core.datadir import read_or_create_secret_file
from nodeprov.errors import ConfigError, InvalidKey
from nodeprov.protocol.nostr_event import Keys

log = logging.getLogger(__name__)


def load_or_create_keys(path: Path) -> Keys:
    """Read the key file (nsec or hex); create it (0600, never overwriting) if it is missing."""
    path = path.expanduser()
    text = read_or_create_secret_file(path, lambda: Keys.generate().nsec, "the Nostr key")
    if not text:
        # Older versions wrote the key in place; a crash then left the file empty.
        raise ConfigError(
            f"nostr key file {path} is empty (a first start that was interrupted); it holds no"
            " key: delete it and start again to create one"
        )
    try:
        return Keys.parse(text)
    except InvalidKey as exc:
        raise ConfigError(f"nostr key file {path} does not hold a valid key: {exc}") from None


def node_keys(config: Config) -> Keys:
    """The node's keys: ``nostr.key`` (e.g. NODEPROV_NOSTR__KEY) when set, else the key file.

    A key given in the config is never written to disk nor shown (an error names the
    setting, not the value): machines that share one npub get it from their environment.
    """
    if not config.nostr.key:
        return load_or_create_keys(config.nostr_key_path)
    try:
        return Keys.parse(config.nostr.key.strip())
    except InvalidKey:
        raise ConfigError(
            "nostr.key (NODEPROV_NOSTR__KEY) is not a valid Nostr secret key (nsec or 64 hex)"
        ) from None
