"""The node's Nostr identity: a secret key file (nsec), created on first start with mode 0600.

The file is written under a temporary name, synced, then linked into place, so a failed or
interrupted first write (disk full, kill -9) never leaves an empty or half-written key.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
