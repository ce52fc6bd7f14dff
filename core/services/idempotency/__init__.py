"""Idempotency-Key: the first response to a creating POST, replayed to its retries."""
