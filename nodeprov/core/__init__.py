"""The shared core: pricing, ledger, wallet and the payment pipeline. No HTTP, no websockets."""
