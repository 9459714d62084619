"""The embedded dev stack behind ``nodeprov start --dev`` and the ``nodeprov demo`` tour.

A local nutshell mint (FakeWallet), a nostr-relay and a demo upstream with canned answers;
everything on 127.0.0.1, addresses taken from the config.
"""
