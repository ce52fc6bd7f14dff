"""Domain services: the rules of models, model versions, deletion requests and the audit log.

Torch-free on import, so the API process can use them without initialising CUDA; the few rules
that need torch (checkpoint validation, label checks) import it inside the function. Every query
takes the tenant and filters by it, so another tenant's id answers exactly like a missing one.
"""
