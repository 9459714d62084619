"""The user's side of nodeprov: a local Cashu wallet, a paying OpenAI proxy, ask and discover."""
