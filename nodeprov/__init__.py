"""nodeprov: sell LLM access for Cashu eCash, over HTTP and Nostr."""

__version__ = "0.1.0"
