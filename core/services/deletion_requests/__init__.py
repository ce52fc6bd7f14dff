"""Deletion requests: the API side (create, read, cancel) and the worker side (the job life cycle)."""
