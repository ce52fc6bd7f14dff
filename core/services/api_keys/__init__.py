"""API keys: create (the key is shown once, its sha256 stored), list, revoke, authenticate."""
