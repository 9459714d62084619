"""Nostr adapter: relay pool and NIP-01 messages (the DM listener and announcer build on them)."""
