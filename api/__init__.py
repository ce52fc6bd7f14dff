"""The HTTP API: routes, schemas, dependencies and problem+json errors. The rules live in core.services."""
