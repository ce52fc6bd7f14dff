"""Registered models and their versions (checkpoints that never change, until purged)."""
