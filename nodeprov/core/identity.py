"""The node's Nostr identity: a secret key file (nsec), created on first start with mode 0600."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from nodeprov.errors import ConfigError, InvalidKey
from nodeprov.protocol.nostr_event import Keys

log = logging.getLogger(__name__)


def load_or_create_keys(path: Path) -> Keys:
    """Read the key file (nsec or hex); create it (0600, never overwriting) if it is missing."""
    path = path.expanduser()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = Keys.generate()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created concurrently: read that one
            return load_or_create_keys(path)
        with os.fdopen(fd, "w") as fh:
            fh.write(keys.nsec + "\n")
        log.info("created Nostr key %s at %s", keys.npub, path)
        return keys
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("Nostr key file %s had mode %o; setting 0600", path, mode)
        path.chmod(0o600)
    try:
        return Keys.parse(path.read_text().strip())
    except InvalidKey as exc:
        raise ConfigError(f"nostr key file {path} does not hold a valid key: {exc}") from None
