"""Registered models and their immutable versions (checkpoints)."""
